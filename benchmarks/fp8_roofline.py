"""DeepSeek-V3-shaped fp8 checkpoint on one GPU: fp8 resident (W8A8) against its ceilings and
against the same checkpoint dequantized to bf16 at load, in one run (issue 19 item 4).

The checkpoint has V3's real per-layer sizes (`make_checkpoint(preset="v3", fp8=True)`: hidden
7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, 256 routed experts top-8 in 8 groups /
top-4 groups, 1 shared expert, moe_intermediate 2048, a first dense layer of 18432) and
--layers layers, written on the GPU machine itself. One run measures:
- the ceilings: device-to-device copy bandwidth (bytes read + written), the bf16 matmul rate
  and the fp8 one (torch._scaled_mm, per-tensor scales, 8192^3);
- decode step time at each batch and context next to the HBM floor: the bytes a step must
  read (every non-routed weight in the dtype it is held in, the routed experts the timed steps
  hit with their scales, each sequence's KV) over the measured copy bandwidth;
- prefill of one prompt next to the fp8 matmul rate (FLOPs as in gpu_roofline.prefill_flops);
- the same for --quantization dequant (bf16) as the baseline, one engine in memory at a time;
- W8A8 against the exact path: logits of every position of one prompt through both engines,
  cosine over all logits and top-1 agreement.

  python benchmarks/fp8_roofline.py --layers 5 --out fp8.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as `python benchmarks/fp8_roofline.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.device_timing import mean_seconds
from benchmarks.gpu_roofline import (
    active_params,
    count_experts_hit,
    inject,
    measure_peaks,
    prefill_flops,
    release,
)
from benchmarks.logit_compare import all_logits, compare_logits
from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine, freeze_startup_heap


def fp8_matmul_tflops() -> float:
    """torch._scaled_mm on e4m3 8192^3 (per-tensor scales, bf16 out): the fp8 tensor-core
    rate block-scaled GEMMs are measured against."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")

    def mm():
        return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    return 2 * n**3 / mean_seconds(mm) / 1e12


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def step_bytes(engine: LLMEngine, batch: int, context: int, experts_hit: list[int]) -> int:
    """Bytes one decode step must read, each tensor in the dtype the engine holds it in."""
    model = engine.runner.model
    c = engine.model_config
    dense = _bytes(p for n, p in model.named_parameters()
                   if ".experts." not in n and "embed_tokens" not in n)
    per_expert, stacked_shared = 0, 0
    for m in model.modules():
        if type(m).__name__ == "Experts":
            per_expert = _bytes([m.w13[0], m.w2[0]]) + (
                _bytes([m.w13_scale[0], m.w2_scale[0]]) if m.w13_scale is not None else 0)
            stacked_shared += m.num_shared_slots
    kv = batch * context * c.num_hidden_layers * c.kv_dim * engine.runner.dtype.itemsize
    return dense + per_expert * (sum(experts_hit) + stacked_shared) + kv


def bench_decode(engine: LLMEngine, label: str, args, peaks, rows) -> None:
    for context in args.contexts:
        for batch in args.batch_sizes:
            ids = inject(engine, batch, context, f"{label}-{batch}-{context}", args.steps)
            for _ in range(2):
                engine.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            step = (time.perf_counter() - t) / args.steps
            graphs, engine.runner.graphs = engine.runner.graphs, None  # hooks: eager step
            hits, handles = count_experts_hit(engine)
            engine.step()
            for h in handles:
                h.remove()
            engine.runner.graphs = graphs
            release(engine, ids)
            floor = step_bytes(engine, batch, context, hits) / (peaks["copy_GBps"] * 1e9)
            rows.append({"path": label, "phase": "decode", "batch": batch, "context": context,
                         "step_ms": step * 1e3, "tokens_per_s": batch / step,
                         "floor_ms": floor * 1e3, "x_floor": step / floor,
                         "experts_hit_per_layer": sum(hits) / max(len(hits), 1)})
            print(rows[-1], flush=True)


def bench_prefill(engine: LLMEngine, label: str, args, peaks, rows) -> None:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    flops_active = active_params(engine)
    rate = peaks["fp8_TFLOPs"] if label == "fp8" else peaks["bf16_TFLOPs"]
    for n in args.prefill_lens:
        prompt = [(13 * j) % 20000 + 10 for j in range(n)]
        times = []
        for rep in range(1 + args.prefill_reps):  # the first compiles kernel variants
            engine.add_request(f"{label}-p{n}-{rep}", prompt, params)
            torch.cuda.synchronize()
            t = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        dt = statistics.median(times[1:])
        tflops = prefill_flops(engine.model_config, flops_active, n) / dt / 1e12
        rows.append({"path": label, "phase": "prefill", "tokens": n, "seconds": dt,
                     "tokens_per_s": n / dt, "TFLOPs": tflops,
                     "frac_of_fp8_matmul": tflops / peaks["fp8_TFLOPs"],
                     "frac_of_own_matmul": tflops / rate})
        print(rows[-1], flush=True)


def run_engine(model_dir: str, label: str, args, peaks, rows, prompt) -> torch.Tensor:
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=model_dir, device="cuda", dtype="bfloat16", max_model_len=8192 + 64,
        max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=8192,
        enable_prefix_caching=False, gpu_memory_utilization=0.92,
        quantization="fp8" if label == "fp8" else "dequant",
        cuda_graph_max_context=max(args.contexts) + 64,
    ))
    weights = {}
    for p in engine.runner.model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        weights[key] = weights.get(key, 0) + p.numel() * p.element_size()
    print(f"{label}: engine up in {time.perf_counter() - t0:.0f} s, weights "
          f"{ {k: f'{v / 2**30:.1f} GiB' for k, v in weights.items()} }, "
          f"{engine.runner.num_blocks} KV blocks", flush=True)
    rows.append({"path": label, "phase": "weights", "bytes_by_dtype": weights,
                 "kv_blocks": engine.runner.num_blocks})
    engine.kv_cache.normal_()  # never time attention on zeros
    freeze_startup_heap()
    bench_decode(engine, label, args, peaks, rows)
    bench_prefill(engine, label, args, peaks, rows)
    from moeserve import kernels

    print({op: kernels.last_path(op) for op in kernels.dispatch.OPS}, flush=True)
    rows.append({"path": label, "phase": "kernel_paths",
                 **{op: kernels.last_path(op) for op in kernels.dispatch.OPS}})
    logits = all_logits(engine, prompt)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return logits


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 64, 256])
    ap.add_argument("--contexts", type=_ints, default=[1024, 4096])
    ap.add_argument("--prefill-lens", type=_ints, default=[1024, 4096, 8192])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--compare-tokens", type=int, default=1024)
    ap.add_argument("--paths", default="fp8,dequant")
    ap.add_argument("--ckpt-root", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where the random checkpoint is written (RAM-backed by default)")
    ap.add_argument("--gemm-sweep", action="store_true",
                    help="also time the fp8 GEMM kernel alone on V3's dense shapes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("moeserve.worker.runner").setLevel(logging.INFO)
    peaks = measure_peaks()
    peaks["fp8_TFLOPs"] = fp8_matmul_tflops()
    print(peaks, flush=True)
    rows: list[dict] = []
    result = {"peaks": peaks, "rows": rows, "args": vars(args),
              "device": torch.cuda.get_device_name()}
    if args.gemm_sweep:
        from benchmarks.tune_fp8_gemm import sweep

        sweep([1, 64, 8192], peaks["copy_GBps"], rows)
    prompt = [(7919 * j + 13) % 120000 + 10 for j in range(args.compare_tokens)]
    logits = {}
    with tempfile.TemporaryDirectory(dir=args.ckpt_root) as tmp:
        t0 = time.perf_counter()
        model_dir = str(make_checkpoint(Path(tmp) / "v3", "v3", layers=args.layers,
                                        dtype="bfloat16", fp8=True, device="cuda"))
        print(f"checkpoint ({args.layers} layers) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for label in args.paths.split(","):
            logits[label] = run_engine(model_dir, label, args, peaks, rows, prompt)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
    if len(logits) == 2:
        result["w8a8_vs_exact"] = compare_logits(logits["fp8"], logits["dequant"])
        print(result["w8a8_vs_exact"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}  copy {peaks['copy_GBps']:.0f} GB/s  bf16 "
          f"{peaks['bf16_TFLOPs']:.0f}  fp8 {peaks['fp8_TFLOPs']:.0f} TFLOP/s")
    print(f"{'path':<9}{'phase':<8}{'batch':>6}{'ctx/len':>8}{'ms':>9}{'tok/s':>10}"
          f"{'floor ms':>9}{'x floor':>8}{'%fp8mm':>7}")
    for r in rows:
        if r["phase"] not in ("decode", "prefill"):
            continue
        size = r.get("context", r.get("tokens"))
        ms = r.get("step_ms", r.get("seconds", 0) * 1e3)
        floor = f"{r['floor_ms']:.2f}" if "floor_ms" in r else ""
        xf = f"{r['x_floor']:.2f}" if "x_floor" in r else ""
        pk = f"{100 * r['frac_of_fp8_matmul']:.0f}" if "frac_of_fp8_matmul" in r else ""
        print(f"{r['path']:<9}{r['phase']:<8}{r.get('batch', 1):>6}{size:>8}{ms:>9.2f}"
              f"{r['tokens_per_s']:>10.0f}{floor:>9}{xf:>8}{pk:>7}")


if __name__ == "__main__":
    main()
