"""Where a decode step's GPU time goes: torch.profiler over CUDA-graph replays.

Builds a V2-Lite-shaped random checkpoint (fewer layers are enough: layers repeat), injects
`--batch` sequences of `--context` tokens, and prints the kernels ranked by device time per
step, grouped into attention / MoE / dense / other by kernel name.

  python benchmarks/profile_decode.py --layers 8 --batch 1 --context 1024
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# Run as `python benchmarks/profile_decode.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine, freeze_startup_heap

_GROUPS = [("attention", ("mla", "rope_cache", "flash", "attention")),
           ("moe", ("fused_moe", "moe_", "sort", "scatter", "searchsorted", "topk", "sigmoid")),
           ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "matmul", "bmm")),
           ("norm/elementwise", ("elementwise", "reduce", "norm", "vectorized", "copy"))]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in _GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--preset", default="v2-lite", help="make-checkpoint preset (v2-lite, v3)")
    ap.add_argument("--fp8", action="store_true",
                    help="an fp8 checkpoint (block scales), served resident in fp8 (W8A8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--host", action="store_true",
                    help="also print the host-side Python profile (cProfile) of the steps")
    ap.add_argument("--find-syncs", action="store_true",
                    help="list the lines where a step waits for the device (torch's sync "
                         "debug mode) in one decode step of each batch and each prefill")
    ap.add_argument("--prefill", type=int, nargs="*", default=[],
                    help="also profile one prefill of each of these prompt lengths")
    args = ap.parse_args()
    from benchmarks.gpu_roofline import inject, release

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_checkpoint(Path(tmp) / "m", args.preset, layers=args.layers,
                                    dtype="bfloat16", fp8=args.fp8, device="cuda"))
        longest = max([args.context, *args.prefill])
        engine = LLMEngine(EngineConfig(model=model, device="cuda", dtype="bfloat16",
                                        max_model_len=longest + 64,
                                        max_num_batched_tokens=max([8192, *args.prefill]),
                                        max_num_seqs=max(args.batch),
                                        cuda_graph_max_context=args.context + 64,
                                        quantization="fp8" if args.fp8 else "auto",
                                        enable_prefix_caching=False))
        engine.kv_cache.normal_()
        freeze_startup_heap()  # as the worker server does: no full-GC pauses in timings
        for batch in args.batch:
            ids = inject(engine, batch, args.context, f"p{batch}", 3 * args.steps + 4)
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()

            def steps() -> None:
                for _ in range(args.steps):
                    engine.step()
                torch.cuda.synchronize()

            start = time.perf_counter()
            steps()
            wall_ms = (time.perf_counter() - start) / args.steps * 1e3
            # The same step's graph replayed back to back: the GPU's share of the wall time.
            graph = engine.runner.graphs.graph_for(batch)
            start = time.perf_counter()
            for _ in range(args.steps):
                graph.replay()
            torch.cuda.synchronize()
            replay_ms = (time.perf_counter() - start) / args.steps * 1e3
            if args.host:
                host_profile(steps)
            if args.find_syncs:
                find_syncs(engine.step, f"decode batch {batch}")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                steps()
            release(engine, ids)
            report(prof, args.steps, f"batch {batch}, context {args.context}, {args.layers} "
                   f"layers, wall {wall_ms:.2f} ms per step, bare replay {replay_ms:.2f} ms")
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for n in args.prefill:
            prompt = [(13 * j) % 20000 + 10 for j in range(n)]

            span = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

            def run(tag: str, prompt: list[int] = prompt, span: list = span) -> float:
                engine.add_request(tag, prompt, params)
                torch.cuda.synchronize()
                start = time.perf_counter()
                span[0].record()
                while engine.has_unfinished_requests():
                    engine.step()
                span[1].record()
                torch.cuda.synchronize()
                return (time.perf_counter() - start) * 1e3

            run(f"warm-{n}")
            before = torch.cuda.memory_stats()
            wall_ms = run(f"timed-{n}")
            after = torch.cuda.memory_stats()
            # cudaMalloc retries flush the allocator's cache (cudaFree: a device-wide wait)
            # stream time from the first queued kernel to the last: wall time above it is
            # the host's, a slow GPU shows here
            print(f"prefill {n}: wall {wall_ms:.2f} ms, stream span "
                  f"{span[0].elapsed_time(span[1]):.2f} ms, allocator retries "
                  f"{after['num_alloc_retries'] - before['num_alloc_retries']}, cudaMallocs "
                  f"{after['num_device_alloc'] - before['num_device_alloc']}, peak "
                  f"{after['allocated_bytes.all.peak'] / 2**30:.2f} GiB")
            if args.host:
                host_profile(run, f"host-{n}")
            if args.find_syncs:
                find_syncs(run, f"prefill {n}", f"sync-{n}")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(f"prof-{n}")
            report(prof, 1, f"prefill {n} tokens, {args.layers} layers, wall {wall_ms:.2f} ms")


def find_syncs(fn, title: str, *args) -> None:
    """Print each source line that made the host wait for the device while ``fn(*args)``
    ran (the final wait for a step's sampled tokens is expected and not flagged: it is an
    event synchronize)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = defaultdict(int)
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{w.filename}:{w.lineno}"] += 1
    print(f"\n{title}: {sum(sites.values())} synchronizing calls")
    for site, n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  x{n:<4} {site}")


def host_profile(fn, *args) -> None:
    """Where the host's time goes (scheduler, input copies, sampling, waits): cProfile of
    ``fn(*args)``, top functions by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn, *args)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def report(prof, steps: int, title: str) -> None:
    """Kernels ranked by device time per step, grouped as in _GROUPS."""
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        if evt.device_type.name == "CUDA" and evt.device_time_total > 0:
            kernels[evt.key] += evt.device_time_total / steps
            counts[evt.key] += evt.count // steps
    total = sum(kernels.values())
    groups: dict[str, float] = defaultdict(float)
    for k, v in kernels.items():
        groups[group_of(k)] += v
    print(f"\n{title}: {total / 1e3:.2f} ms GPU per step, "
          f"{sum(counts.values())} kernels/step")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<18}{v / 1e3:8.3f} ms  {100 * v / total:5.1f}%")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {v:9.1f} us  x{counts[k]:<4} {k[:90]}")


if __name__ == "__main__":
    main()
