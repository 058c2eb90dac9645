"""Decode and prefill of a DeepSeek-V2-Lite-shaped random checkpoint against the roofline.

One run measures the two ceilings on the device (device-to-device copy bandwidth counting
bytes read + written; bf16 8192^3 matmul rate), then:
- decode step time at batch 1..256 and context 1k / 4k. Contexts are injected through the
  remote-KV hook (the decode side of P/D hand-off) into a KV cache filled with random values,
  so no prefill runs first. Roofline = bytes a step must read (attention and dense weights,
  shared experts, the routed experts actually hit, lm_head, the KV of every sequence) over the
  measured bandwidth. Experts hit are counted with hooks on the routers in one real step.
- prefill of one 1k / 4k / 8k prompt (median of 5 after a warm-up); roofline = FLOPs (2 x
  active parameters x tokens + causal attention in the MHA form) over the measured matmul rate.
Each for the kernel path (Triton + CUDA graphs, async scheduling: the serving engine), the
same with async scheduling off (decode at 1k context only: what overlapping the host's work
with the device's saves), the plain-torch path (CUDA graphs) and HuggingFace transformers
(eager), in that order, one engine in memory at a time.

  python benchmarks/gpu_roofline.py --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as `python benchmarks/gpu_roofline.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from moeserve.common.model_config import ModelConfig
from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine, freeze_startup_heap

try:  # python -m benchmarks.gpu_roofline, or imported by another benchmark
    from benchmarks.device_timing import elapsed, measure_peaks
except ModuleNotFoundError:  # python benchmarks/gpu_roofline.py
    from device_timing import elapsed, measure_peaks  # type: ignore[no-redef]


def _param_bytes(model: torch.nn.Module, pred) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if pred(n))


def _stacked_shared_experts(model: torch.nn.Module) -> int:
    """Shared experts the kernel path stacked into the routed experts' weights (named
    `.experts.`, read every step like the dense weights)."""
    return sum(m.num_shared_slots for m in model.modules() if type(m).__name__ == "Experts")


def decode_bytes(engine: LLMEngine, batch: int, context: int, experts_hit: list[int]) -> int:
    """Bytes one decode step must read: every non-routed weight (shared experts included,
    wherever the kernel path keeps them), the routed experts hit (per layer), and each
    sequence's KV."""
    model = engine.runner.model
    c = engine.model_config
    dense = _param_bytes(model, lambda n: ".experts." not in n and "embed_tokens" not in n)
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * engine.runner.dtype.itemsize
    stacked_shared = _stacked_shared_experts(model)
    kv = batch * context * c.num_hidden_layers * c.kv_dim * engine.runner.dtype.itemsize
    return dense + per_expert * (sum(experts_hit) + stacked_shared) + kv


def prefill_flops(c: ModelConfig, active_params: int, tokens: int) -> float:
    """Matmul FLOPs of the cheapest form: the MHA form (q.k over the 192-wide qk head, p.v over
    the 128-wide v head, causal), 3.4x fewer attention FLOPs than the absorbed form's 576 / 512.
    The K/V expansion through kv_b_proj is inside 2 x active_params x tokens."""
    per_head = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim
    attn = c.num_hidden_layers * 2 * c.num_attention_heads * per_head * tokens * tokens / 2
    return 2 * active_params * tokens + attn


def active_params(engine: LLMEngine) -> int:
    c = engine.model_config
    model = engine.runner.model
    total = sum(p.numel() for n, p in model.named_parameters()
                if ".experts." not in n and "embed_tokens" not in n)
    stacked_shared = _stacked_shared_experts(model)
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    return total + (n_moe * c.num_experts_per_tok + stacked_shared) * per_expert


def count_experts_hit(engine: LLMEngine) -> tuple[list[int], list]:
    hits: list[int] = []
    routed = engine.model_config.n_routed_experts

    def hook(_module, _inputs, output):  # routed experts only: shared slots follow them
        ids = output[1]
        hits.append(int(ids[ids < routed].unique().numel()))

    handles = [m.register_forward_hook(hook) for m in engine.runner.model.modules()
               if type(m).__name__ == "Gate"]
    return hits, handles


def inject(engine: LLMEngine, batch: int, context: int, tag: str, steps: int) -> list[str]:
    ids = []
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        rid = f"{tag}-{i}"
        prompt = [(7 * i + j) % 20000 + 10 for j in range(context)]
        if engine.add_remote_kv_request(rid, prompt, params) is None:
            raise MemoryError(f"KV cache too small for batch {batch} x {context}")
        # Each sequence gets its own first token, as after a real prefill: identical tokens
        # route alike and would understate the experts a step reads.
        engine.finish_remote_kv(rid, (7919 * i + 11) % 20000 + 10)
        ids.append(rid)
    return ids


def release(engine: LLMEngine, ids: list[str]) -> None:
    """Abort the injected sequences and step past the step scheduled ahead, which holds
    their blocks until it has run (so the next batch finds the pool empty)."""
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def timed_decode(engine: LLMEngine, steps: int) -> tuple[float, list[int]]:
    """(seconds per step over ``steps`` after two warm-up steps, distinct routed experts hit
    per MoE layer in one more step) of the sequences running in ``engine``."""
    for _ in range(2):
        engine.step()

    def run() -> None:
        for _ in range(steps):
            engine.step()

    step = elapsed(run) / steps
    # Forward hooks do not fire inside a CUDA-graph replay: count the experts on one eager
    # step right after the timed ones (same sequences, same token diversity).
    graphs, engine.runner.graphs = engine.runner.graphs, None
    hits, handles = count_experts_hit(engine)
    engine.step()
    for h in handles:
        h.remove()
    engine.runner.graphs = graphs
    return step, hits


def timed_prefills(engine: LLMEngine, tag: str, prompt: list[int], reps: int) -> list[float]:
    """Seconds of ``reps`` prefills of ``prompt`` (one token each), after one untimed run
    that compiles the kernel variants of its length."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def run() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    times = []
    for rep in range(1 + reps):
        engine.add_request(f"{tag}-{rep}", prompt, params)
        times.append(elapsed(run))
    return times[1:]


def bench_decode(engine: LLMEngine, label: str, args, peaks, rows) -> None:
    for context in args.contexts:
        for batch in args.batch_sizes:
            ids = inject(engine, batch, context, f"{label}-{batch}-{context}", args.steps)
            step, hits = timed_decode(engine, args.steps)
            release(engine, ids)
            floor = decode_bytes(engine, batch, context, hits) / (peaks["copy_GBps"] * 1e9)
            rows.append({"path": label, "phase": "decode", "batch": batch, "context": context,
                         "step_ms": step * 1e3, "tokens_per_s": batch / step,
                         "roofline_ms": floor * 1e3, "x_roofline": step / floor,
                         "experts_hit_per_layer": sum(hits) / max(len(hits), 1)})
            print(rows[-1], flush=True)


def bench_prefill(engine: LLMEngine, label: str, args, peaks, rows) -> None:
    flops_active = active_params(engine)
    for n in args.prefill_lens:
        prompt = [(13 * j) % 20000 + 10 for j in range(n)]
        # The median of five: Python's launching of ~2000 kernels varies from run to run.
        times = timed_prefills(engine, f"{label}-p{n}", prompt, args.prefill_reps)
        dt = statistics.median(times)
        flops = prefill_flops(engine.model_config, flops_active, n)
        rows.append({"path": label, "phase": "prefill", "tokens": n, "seconds": dt,
                     "seconds_min": min(times), "seconds_max": max(times),
                     "tokens_per_s": n / dt, "TFLOPs": flops / dt / 1e12,
                     "frac_of_matmul_peak": flops / dt / 1e12 / peaks["bf16_TFLOPs"]})
        print(rows[-1], flush=True)


def bench_hf(model_dir: str, args, rows) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    for batch in args.hf_batch_sizes:
        ids = torch.randint(10, 20000, (batch, args.hf_context), device="cuda")

        @torch.no_grad()
        def gen(n: int, ids=ids) -> float:
            return elapsed(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                               do_sample=False, pad_token_id=0))

        gen(2)
        step = (gen(1 + args.steps) - gen(1)) / args.steps
        rows.append({"path": "transformers", "phase": "decode", "batch": batch,
                     "context": args.hf_context, "step_ms": step * 1e3,
                     "tokens_per_s": batch / step})
        print(rows[-1], flush=True)
    for n in args.prefill_lens:
        ids = torch.randint(10, 20000, (1, n), device="cuda")
        with torch.no_grad():
            hf(ids[:, :128])
            dt = elapsed(lambda ids=ids: hf(ids))
        rows.append({"path": "transformers", "phase": "prefill", "tokens": n, "seconds": dt,
                     "tokens_per_s": n / dt})
        print(rows[-1], flush=True)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--contexts", type=_ints, default=[1024, 4096])
    ap.add_argument("--prefill-lens", type=_ints, default=[1024, 4096, 8192])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prefill-reps", type=int, default=5,
                    help="timed prefills per length (after one warm-up); the median is shown")
    ap.add_argument("--paths", default="kernels,sync,torch,transformers",
                    help="kernels: the serving engine; sync: the same with async scheduling "
                         "off (decode only); torch: the plain-torch path; transformers: HF")
    ap.add_argument("--torch-contexts", type=_ints, default=[1024])
    ap.add_argument("--torch-batch-sizes", type=_ints, default=[1, 32, 128])
    ap.add_argument("--sync-batch-sizes", type=_ints, default=[1, 64, 256])
    ap.add_argument("--hf-batch-sizes", type=_ints, default=[1, 32])
    ap.add_argument("--hf-context", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    peaks = measure_peaks()
    print(peaks, flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = str(make_checkpoint(Path(tmp) / "v2lite", "v2-lite", layers=args.layers,
                                        dtype="bfloat16", device="cuda"))
        print(f"checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
        paths = args.paths.split(",")
        for label in ("kernels", "sync", "torch"):
            if label not in paths:
                continue
            sub = argparse.Namespace(**vars(args))
            if label == "torch":
                sub.contexts, sub.batch_sizes = args.torch_contexts, args.torch_batch_sizes
            if label == "sync":
                sub.contexts, sub.batch_sizes = args.contexts[:1], args.sync_batch_sizes
            engine = LLMEngine(EngineConfig(
                model=model_dir, device="cuda", dtype="bfloat16", max_model_len=8192 + 64,
                max_num_seqs=max(sub.batch_sizes), max_num_batched_tokens=8192,
                enable_prefix_caching=False, gpu_memory_utilization=0.92,
                kernel_backend="torch" if label == "torch" else "auto",
                async_scheduling="off" if label == "sync" else "auto",
                cuda_graph_max_context=max(sub.contexts) + 64,
            ))
            engine.kv_cache.normal_()  # never time attention on zeros
            freeze_startup_heap()  # as the worker server does: no full-GC pauses in timings
            bench_decode(engine, label, sub, peaks, rows)
            if label != "sync":
                bench_prefill(engine, label, sub, peaks, rows)
            from moeserve import kernels
            print({op: kernels.last_path(op) for op in ("mla_decode", "mla_prefill",
                                                         "fused_moe")}, flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        if "transformers" in paths:
            bench_hf(model_dir, args, rows)
    print(f"\n{torch.cuda.get_device_name()}  copy {peaks['copy_GBps']:.0f} GB/s  "
          f"bf16 matmul {peaks['bf16_TFLOPs']:.0f} TFLOP/s")
    print(f"{'path':<13}{'phase':<8}{'batch':>6}{'ctx/len':>8}{'ms':>9}{'tok/s':>11}"
          f"{'floor ms':>9}{'x floor':>8}{'%peak':>7}")
    for r in rows:
        size = r.get("context", r.get("tokens"))
        ms = r.get("step_ms", r.get("seconds", 0) * 1e3)
        floor = f"{r['roofline_ms']:.2f}" if "roofline_ms" in r else ""
        xf = f"{r['x_roofline']:.2f}" if "x_roofline" in r else ""
        pk = f"{100 * r['frac_of_matmul_peak']:.0f}" if "frac_of_matmul_peak" in r else ""
        print(f"{r['path']:<13}{r['phase']:<8}{r.get('batch', 1):>6}{size:>8}{ms:>9.2f}"
              f"{r['tokens_per_s']:>11.0f}{floor:>9}{xf:>8}{pk:>7}")
    if args.out:
        Path(args.out).write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
