"""Where a decode step's GPU time goes: torch.profiler over CUDA-graph replays.

Builds a V2-Lite-shaped random checkpoint (fewer layers are enough: layers repeat), injects
`--batch` sequences of `--context` tokens, and prints the kernels ranked by device time per
step, grouped into attention / MoE / dense / other by kernel name.

  python benchmarks/profile_decode.py --layers 8 --batch 1 --context 1024
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine

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
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from benchmarks.gpu_roofline import inject

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_checkpoint(Path(tmp) / "m", "v2-lite", layers=args.layers,
                                    dtype="bfloat16", device="cuda"))
        engine = LLMEngine(EngineConfig(model=model, device="cuda", dtype="bfloat16",
                                        max_model_len=args.context + 64,
                                        max_num_seqs=max(args.batch),
                                        enable_prefix_caching=False))
        engine.kv_cache.normal_()
        for batch in args.batch:
            ids = inject(engine, batch, args.context, f"p{batch}", args.steps + 4)
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    engine.step()
                torch.cuda.synchronize()
            for rid in ids:
                engine.abort_request(rid)
            kernels: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            for evt in prof.key_averages():
                if evt.device_type.name == "CUDA" and evt.device_time_total > 0:
                    kernels[evt.key] += evt.device_time_total / args.steps
                    counts[evt.key] += evt.count // args.steps
            total = sum(kernels.values())
            groups: dict[str, float] = defaultdict(float)
            for k, v in kernels.items():
                groups[group_of(k)] += v
            print(f"\nbatch {batch}, context {args.context}, {args.layers} layers: "
                  f"{total / 1e3:.2f} ms GPU per step, {sum(counts.values())} kernels/step")
            for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
                print(f"  {g:<18}{v / 1e3:8.3f} ms  {100 * v / total:5.1f}%")
            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
                print(f"    {v:9.1f} us  x{counts[k]:<4} {k[:90]}")


if __name__ == "__main__":
    main()
