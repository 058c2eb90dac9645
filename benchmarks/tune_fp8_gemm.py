"""The block-fp8 Triton GEMM alone on DeepSeek-V3's dense shapes: the tiles, launch order and
K-loop variants `kernels.fp8_gemm` can take, at decode and prefill row counts, next to
torch._scaled_mm with per-tensor scales on the same shape (the fp8 tensor-core rate without
block scales) and the HBM floor (weight + activation bytes over the measured copy bandwidth).

  python benchmarks/tune_fp8_gemm.py --rows 64 8192 --out gemm.json

Activations are quantized before timing (the production path adds one quantization launch).
Variants that fail to compile on this Triton are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

# Run as `python benchmarks/tune_fp8_gemm.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from triton.testing import do_bench

from moeserve.kernels.fp8_gemm import (
    _tiles,
    per_token_group_quant,
    w8a8_block_fp8_matmul,
)

try:  # run as a module (python -m benchmarks.tune_fp8_gemm) or as a file
    from benchmarks.device_timing import measure_peaks
except ImportError:
    from device_timing import measure_peaks  # type: ignore[no-redef]

# (N, K) of V3's fp8 GEMMs: merged q_a + kv_a_proj_with_mqa, q_b, o_proj, the dense layer's
# merged gate + up and its down projection.
SHAPES = {"q_a+kv_a": (2112, 7168), "q_b": (24576, 1536), "o_proj": (7168, 16384),
          "dense_gate_up": (36864, 7168), "dense_down": (7168, 18432)}

# (BLOCK_M, BLOCK_N, num_warps, num_stages, group_m, warp_spec) per row count.
VARIANTS = {
    "small": [(16, 64, 4, 4, 1, False), (16, 32, 4, 4, 1, False), (16, 128, 4, 4, 1, False)],
    "decode": [(64, 64, 4, 4, 1, False), (64, 32, 4, 4, 1, False), (32, 64, 4, 5, 1, False),
               (64, 128, 4, 3, 1, False), (64, 64, 4, 3, 1, False)],
    "prefill": [(64, 128, 4, 3, 1, False), (64, 128, 4, 3, 8, False), (64, 128, 4, 4, 8, False),
                (128, 128, 8, 3, 8, False), (128, 128, 8, 4, 8, False),
                (128, 256, 8, 3, 8, False), (128, 128, 4, 3, 8, False),
                (128, 128, 8, 3, 8, True), (64, 128, 4, 3, 8, True),
                (128, 64, 4, 4, 8, False)],
}


def _kind(m: int) -> str:
    return "small" if m <= 16 else "decode" if m <= 256 else "prefill"


def scaled_mm_seconds(m: int, n: int, k: int) -> float:
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    fn = partial(torch._scaled_mm, a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e-3


def blockwise_scaled_mm(a_q: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor,
                        w_s: torch.Tensor) -> torch.Tensor:
    """The same GEMM through torch._scaled_mm's block-wise scaling (1x128 activations,
    128x128 weights; cuBLASLt on Hopper), scales in the layouts it checks for."""
    return torch._scaled_mm(a_q, w.t(), scale_a=a_s.t().contiguous().t(), scale_b=w_s.t(),
                            out_dtype=torch.bfloat16)


def cublas_row(name: str, m: int, n: int, k: int, args: tuple, floor: float, ref: float,
               triton_out: torch.Tensor) -> dict | None:
    try:
        got = blockwise_scaled_mm(*args)
        sec = do_bench(partial(blockwise_scaled_mm, *args), warmup=5, rep=40,
                       return_mode="median") * 1e-3
    except Exception as exc:  # noqa: BLE001 (this torch / cuBLAS has no block-wise path)
        print(f"{name} m={m} cublas: {type(exc).__name__}: {str(exc)[:300]}")
        return None
    err = ((got.float() - triton_out.float()).norm() / triton_out.float().norm()).item()
    print(f"  {name:<14} m={m:<5} {'cublas blockwise':<34} {sec * 1e6:8.1f} us "
          f"{2 * m * n * k / sec / 1e12:7.1f} TFLOP/s  {sec / floor:5.2f}x floor  "
          f"rel.diff vs triton {err:.2e}", flush=True)
    return {"phase": "gemm", "shape": name, "m": m, "n": n, "k": k, "variant": "cublas",
            "default": False, "us": sec * 1e6, "TFLOPs": 2 * m * n * k / sec / 1e12,
            "x_hbm_floor": sec / floor, "scaled_mm_us": ref * 1e6, "rel_diff": err}


def sweep(rows: list[int], copy_gbps: float, out: list[dict]) -> None:
    """Time every variant of VARIANTS for each row count and shape; one dict per timing."""
    for m in rows:
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
            s = torch.rand(-(-n // 128), k // 128, device="cuda") + 0.5
            a_q, a_s = per_token_group_quant(x, 128)
            floor = (n * k + m * k + 2 * m * n) / (copy_gbps * 1e9)
            ref = scaled_mm_seconds(m, n, k)
            default = (*_tiles(m), 1, False)
            row = cublas_row(name, m, n, k, (a_q, a_s, w, s), floor, ref,
                             w8a8_block_fp8_matmul(a_q, a_s, w, s))
            if row:
                out.append(row)
            variants = [default] + [v for v in VARIANTS[_kind(m)] if v != default]
            for v in variants:
                fn = partial(w8a8_block_fp8_matmul, a_q, a_s, w, s, tiles=v[:4], group_m=v[4],
                             warp_spec=v[5])
                try:
                    sec = do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e-3
                except Exception as exc:  # noqa: BLE001 (a variant this Triton cannot build)
                    print(f"{name} m={m} {v}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                row = {"phase": "gemm", "shape": name, "m": m, "n": n, "k": k,
                       "variant": list(v), "default": v == default, "us": sec * 1e6,
                       "TFLOPs": 2 * m * n * k / sec / 1e12, "x_hbm_floor": sec / floor,
                       "scaled_mm_us": ref * 1e6}
                out.append(row)
                mark = "*" if v == default else " "
                print(f"{mark} {name:<14} m={m:<5} {str(v):<34} {sec * 1e6:8.1f} us "
                      f"{row['TFLOPs']:7.1f} TFLOP/s  {row['x_hbm_floor']:5.2f}x floor  "
                      f"(_scaled_mm {ref * 1e6:.1f} us)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256, 8192])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--only-default", action="store_true",
                    help="time the default tiles (and cuBLAS) only")
    args = ap.parse_args()
    for name in set(SHAPES) - set(args.shapes):
        del SHAPES[name]
    if args.only_default:
        VARIANTS.update({kind: [] for kind in VARIANTS})
    peaks = measure_peaks()
    print(f"copy {peaks['copy_GBps']:.0f} GB/s, bf16 {peaks['bf16_TFLOPs']:.0f} TFLOP/s")
    rows: list[dict] = []
    sweep(args.rows, peaks["copy_GBps"], rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"peaks": peaks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
