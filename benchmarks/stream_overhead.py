"""Host cost of streaming tokens out of a worker: does its event loop keep up with a decode
step of N rows every S ms?

The real WorkerServicer and gRPC server (the tiny checkpoint's engine, for its config and
fingerprint) over a paced stand-in for the engine's step: it spins H ms holding the GIL (the
engine's own Python for the next step, which async scheduling overlaps with the GPU), sleeps
for the rest of S ms with the GIL released (waiting on the GPU), and emits one token for each
running request. A client process opens N Generate streams at once. If the worker's loop
keeps up, a step takes S ms; if streaming N
messages a step costs more host time than that, steps stretch (the GPU would idle), which is
what this measures (the median time between steps that held every stream), with the worker
process's CPU time per streamed token.

    python benchmarks/stream_overhead.py [--streams 64 256] [--step-ms 10.5 13.7] [--tokens 100]
        [--host-ms 0] [--switch-interval-ms 5 0]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import grpc

# Run as `python benchmarks/stream_overhead.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.local_worker import served_engine
from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.worker.checkpoint import ensure_tiny_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.scheduler_types import EngineCoreOutput


class PacedSteps:
    """Stands in for LLMEngine's request methods: one token a running request per step."""

    def __init__(self, step_s: float, host_s: float):
        self.step_s, self.host_s = step_s, host_s
        self.left: dict[str, int] = {}
        self.steps = 0
        self.full_steps: list[float] = []  # start times of steps that held every stream
        self.streams = 0

    def add_request(self, rid: str, prompt: list[int], params, **_) -> None:
        self.left[rid] = params.max_tokens

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def abort_request(self, rid: str) -> list[EngineCoreOutput]:
        self.left.pop(rid, None)
        return []

    def step(self) -> list[EngineCoreOutput]:
        if len(self.left) == self.streams:
            self.full_steps.append(time.perf_counter())
        # Async scheduling: the engine's Python for the next step (GIL held) runs while the
        # GPU computes this one; then it waits, GIL free, for what is left of the GPU's time.
        start = time.perf_counter()
        while time.perf_counter() < start + self.host_s:
            pass
        left = self.step_s - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        self.steps += 1
        outs = []
        for rid, left in list(self.left.items()):
            done = left <= 1
            outs.append(EngineCoreOutput(rid, [7], done, "length" if done else None, 0))
            if done:
                del self.left[rid]
            else:
                self.left[rid] = left - 1
        return outs


def _client(address: str, streams: int, tokens: int, conn) -> None:
    async def one(stub, i: int) -> list[float]:
        req = worker_pb2.WorkerGenerateRequest(
            request_id=f"s{i}", prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(max_tokens=tokens, temperature=0.0))
        gaps, last = [], None
        async for msg in stub.Generate(req):
            now = time.perf_counter()
            if last is not None:
                gaps.extend([(now - last) / max(len(msg.token_ids), 1)] * len(msg.token_ids))
            last = now
        return gaps

    async def main() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            start = time.perf_counter()
            gaps = await asyncio.gather(*(one(stub, i) for i in range(streams)))
            conn.send((time.perf_counter() - start, [g for gs in gaps for g in gs]))

    asyncio.run(main())


async def _cell(engine: LLMEngine, streams: int, step_s: float, host_s: float,
                tokens: int, switch_s: float | None = None) -> dict:
    paced = PacedSteps(step_s, host_s)
    paced.streams = streams
    for name in ("add_request", "has_unfinished_requests", "abort_request", "step"):
        setattr(engine, name, getattr(paced, name))
    async with served_engine(engine) as (address, _):
        if switch_s is not None:  # a comparison with the worker's own interval
            sys.setswitchinterval(switch_s)
        conn, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=_client,
                                               args=(address, streams, tokens, child))
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        steps0 = paced.steps
        proc.start()
        while not conn.poll():
            await asyncio.sleep(0.05)
        wall, gaps = conn.recv()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        proc.join()
    steps = paced.steps - steps0
    full = paced.full_steps
    gaps_full = [b - a for a, b in zip(full, full[1:], strict=False)]
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    busy = steps * host_s  # the stand-in's own spinning is not streaming cost
    return {"streams": streams, "step_ms": step_s * 1e3, "host_ms": host_s * 1e3,
            "switch_ms": sys.getswitchinterval() * 1e3,
            "steps": steps, "full_steps": len(full),
            "ms_per_step": statistics.median(gaps_full) * 1e3 if gaps_full else float("nan"),
            "tok_s": streams * tokens / wall, "itl_p50_ms": statistics.median(gaps) * 1e3,
            "cpu_us_per_token": (cpu - busy) / (streams * tokens) * 1e6}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--step-ms", type=float, nargs="+", default=[10.5, 13.7],
                    help="GPU time a step (H200, V2-Lite: 10.5 ms at 64 rows, 13.7 at 256)")
    ap.add_argument("--host-ms", type=float, default=0.0,
                    help="the engine thread's own Python a step (GIL held), within the step")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--switch-interval-ms", type=float, nargs="+", default=[0.0],
                    help="the worker's GIL switch interval(s) to compare; 0: the worker's own")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=str(ensure_tiny_checkpoint()), device="cpu"))
    print(f"{'GIL ms':>6} {'streams':>7} {'step ms':>8} {'host ms':>8} {'ms/step':>8} "
          f"{'x step':>7} {'tok/s':>8} {'ITL p50':>8} {'CPU us/tok':>10}")
    for switch_ms in args.switch_interval_ms:
        for streams, step_ms in zip(args.streams, args.step_ms, strict=True):
            r = await _cell(engine, streams, step_ms / 1e3, args.host_ms / 1e3, args.tokens,
                            switch_ms / 1e3 if switch_ms else None)
            _print_row(r, max(step_ms, args.host_ms))


def _print_row(r: dict, expected_ms: float) -> None:
    print(f"{r['switch_ms']:>6.2f} {r['streams']:>7} {r['step_ms']:>8.1f} {r['host_ms']:>8.1f} "
          f"{r['ms_per_step']:>8.2f} {r['ms_per_step'] / expected_ms:>7.2f} "
          f"{r['tok_s']:>8.0f} {r['itl_p50_ms']:>8.2f} {r['cpu_us_per_token']:>10.1f}",
          flush=True)


if __name__ == "__main__":
    asyncio.run(main())
