"""`moeserve preflight`: check an EP group's fabric before it serves.

Runs once per pod of a group (an init container), all pods together: a torch.distributed
all-to-all across the group (the traffic pattern of MoE dispatch/combine) and a NIXL READ from
the next pod's registered memory (the KV-transfer path), each checked for content and timed.
A result below the spec's bandwidth floor, a corrupted byte or a peer that never shows up fails
the container, so the group never turns ready; the measured numbers go to the termination
message, where the operator reads them into the FabricReady condition.

On CPU (tests, kind) the backends are gloo and NIXL over UCX; on GPU nodes the same code runs
with whatever UCX transport the pod's NICs offer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from moeserve.common import spec as s

__all__ = ["PreflightResult", "run_preflight", "add_preflight_parser", "RESULT_KEY"]

RESULT_KEY = s.PREFLIGHT_RESULT_KEY  # marks our JSON in a termination message


@dataclass
class PreflightResult:
    rank: int
    world_size: int
    all_to_all_gbps: float | None = None
    nixl_gbps: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({RESULT_KEY: {**asdict(self), "ok": self.ok}}, sort_keys=True)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e9


def _all_to_all(rank: int, world: int, nbytes: int, iters: int) -> tuple[float, str | None]:
    import torch
    import torch.distributed as dist

    chunk = max(nbytes // 4 // world, 1)
    send = torch.full((chunk * world,), float(rank))
    recv = torch.empty_like(send)
    best = float("inf")
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(recv, send)
        best = min(best, time.perf_counter() - start)
    expected = torch.arange(world, dtype=send.dtype).repeat_interleave(chunk)
    bad = None if torch.equal(recv, expected) else "all-to-all delivered wrong bytes"
    moved = chunk * 4 * (world - 1) * 2  # sent and received over the fabric, per rank
    return _gbps(moved, best), bad


def _nixl_read(rank: int, world: int, nbytes: int, iters: int,
               timeout_s: float) -> tuple[float, str | None]:
    import torch
    import torch.distributed as dist
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"preflight-{rank}", nixl_agent_config(
        enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"]))
    source = torch.full((nbytes,), rank % 251, dtype=torch.uint8)
    target = torch.zeros(nbytes, dtype=torch.uint8)
    regs = [agent.register_memory(source), agent.register_memory(target)]
    peers: list[object] = [None] * world
    dist.all_gather_object(peers, (agent.get_agent_metadata(), source.data_ptr()))
    peer = (rank + 1) % world
    name = agent.add_remote_agent(peers[peer][0])
    name = name.decode() if isinstance(name, bytes) else name
    remote = agent.get_xfer_descs([(peers[peer][1], nbytes, 0)], "DRAM")
    local = agent.get_xfer_descs([(target.data_ptr(), nbytes, 0)], "DRAM")
    best, problem = float("inf"), None
    for _ in range(iters):
        target.zero_()
        start = time.perf_counter()
        xfer = agent.initialize_xfer("READ", local, remote, name)
        state = agent.transfer(xfer)
        while state not in ("DONE", "ERR") and time.perf_counter() - start < timeout_s:
            state = agent.check_xfer_state(xfer)
        elapsed = time.perf_counter() - start
        agent.release_xfer_handle(xfer)
        if state != "DONE":
            problem = f"NIXL read from rank {peer} {'failed' if state == 'ERR' else 'timed out'}"
            break
        best = min(best, elapsed)
    if problem is None and not bool((target == peer % 251).all()):
        problem = f"NIXL read from rank {peer} delivered wrong bytes"
    dist.barrier()  # peers keep their memory registered until everyone has read
    for reg in regs:
        agent.deregister_memory(reg)
    return (0.0 if problem else _gbps(nbytes, best)), problem


def run_preflight(rank: int, world: int, rendezvous: str, nbytes: int = 16 << 20,
                  min_all_to_all_gbps: float = 0.0, min_nixl_gbps: float = 0.0,
                  iters: int = 3, timeout_s: float = 300.0) -> PreflightResult:
    import torch.distributed as dist

    result = PreflightResult(rank=rank, world_size=world)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{rendezvous}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # a peer that never came: the group is not placed or wired
        result.problems.append(f"rendezvous at {rendezvous} failed: {exc}")
        return result
    try:
        gbps, bad = _all_to_all(rank, world, nbytes, iters)
        result.all_to_all_gbps = round(gbps, 3)
        if bad:
            result.problems.append(bad)
        elif gbps < min_all_to_all_gbps:
            result.problems.append(f"all-to-all {gbps:.3f} GB/s < floor {min_all_to_all_gbps}")
        if world > 1:
            gbps, bad = _nixl_read(rank, world, nbytes, iters, timeout_s)
            result.nixl_gbps = round(gbps, 3)
            if bad:
                result.problems.append(bad)
            elif gbps < min_nixl_gbps:
                result.problems.append(f"NIXL read {gbps:.3f} GB/s < floor {min_nixl_gbps}")
    except Exception as exc:
        result.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()
    return result


def add_preflight_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("preflight", help="fabric check of an EP group (run in each pod)")
    env = os.environ
    p.add_argument("--rank", type=int, default=int(env.get(s.ENV_RANK, "0")))
    p.add_argument("--world-size", type=int, default=int(env.get(s.ENV_NUM_PODS, "1")),
                   help="processes taking part: one per pod of the group")
    p.add_argument("--rendezvous", default=env.get(s.ENV_RENDEZVOUS, "127.0.0.1:29500"),
                   help="host:port of rank 0's TCP store")
    p.add_argument("--bytes", type=int, default=16 << 20, help="payload per test")
    p.add_argument("--min-alltoall-gbps", type=float, default=0.0)
    p.add_argument("--min-nixl-gbps", type=float, default=0.0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--result-file", default="/dev/termination-log",
                   help="where the JSON result goes too (the pod's termination message)")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    result = run_preflight(args.rank, args.world_size, args.rendezvous, args.bytes,
                           args.min_alltoall_gbps, args.min_nixl_gbps, timeout_s=args.timeout_s)
    text = result.to_json()
    print(text, flush=True)
    try:
        with open(args.result_file, "w") as out:
            out.write(text)
    except OSError:
        pass  # outside a pod there is no termination log; stdout has it
    return 0 if result.ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="moeserve")
    add_preflight_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
