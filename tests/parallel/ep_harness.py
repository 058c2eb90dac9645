"""Runs EP ranks as spawned processes for the tests: each rank builds an engine on the group,
runs one scenario and sends back plain Python results (tokens, timings, reports)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from moeserve.common.sampling import SamplingParams

PROMPTS = [
    [5, 17, 300, 42, 9, 77, 120, 3, 250, 11, 64, 99, 18, 7, 400, 23, 8, 16, 31],
    [200, 201, 202],
    [9] * 40,
    [33, 44, 55, 66, 77, 88, 99, 111, 222, 333, 444],
    [450, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
    [7, 7, 8, 8],
]
MAX_TOKENS = [6, 9, 4, 7, 5, 8]


def params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS[i % len(MAX_TOKENS)], temperature=0.0,
                          ignore_eos=True)


def engine_config(model: str, ep: int, **kw: Any):
    from moeserve.worker.config import EngineConfig

    return EngineConfig(model=model, ep=ep, dp=ep, block_size=16, num_kv_blocks=128,
                        device="cpu", **kw)


def reference(model: str, prompt_ids: list[int]) -> list[list[int]]:
    """Single-process (EP=1) greedy tokens of the prompts."""
    from moeserve.worker.engine import LLMEngine

    engine = LLMEngine(engine_config(model, 1))
    return engine.generate([PROMPTS[i] for i in prompt_ids], [params(i) for i in prompt_ids])


def generate_ids(engine, prompt_ids: list[int]) -> list[list[int]]:
    return engine.generate([PROMPTS[i] for i in prompt_ids], [params(i) for i in prompt_ids])


def join(rank: int, world: int, rendezvous: str, timeout_s: float):
    from moeserve.worker.parallel.group import RankInfo, init_parallel

    info = RankInfo(rank, world, rank, world, rendezvous)
    return init_parallel(info, timeout_s=timeout_s, heartbeat_s=0.5)


def _child(fn: Callable, rank: int, world: int, rendezvous: str, timeout_s: float,
           args: tuple, out: mp.Queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        ctx = join(rank, world, rendezvous, timeout_s)
        result = fn(ctx, *args)
        out.put((rank, "ok", result))
        ctx.close()
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable, world: int, args: tuple = (), *, timeout_s: float = 90.0,
              collective_timeout_s: float = 20.0, expect: list[int] | None = None,
              results_out: dict | None = None) -> dict[int, Any]:
    """fn(ctx, *args) on `world` spawned ranks; their results by rank (into `results_out` too,
    as they arrive). Never waits longer than timeout_s: stuck ranks are killed and a
    TimeoutError names them. `expect`: the ranks whose results end the wait early."""
    spawn = mp.get_context("spawn")
    out: mp.Queue = spawn.Queue()
    rendezvous = f"127.0.0.1:{free_port()}"
    procs = [spawn.Process(target=_child, daemon=True,
                           args=(fn, r, world, rendezvous, collective_timeout_s, args, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {} if results_out is None else results_out
    wanted = set(range(world) if expect is None else expect)
    deadline = time.monotonic() + timeout_s
    try:
        while not wanted <= set(results):
            try:
                rank, status, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} gave no "
                                   f"result within {timeout_s}s; got {results}") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
        if expect is not None and len(results) < world:
            raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} never "
                               "finished (expected: they were stopped)")
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    return results


# ---------------------------------------------------------------- scenarios (run on each rank)

# Repeated tokens route to the same few experts; these ones are hot on the same EP=2 rank
# under the default placement of the tiny checkpoint.
SKEWED = [[4] * 24, [43] * 30 + [4, 43], [14] * 12 + [4] * 3]
SKEWED_MAX_TOKENS = [10, 7, 12]


def skewed_params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=SKEWED_MAX_TOKENS[i], temperature=0.0, ignore_eos=True)


def scenario_parity(ctx, model: str, assignment: dict[int, list[int]], dbo: bool) -> dict:
    """Greedy tokens of this rank's prompts, DBO off (and on, with a second engine)."""
    from moeserve.worker.engine import LLMEngine

    mine = assignment.get(ctx.rank, [])
    engine = LLMEngine(engine_config(model, ctx.world_size), parallel=ctx)
    result = {"tokens": generate_ids(engine, mine)}
    if dbo:
        engine = LLMEngine(engine_config(model, ctx.world_size, enable_dbo=True,
                                         dbo_token_threshold=1), parallel=ctx)
        result["dbo_tokens"] = generate_ids(engine, mine)
        result["dbo_steps"] = engine.runner.expert_parallel.steps
    return result


def scenario_eplb(ctx, model: str, assignment: dict[int, list[int]],
                  quantization: str = "auto") -> dict:
    """Skewed prompts with EPLB rebalancing every 4 steps while they decode."""
    from moeserve.worker.engine import LLMEngine

    cfg = engine_config(model, ctx.world_size, enable_eplb=True, eplb_window=4,
                        eplb_interval=4, eplb_redundant_experts=2, quantization=quantization)
    engine = LLMEngine(cfg, parallel=ctx)
    mine = assignment.get(ctx.rank, [])
    tokens = engine.generate([SKEWED[i] for i in mine], [skewed_params(i) for i in mine])
    ep = engine.runner.expert_parallel
    return {"tokens": tokens, "reports": [vars(r) for r in ep.reports],
            "placement": ep.placement.phy2log.tolist(), "fp8": engine.runner.fp8}


def scenario_stall(ctx, model: str, stall_rank: int, stall_after: int,
                   how: str = "SIGSTOP") -> dict:
    """stall_rank freezes (SIGSTOP, like a hung GPU) or dies (SIGKILL) after some steps; the
    others report how long it took them to see the group fail, and their health."""
    from moeserve.worker.engine import LLMEngine
    from moeserve.worker.parallel.group import GroupFailure

    engine = LLMEngine(engine_config(model, ctx.world_size), parallel=ctx)
    engine.add_request("long", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True,
                                                          temperature=0.0))
    steps = 0
    last_ok = time.monotonic()
    try:
        while engine.has_unfinished_requests():
            if ctx.rank == stall_rank and steps == stall_after:
                os.kill(os.getpid(), getattr(signal, how))
            engine.step()
            steps += 1
            last_ok = time.monotonic()
    except GroupFailure as e:
        detected = time.monotonic() - last_ok
        return {"error": str(e), "detect_s": detected, "healthy": ctx.health.healthy,
                "reason": ctx.health.reason, "steps": steps}
    return {"error": None, "steps": steps}
