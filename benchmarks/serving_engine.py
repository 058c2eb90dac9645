"""The engine alone under the serving workload: where a step's time goes when prefills and
decodes share the GPU.

A closed loop keeps `--concurrency` requests of `--prompt` random tokens and `--output`
generated tokens (ignore_eos) running, adding one as each finishes, until `--requests` are
done: the load `moeserve bench` puts on a worker, without router, HTTP or gRPC. Per step it
records the wall time and what the step held (prompt tokens, decode rows), then prints the
output rate, the time split between pure-decode and mixed steps, and, for a window of steady
mixed steps, the kernel time under torch.profiler against the wall time and the host's top
functions (cProfile). One line per `--budgets` value: the step budget
(max_num_batched_tokens) is the main knob between decode latency and prefill efficiency.

  python benchmarks/serving_engine.py --layers 27 --budgets 2048 8192
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine, freeze_startup_heap


def closed_loop(engine: LLMEngine, args, tag: str, profile_window: bool) -> dict:
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
    started, done, issued = {}, 0, 0
    ttft, e2e = [], []
    first_seen: set[str] = set()

    def add() -> None:
        nonlocal issued
        rid = f"{tag}-{issued}"
        top = min(20000, engine.model_config.vocab_size - 1)
        engine.add_request(rid, [rng.randrange(10, top) for _ in range(args.prompt)], params)
        started[rid] = time.perf_counter()
        issued += 1

    for _ in range(min(args.concurrency, args.requests)):
        add()
    steps: list[tuple[float, int, int]] = []  # (seconds, prompt tokens, output tokens)
    prev = engine.stats()
    replays0 = getattr(getattr(engine.runner, "mixed_graphs", None), "replays", 0)
    t0 = time.perf_counter()
    prof_at = args.requests // 2
    while engine.has_unfinished_requests():
        if profile_window and done >= prof_at:
            profile_steps(engine, args.profile_steps)
            profile_window = False
        s = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        cur = engine.stats()
        steps.append((now - s, cur.prompt_tokens_computed - prev.prompt_tokens_computed,
                      cur.generation_tokens - prev.generation_tokens))
        prev = cur
        for o in outs:
            if o.new_token_ids and o.request_id not in first_seen:
                first_seen.add(o.request_id)
                ttft.append(now - started[o.request_id])
            if o.finished:
                e2e.append(now - started.pop(o.request_id))
                done += 1
                if issued < args.requests:
                    add()
    wall = time.perf_counter() - t0
    graphs = getattr(engine.runner, "mixed_graphs", None)
    if graphs is not None:
        print(f"{tag}: mixed steps replayed as CUDA graphs: {graphs.replays - replays0}")
    out_tokens = sum(s[2] for s in steps)
    decode = [s for s in steps if s[1] == 0]
    mixed = [s for s in steps if s[1] > 0]
    return {
        "wall_s": wall, "out_tok_s": out_tokens / wall, "steps": len(steps),
        "decode_steps": len(decode), "decode_ms": 1e3 * _mean([s[0] for s in decode]),
        "decode_rows": _mean([s[2] for s in decode]), "decode_share": sum(
            s[0] for s in decode) / wall, "mixed_steps": len(mixed),
        "mixed_ms": 1e3 * _mean([s[0] for s in mixed]),
        "mixed_prompt_tok": _mean([s[1] for s in mixed]),
        "mixed_share": sum(s[0] for s in mixed) / wall,
        "ttft_p50": statistics.median(ttft), "ttft_p99": _pct(ttft, 0.99),
        "tpot_p50": statistics.median([(e - t) / max(1, args.output - 1)
                                       for e, t in zip(e2e, ttft, strict=False)]),
    }


def profile_steps(engine: LLMEngine, n: int) -> None:
    """Over the next n steps that admit waiting prompts (mixed steps): kernel time against
    wall time, the ops ranked by host time (torch.profiler) and the host's top functions
    (cProfile)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    host = cProfile.Profile()
    kernels: dict[str, float] = defaultdict(float)
    cpu_ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    wall = tokens = launches = 0.0
    taken = 0
    while taken < n and engine.has_unfinished_requests():
        if not engine.scheduler.num_waiting:
            engine.step()
            continue
        sync()
        before = engine.stats().prompt_tokens_computed
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            host.enable()
            engine.step()
            host.disable()
            sync()
            wall += time.perf_counter() - start
        tokens += engine.stats().prompt_tokens_computed - before
        taken += 1
        for evt in prof.key_averages():
            if evt.device_type.name == "CUDA" and evt.device_time_total > 0:
                kernels[evt.key] += evt.device_time_total
                launches += evt.count
            elif evt.device_type.name == "CPU" and evt.self_cpu_time_total > 0:
                cpu_ops[evt.key][0] += evt.self_cpu_time_total
                cpu_ops[evt.key][1] += evt.count
    total = sum(kernels.values()) / 1e6
    print(f"\nprofile of {taken} mixed steps ({tokens:.0f} prompt tokens): wall "
          f"{wall * 1e3 / max(taken, 1):.1f} ms a step, kernels {total * 1e3 / max(taken, 1):.1f}"
          f" ms ({100 * total / max(wall, 1e-9):.0f}%), {launches / max(taken, 1):.0f} kernels")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {v / 1e3 / max(taken, 1):9.2f} ms  {k[:100]}")
    print("host time by op (self, per step):")
    for k, (us, cnt) in sorted(cpu_ops.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"  {us / 1e3 / max(taken, 1):9.2f} ms  x{cnt / max(taken, 1):<6.0f} {k[:90]}")
    pstats.Stats(host).sort_stats("tottime").print_stats(30)


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else 0.0


def _pct(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-lite")
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--checkpoint", help="an existing checkpoint instead of a new random one")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8192])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--output", type=int, default=100)
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    ap.add_argument("--warmup", action="store_true",
                    help="build and warm the engine as a worker does (worker/warmup.py) instead "
                         "of a warm-up load, and report the compilations each load then paid")
    ap.add_argument("--engine-arg", action="append", default=[],
                    help="extra EngineConfig field, name=value (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.checkpoint or str(make_checkpoint(
            Path(tmp) / "m", args.preset, layers=args.layers, dtype="bfloat16",
            device=args.device))
        extra = {}
        for item in args.engine_arg:
            key, _, value = item.partition("=")
            extra[key] = (int(value) if value.lstrip("-").isdigit()
                          else {"true": True, "false": False}.get(value.lower(), value))
        rows = []
        for budget in args.budgets:
            config = EngineConfig(model=model, device=args.device, dtype="auto",
                                  max_model_len=args.prompt + args.output + 64,
                                  max_num_batched_tokens=budget,
                                  max_num_seqs=max(256, args.concurrency),
                                  enable_prefix_caching=False, **extra)
            if args.warmup:
                from moeserve.worker.compile_watch import WATCH
                from moeserve.worker.warmup import build_ready_engine

                engine = build_ready_engine(config)
                print(f"budget {budget}: start-up {WATCH.startup_seconds}")
            else:
                engine = LLMEngine(config)
            freeze_startup_heap()
            if args.warmup:  # the first load after ready, then the measured one
                first = closed_loop(engine, args, f"first{budget}", False)
                print(f"budget {budget}: first load {first['out_tok_s']:.0f} tok/s, "
                      f"compilations after ready {WATCH.counts_after_ready()}")
            else:
                closed_loop(engine, argparse.Namespace(**{**vars(args), "requests": 2 *
                                                          args.concurrency}), "warm", False)
            r = closed_loop(engine, args, f"b{budget}", not args.no_profile)
            if args.warmup:
                print(f"budget {budget}: compilations after ready, both loads "
                      f"{WATCH.counts_after_ready()}")
            rows.append((budget, r))
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print("\n| budget | out tok/s | TTFT p50 / p99 s | TPOT p50 ms | decode steps "
              "(ms, rows, share) | mixed steps (ms, prompt tok, share) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for budget, r in rows:
            print(f"| {budget} | {r['out_tok_s']:.0f} | {r['ttft_p50']:.2f} / "
                  f"{r['ttft_p99']:.2f} | {1e3 * r['tpot_p50']:.1f} | {r['decode_steps']} "
                  f"({r['decode_ms']:.1f}, {r['decode_rows']:.0f}, {r['decode_share']:.0%}) | "
                  f"{r['mixed_steps']} ({r['mixed_ms']:.1f}, {r['mixed_prompt_tok']:.0f}, "
                  f"{r['mixed_share']:.0%}) |")


if __name__ == "__main__":
    main()
