"""NIXL READ bandwidth between two local processes vs a plain torch copy of the same bytes.

    python benchmarks/nixl_bandwidth.py [--device cuda] [--block-kib 256] [--repeats 5]
        [--sizes-mib 64 256 1024] [--layout contiguous scattered] [--no-proto-info]

A spawned "prefill" process registers a KV-cache-shaped buffer; this process READs the first
``size / block`` blocks into its own registered buffer with ``KVTransferAgent.read_blocks``, in
two layouts (``--layout``): ``contiguous`` (block i into block i: one run, one descriptor, what
a fresh pool's consecutive blocks become) and ``scattered`` (into the blocks in reverse order:
nothing merges, one descriptor per block, a fragmented pool's worst case).

The baseline is ``dst.copy_(src)`` of the same number of bytes inside one process, in the same
run: a memcpy, or with ``--device cuda`` (VRAM to VRAM) a device-to-device copy. Each cell is
the median of ``--repeats`` runs. The transport is printed twice: the plan the worker logs at
start (worker/kv_handoff/ucx_transport.py) and, with UCX_PROTO_INFO=y (on unless
--no-proto-info), UCX's own protocol table per endpoint: ``rma_bw(cuda_ipc/cuda)`` on the
"remote memory read" line is the device path, ``rma_am(tcp/lo)`` the 1000x slower fallback.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import torch

from moeserve.worker.kv_handoff.agent import KVTransferAgent, block_runs

MiB = 1 << 20


def _peer(conn, num_blocks: int, block_bytes: int, device: str, threads: int) -> None:
    src = torch.empty((num_blocks, block_bytes), dtype=torch.uint8, device=device)
    src.random_(0, 256)
    agent = KVTransferAgent("bench-prefill", src, num_threads=threads)
    conn.send(agent.metadata())
    # The passive side must progress too (connection wire-up, notifications): the serving
    # path's sweeper does the same.
    while not conn.poll(0.001):
        agent.take_notifs()
    agent.close()


def _time_it(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats + 1):  # first run warms caches and UCX endpoints
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--block-kib", type=int, default=256, help="bytes per KV block (KiB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=4, help="NIXL UCX backend threads")
    parser.add_argument("--layout", nargs="+", choices=["contiguous", "scattered"],
                        default=["contiguous", "scattered"], help="which block layouts to READ")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--proto-info", action=argparse.BooleanOptionalAction, default=True,
                        help="UCX prints the protocol it selected (UCX_PROTO_INFO=y)")
    args = parser.parse_args(argv)
    if args.proto_info:  # before either agent starts: the spawned peer inherits it
        os.environ.setdefault("UCX_PROTO_INFO", "y")

    block_bytes = args.block_kib * 1024
    num_blocks = max(args.sizes_mib) * MiB // block_bytes
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    peer_args = (child, num_blocks, block_bytes, args.device, args.threads)
    proc = ctx.Process(target=_peer, args=peer_args)
    proc.start()
    try:
        if not conn.poll(120):
            raise RuntimeError("peer process did not start")
        dst = torch.zeros((num_blocks, block_bytes), dtype=torch.uint8, device=args.device)
        src_local = torch.ones_like(dst)
        agent = KVTransferAgent("bench-decode", dst, num_threads=args.threads)
        transport = agent.transport.describe()
        peer = agent.add_peer(conn.recv())
        rows = []
        for size in args.sizes_mib:
            n = size * MiB // block_bytes
            if n == 0:
                print(f"skipping {size} MiB: smaller than one {args.block_kib} KiB block")
                continue
            def memcpy(n: int = n) -> None:
                dst[:n].copy_(src_local[:n])

            t_copy = _time_it(memcpy, args.repeats, sync)
            for layout in args.layout:
                remote = list(range(n))
                local = remote if layout == "contiguous" else remote[::-1]

                posts: list[float] = []

                def nixl_read(remote: list[int] = remote, local: list[int] = local,
                              posts: list[float] = posts) -> None:
                    start = time.perf_counter()
                    handle = agent.read_blocks(peer, remote, local)
                    posts.append(time.perf_counter() - start)
                    result = agent.wait(handle, timeout_s=120)
                    if not result.ok:
                        raise RuntimeError(result.error)

                t_nixl = _time_it(nixl_read, args.repeats, sync)
                rows.append({
                    "size_mib": size,
                    "layout": layout,
                    "descriptors": len(block_runs(remote, local)[2]),
                    "nixl_gib_s": size / 1024 / t_nixl,
                    "copy_gib_s": size / 1024 / t_copy,
                    "nixl_ms": t_nixl * 1e3,
                    # building the descriptor lists and posting the READ, inside nixl_ms
                    "post_ms": statistics.median(posts[1:]) * 1e3,
                    "copy_ms": t_copy * 1e3,
                    "transport": transport,
                })
        agent.close()
    finally:
        conn.send("done")
        proc.join(30)
        if proc.is_alive():
            proc.kill()

    copy = "device copy" if args.device.startswith("cuda") else "memcpy"
    print(transport)
    print(f"block {args.block_kib} KiB, device {args.device}, median of {args.repeats}; "
          f"baseline: {copy} of the same bytes in this run")
    print(f"{'size':>9} {'layout':>10} {'descs':>6} {'NIXL GiB/s':>11} {'copy GiB/s':>11} "
          f"{'ratio':>6} {'NIXL ms':>8} {'post ms':>8} {'copy ms':>8}")
    for r in rows:
        ratio = r["nixl_gib_s"] / r["copy_gib_s"]
        print(
            f"{r['size_mib']:>5} MiB {r['layout']:>10} {r['descriptors']:>6} "
            f"{r['nixl_gib_s']:>11.2f} {r['copy_gib_s']:>11.2f} {ratio:>6.2f} "
            f"{r['nixl_ms']:>8.3f} {r['post_ms']:>8.3f} {r['copy_ms']:>8.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
