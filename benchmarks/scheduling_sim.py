"""The engine's real scheduler over a step-cost model of the H200: does the serving path admit
prompts in as few mixed steps as the engine alone does?

The engine alone (`serving_engine.py`) adds a request the instant another finishes, so the
prompts that replace a finished group are admitted in one mixed step. Requests that come over
gRPC arrive milliseconds apart; if they are split over several mixed steps, each pays a mixed
step's fixed cost (on the H200 an eager mixed step costs ~60 ms beyond its prompt tokens,
against a 10.4 ms decode step). This runs the real LLMEngine (scheduler, KV manager, async
scheduling) and, for the serving path, the real WorkerServicer and gRPC server with a client
process of closed-loop streams; only the runner's launch is replaced by a wait for the step's
modelled device time (the GIL released, as while a GPU runs), tokens constant.

Step cost (V2-Lite, bf16, H200; fitted to docs/performance.md's measurements, this session's
`serving_engine.py` rows): decode = 9.4 + 0.0155 x rows ms (10.4 at 64, 13.1 at 238); mixed =
59.0 + 3.556 x prompt tokens / 1000 + 0.166 x decode rows ms (76.6 at 1954 prompt tokens and 64
rows, 98.1 at 8000 and 64, 126.4 at 7837 and 238).

    python benchmarks/scheduling_sim.py [--concurrency 64] [--requests 256]
        [--arrival-stagger-ms 0 3] [--mixed-host-ms 0 60] [--router]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx
import torch

# Run as `python benchmarks/scheduling_sim.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.local_worker import served_engine
from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.bench import BenchConfig, run_bench
from moeserve.common.listen_line import LISTEN_LINE
from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import ensure_tiny_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.sampler import SampledTokens
from moeserve.worker.scheduler import Scheduler
from moeserve.worker.scheduler_types import SchedulerOutput


def step_ms(prompt_tokens: int, rows: int) -> float:
    """Modelled device time of a step: ``rows`` decode rows beside ``prompt_tokens``."""
    if prompt_tokens:
        return 59.0 + 3.556 * prompt_tokens / 1000 + 0.166 * rows
    return 9.4 + 0.0155 * rows


class _Sampled(SampledTokens):
    """A launched step's tokens, ready when its modelled device time has passed."""

    def __init__(self, request_ids: list[str], ready_at: float):
        super().__init__(request_ids, torch.full((len(request_ids),), 7, dtype=torch.long))
        self._ready_at = ready_at

    def result(self) -> dict[str, int]:
        left = self._ready_at - time.perf_counter()
        if left > 0:
            time.sleep(left)  # the GIL is free, as while the GPU runs
        return super().result()


class ModelledDevice:
    """Stands in for ModelRunner.launch: steps queue on one device, each taking step_ms.

    ``mixed_host_s``: how much of a mixed step is the host launching it, the GIL held (an
    eager step's ~1000 launches: 64 ms of wall time for 30 ms of kernels at 2k prompt tokens on
    the H200); spun inside ``launch`` before the device time is counted from its start."""

    def __init__(self, mixed_host_s: float = 0.0) -> None:
        self.free_at = 0.0
        self.mixed_host_s = mixed_host_s
        self.steps: list[tuple[int, int]] = []  # (prompt tokens, decode rows)

    def launch(self, out: SchedulerOutput) -> _Sampled:
        prompt = rows = 0
        sampled = []
        for req in out.scheduled:
            n = out.num_scheduled_tokens[req.request_id]
            if req.request_id in out.ahead_rows or req.num_computed_tokens >= req.num_prompt_tokens:
                rows += 1
            else:
                prompt += min(n, req.num_prompt_tokens - req.num_computed_tokens)
            if req.request_id in out.ahead_rows or Scheduler.needs_sampling(req, n):
                sampled.append(req.request_id)
        self.steps.append((prompt, rows))
        start = max(self.free_at, time.perf_counter())
        if prompt and self.mixed_host_s:
            while time.perf_counter() < start + self.mixed_host_s:
                pass  # Python launching kernels: holds the GIL
        self.free_at = start + step_ms(prompt, rows) / 1e3
        return _Sampled(sampled, self.free_at)


def modelled_engine(args) -> tuple[LLMEngine, ModelledDevice]:
    """An engine for ``args``' load whose runner launches on the modelled device."""
    max_len, concurrency = args.prompt + args.output + 64, args.concurrency
    engine = LLMEngine(EngineConfig(
        model=str(ensure_tiny_checkpoint()), device="cpu", async_scheduling="on",
        max_model_len=max_len, max_num_batched_tokens=args.budget,
        max_num_seqs=max(256, concurrency), enable_prefix_caching=False,
        num_kv_blocks=(concurrency + 8) * (max_len // 64 + 2)))
    device = ModelledDevice(args.mixed_host_ms / 1e3)
    engine.runner.launch = device.launch
    return engine, device


def _prompt(i: int, length: int) -> list[int]:
    return [10 + (i * 7 + j) % 200 for j in range(length)]


def engine_alone(args) -> dict:
    engine, device = modelled_engine(args)
    params = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
    issued = 0
    start = time.perf_counter()
    for _ in range(args.concurrency):
        engine.add_request(str(issued), _prompt(issued, args.prompt), params)
        issued += 1
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished and issued < args.requests:
                engine.add_request(str(issued), _prompt(issued, args.prompt), params)
                issued += 1
    return _result("engine alone", time.perf_counter() - start, args, device)


def _client(address: str, args, conn) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            issued = [0]
            ttft: list[float] = []
            front = asyncio.Lock()  # a router's single event loop: requests pass one at a time

            async def stream() -> None:
                while issued[0] < args.requests:
                    i = issued[0]
                    issued[0] += 1
                    req = worker_pb2.WorkerGenerateRequest(
                        request_id=f"r{i}", prompt_token_ids=_prompt(i, args.prompt),
                        sampling=common_pb2.SamplingParams(max_tokens=args.output,
                                                           temperature=0.0, ignore_eos=True))
                    sent = time.perf_counter()
                    if args.arrival_stagger_ms:
                        async with front:
                            await asyncio.sleep(args.arrival_stagger_ms / 1e3)
                    first = True
                    async for _ in stub.Generate(req):
                        if first:
                            ttft.append(time.perf_counter() - sent)
                            first = False

            start = time.perf_counter()
            await asyncio.gather(*(stream() for _ in range(args.concurrency)))
            conn.send((time.perf_counter() - start, ttft))

    asyncio.run(run())


async def _from_process(target, *args):  # noqa: ANN001, ANN202
    """Run ``target(*args, conn)`` in a spawned process; what it sends back."""
    conn, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, child))
    proc.start()
    while not conn.poll():
        await asyncio.sleep(0.05)
    got = conn.recv()
    proc.join()
    return got


async def through_worker(args) -> dict:
    engine, device = modelled_engine(args)
    async with served_engine(engine) as (address, _):
        wall, ttft = await _from_process(_client, address, args)
    r = _result("through the worker", wall, args, device)
    r["ttft_p50_ms"] = 1e3 * statistics.median(ttft)
    return r


def _bench(url: str, args, conn) -> None:
    cfg = BenchConfig(url=url, num_prompts=args.requests, concurrency=args.concurrency,
                      input_len=args.prompt, output_len=args.output, progress=False)
    summary = asyncio.run(run_bench(cfg))
    conn.send((summary["duration_s"], summary["ttft_ms"]["p50"], summary["failed"]))


async def through_router(args) -> dict:
    """The same worker behind a real router process (HTTP, tokenizer, prefix routing), loaded
    by `moeserve bench` in its own process."""
    engine, device = modelled_engine(args)
    async with served_engine(engine, "decode") as (address, _):
        wall, ttft_p50, failed, router_us = await _behind_router(address, args)
    r = _result("through the router", wall, args, device)
    r["ttft_p50_ms"] = ttft_p50
    print(f"router: {router_us:.0f} us of CPU per output token", flush=True)
    if failed:
        r["path"] += f" ({failed} failed)"
    return r


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _behind_router(address: str, args) -> tuple[float, float, int, float]:
    """A router process in front of the worker at ``address``, loaded by the bench: (wall s,
    TTFT p50 ms, failed requests, the router's CPU microseconds per output token)."""
    profile = ["-m", "cProfile", "-o", args.profile_router] if args.profile_router else []
    router = await asyncio.create_subprocess_exec(
        sys.executable, *profile, "-m", "moeserve.cli", "router",
        "--model", str(ensure_tiny_checkpoint()), "--decode", address, "--port", "0",
        "--insecure-worker-plane",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    drain = None
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(router.stdout.readline(), 60)).decode()
            if not line:
                raise RuntimeError("the router exited during start-up")
            m = LISTEN_LINE.search(line)
            url = m.group(2) if m else None
        drain = asyncio.ensure_future(router.stdout.read())  # keep its pipe from filling
        async with httpx.AsyncClient() as client:  # ready once it has seen the worker
            for _ in range(200):
                if (await client.get(f"{url}/health")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        cpu0 = _cpu_seconds(router.pid)
        wall, ttft_p50, failed = await _from_process(_bench, url, args)
        router_us = (_cpu_seconds(router.pid) - cpu0) / (args.requests * args.output) * 1e6
        return wall, ttft_p50, failed, router_us
    finally:
        router.terminate()
        await router.wait()
        if drain is not None:
            drain.cancel()


def _result(path: str, wall: float, args, device: ModelledDevice) -> dict:
    mixed = [p for p, _ in device.steps if p]
    return {"path": path, "stagger_ms": args.arrival_stagger_ms,
            "host_ms": args.mixed_host_ms, "tok_s": args.requests * args.output / wall,
            "decode_steps": len(device.steps) - len(mixed), "mixed_steps": len(mixed),
            "prompt_per_mixed": statistics.fmean(mixed) if mixed else 0.0,
            "device_busy": sum(step_ms(p, r) for p, r in device.steps) / 1e3 / wall}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--output", type=int, default=100)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--arrival-stagger-ms", type=float, nargs="+", default=[0.0],
                    help="through the worker: each request first waits its turn for this long, "
                         "as behind a router that handles one request at a time")
    ap.add_argument("--mixed-host-ms", type=float, nargs="+", default=[0.0],
                    help="of a mixed step's time, the host's launching with the GIL held")
    ap.add_argument("--router", action="store_true",
                    help="also through a router process, loaded by `moeserve bench`")
    ap.add_argument("--profile-router", metavar="PATH",
                    help="run that router under cProfile, its stats written to PATH")
    args = ap.parse_args()
    rows = []
    for host_ms in args.mixed_host_ms:
        for stagger_ms in args.arrival_stagger_ms:
            cell = argparse.Namespace(**{**vars(args), "mixed_host_ms": host_ms,
                                         "arrival_stagger_ms": stagger_ms})
            if stagger_ms == args.arrival_stagger_ms[0]:
                rows.append(engine_alone(cell))
                if args.router:
                    rows.append(await through_router(cell))
            rows.append(await through_worker(cell))
    print("| path | mixed step host ms | arrival stagger ms | output tok/s | mixed steps | "
          "prompt tokens a mixed step | decode steps | device busy | TTFT p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ttft = f"{r['ttft_p50_ms']:.0f}" if "ttft_p50_ms" in r else ""
        stagger = f"{r['stagger_ms']:g}" if r["path"] == "through the worker" else ""
        print(f"| {r['path']} | {r['host_ms']:g} | {stagger} | {r['tok_s']:.0f} | "
              f"{r['mixed_steps']} | {r['prompt_per_mixed']:.0f} | {r['decode_steps']} | "
              f"{r['device_busy']:.0%} | {ttft} |")


if __name__ == "__main__":
    asyncio.run(main())
