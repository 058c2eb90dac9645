"""Kernel micro-benchmarks at DeepSeek-V2-Lite sizes: Triton vs the torch reference (GPU only).

Each case is timed with triton.testing.do_bench (median) and set against the peaks measured in
the same run: a device-to-device copy (bandwidth) and a large bf16 matmul (compute). Memory
bound cases report GB/s and the fraction of copy bandwidth, compute bound ones TFLOP/s and the
fraction of the matmul rate.

    python benchmarks/kernels_bench.py --out bench-kernels.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as `python benchmarks/kernels_bench.py`, only benchmarks/ is on the path: its siblings are
# imported as benchmarks.* from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
from triton.testing import do_bench

from moeserve.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from moeserve.kernels.fused_moe import fused_moe, fused_moe_ref
from moeserve.kernels.mla_decode import mla_decode, mla_decode_ref
from moeserve.kernels.mla_prefill import mla_prefill, mla_prefill_ref
from moeserve.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from moeserve.kernels.rope_cache import rope_cache_write, rope_cache_write_ref

try:  # python -m benchmarks.kernels_bench
    from benchmarks import device_timing
except ModuleNotFoundError:  # python benchmarks/kernels_bench.py
    import device_timing  # type: ignore[no-redef]

# DeepSeek-V2-Lite
HEADS, KV_LORA, ROPE, HIDDEN, MOE_INTER, EXPERTS, TOP_K = 16, 512, 64, 2048, 1408, 64, 6
KV_DIM = KV_LORA + ROPE
BLOCK_SIZE = 64
DTYPE = torch.bfloat16


@dataclass
class Row:
    kernel: str
    case: str
    bound: str  # "memory" or "compute"
    triton_ms: float
    torch_ms: float | None
    gbps: float
    tflops: float
    frac_of_peak: float  # of copy bandwidth (memory) or bf16 matmul rate (compute)


@dataclass
class Peaks:
    copy_gbps: float
    bf16_tflops: float


def _ms(fn: Callable[[], object], rep: int) -> float:
    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def measure_peaks(rep: int) -> Peaks:
    """`device_timing.measure_peaks`, each ceiling timed as the kernels are (do_bench median)."""
    peaks = device_timing.measure_peaks(lambda fn: _ms(fn, rep) / 1e3)
    return Peaks(copy_gbps=peaks["copy_GBps"], bf16_tflops=peaks["bf16_TFLOPs"])


def _paged(seq_lens: list[int], gen: torch.Generator):
    """Layer 1 of a two-layer cache (a strided view), shuffled block tables, int32 seq_lens."""
    pages = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(pages) + 1
    cache = torch.randn(num_blocks, 2, BLOCK_SIZE, KV_DIM, generator=gen, device="cuda",
                        dtype=DTYPE)
    perm = torch.randperm(num_blocks - 1, generator=gen, device="cuda") + 1
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device="cuda")
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return cache[:, 1], tables, lens


def _row(kernel: str, case: str, bound: str, t_ms: float, r_ms: float | None, nbytes: float,
         flops: float, peaks: Peaks) -> Row:
    gbps, tflops = nbytes / t_ms / 1e6, flops / t_ms / 1e9
    frac = gbps / peaks.copy_gbps if bound == "memory" else tflops / peaks.bf16_tflops
    return Row(kernel, case, bound, t_ms, r_ms, gbps, tflops, frac)


def bench_mla_decode(peaks: Peaks, gen: torch.Generator, rep: int, quick: bool) -> list[Row]:
    rows = []
    for batch, ctx in ([(1, 4096), (64, 1024)] if quick else
                       [(1, 1024), (1, 4096), (32, 4096), (64, 1024), (128, 4096), (256, 1024)]):
        layer, tables, lens = _paged([ctx] * batch, gen)
        q = torch.randn(batch, HEADS, KV_DIM, generator=gen, device="cuda", dtype=DTYPE)
        args = (q, layer, tables, lens, KV_DIM**-0.5, KV_LORA)
        t = _ms(lambda args=args: mla_decode(*args), rep)
        r = _ms(lambda args=args: mla_decode_ref(*args), rep) if batch <= 64 else None
        nbytes = batch * ctx * KV_DIM * 2 + q.numel() * 2 + batch * HEADS * KV_LORA * 2
        flops = batch * ctx * HEADS * 2 * (KV_DIM + KV_LORA)
        rows.append(_row("mla_decode", f"S={batch} ctx={ctx}", "memory", t, r, nbytes, flops,
                         peaks))
    return rows


def bench_mla_prefill(peaks: Peaks, gen: torch.Generator, rep: int, quick: bool) -> list[Row]:
    rows = []
    for seqs, prefix, new in ([(1, 0, 4096)] if quick else
                              [(1, 0, 1024), (1, 0, 4096), (1, 0, 8192), (4, 2048, 512)]):
        layer, tables, lens = _paged([prefix + new] * seqs, gen)
        q = torch.randn(seqs * new, HEADS, KV_DIM, generator=gen, device="cuda", dtype=DTYPE)
        starts = torch.arange(0, seqs * new + 1, new, dtype=torch.int32, device="cuda")
        args = (q, layer, tables, lens, starts, new, KV_DIM**-0.5, KV_LORA)
        t = _ms(lambda args=args: mla_prefill(*args), rep)
        r = _ms(lambda args=args: mla_prefill_ref(*args), rep)
        visible = seqs * (new * prefix + new * (new + 1) / 2)  # (query, key) pairs, causal
        flops = visible * HEADS * 2 * (KV_DIM + KV_LORA)
        nbytes = seqs * (prefix + new) * KV_DIM * 2 + 2 * q.numel() * 2
        rows.append(_row("mla_prefill", f"S={seqs} prefix={prefix} new={new}", "compute", t, r,
                         nbytes, flops, peaks))
    return rows


def bench_fused_moe(peaks: Peaks, gen: torch.Generator, rep: int, quick: bool) -> list[Row]:
    rows = []
    w13 = torch.randn(EXPERTS, 2 * MOE_INTER, HIDDEN, generator=gen, device="cuda",
                      dtype=DTYPE) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, MOE_INTER, generator=gen, device="cuda",
                     dtype=DTYPE) / MOE_INTER**0.5
    for tokens in ([1, 256] if quick else [1, 8, 64, 256, 1024, 4096, 8192]):
        x = torch.randn(tokens, HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
        scores = torch.rand(tokens, EXPERTS, generator=gen, device="cuda")
        weights, ids = scores.topk(TOP_K, dim=-1)
        args = (x, w13, w2, weights, ids)
        t = _ms(lambda args=args: fused_moe(*args), rep)
        r = _ms(lambda args=args: fused_moe_ref(*args), rep)
        hit = int(torch.unique(ids).numel())
        nbytes = hit * 3 * MOE_INTER * HIDDEN * 2 + tokens * TOP_K * (2 * HIDDEN + MOE_INTER) * 2
        flops = tokens * TOP_K * 2 * 3 * MOE_INTER * HIDDEN
        bound = "memory" if tokens * TOP_K / EXPERTS < 64 else "compute"
        rows.append(_row("fused_moe", f"T={tokens} experts_hit={hit}", bound, t, r, nbytes,
                         flops, peaks))
    return rows


def _fp8_weight(n: int, k: int, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen, device="cuda")
    scales = w.view(n // 128, 128, k // 128, 128).abs().amax((1, 3)) / 448.0
    q = (w.view(n // 128, 128, k // 128, 128) / scales[:, None, :, None]).view(n, k)
    return q.to(torch.float8_e4m3fn), scales


def bench_fp8_gemm(peaks: Peaks, gen: torch.Generator, rep: int, quick: bool) -> list[Row]:
    rows = []
    n, k = 3072, HIDDEN  # q_proj of V2-Lite: 2048 -> 16 * 192
    w, w_s = _fp8_weight(n, k, gen)
    for m in ([1, 4096] if quick else [1, 64, 256, 1024, 4096, 8192]):
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=DTYPE)
        t = _ms(lambda x=x: fp8_gemm(x, w, w_s), rep)
        r = _ms(lambda x=x: fp8_gemm_ref(x, w, w_s), rep)
        nbytes = n * k + m * k * 2 + m * n * 2
        bound = "memory" if m <= 64 else "compute"
        # fp8 tensor cores run at twice the bf16 rate, so "compute" fractions can exceed 1.
        rows.append(_row("fp8_gemm", f"M={m} N={n} K={k}", bound, t, r, nbytes, 2 * m * n * k,
                         peaks))
    return rows


def bench_fusions(peaks: Peaks, gen: torch.Generator, rep: int, quick: bool) -> list[Row]:
    rows = []
    for tokens in ([4096] if quick else [64, 4096]):
        x = torch.randn(tokens, HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
        res = torch.randn_like(x)
        w = torch.rand(HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
        t = _ms(lambda x=x, res=res, w=w: rmsnorm(x, w, 1e-6, res), rep)
        r = _ms(lambda x=x, res=res, w=w: rmsnorm_ref(x, w, 1e-6, res), rep)
        rows.append(_row("rmsnorm+residual", f"T={tokens} D={HIDDEN}", "memory", t, r,
                         4 * x.numel() * 2, 0.0, peaks))

        kv = torch.randn(tokens, KV_DIM, generator=gen, device="cuda", dtype=DTYPE)
        c_kv, k_pe = kv.split([KV_LORA, ROPE], dim=-1)
        pos = torch.randint(0, 8192, (tokens,), generator=gen, device="cuda")
        cos = torch.rand(8192, ROPE // 2, generator=gen, device="cuda")
        sin = torch.rand(8192, ROPE // 2, generator=gen, device="cuda")
        cache = torch.empty(triton.cdiv(tokens, BLOCK_SIZE), BLOCK_SIZE, KV_DIM, device="cuda",
                            dtype=DTYPE)
        slots = torch.randperm(cache.shape[0] * BLOCK_SIZE, generator=gen, device="cuda")[:tokens]
        nw = torch.rand(KV_LORA, generator=gen, device="cuda", dtype=DTYPE)
        args = (c_kv, k_pe, pos, cos, sin, slots, cache, nw)
        t = _ms(lambda args=args: rope_cache_write(*args), rep)
        r = _ms(lambda args=args: rope_cache_write_ref(*args), rep)
        rows.append(_row("kvnorm+rope+cache_write", f"T={tokens}", "memory", t, r,
                         2 * kv.numel() * 2, 0.0, peaks))
    return rows


def _table(rows: list[Row], peaks: Peaks) -> str:
    lines = [f"peaks: copy {peaks.copy_gbps:.0f} GB/s, bf16 matmul {peaks.bf16_tflops:.0f} TFLOP/s",
             f"{'kernel':<24} {'case':<30} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} "
             f"{'GB/s':>8} {'TFLOP/s':>8} {'% peak':>7}"]
    for r in rows:
        ref = f"{r.torch_ms:10.3f}" if r.torch_ms is not None else f"{'-':>10}"
        speed = f"{r.torch_ms / r.triton_ms:8.1f}" if r.torch_ms is not None else f"{'-':>8}"
        lines.append(f"{r.kernel:<24} {r.case:<30} {r.triton_ms:10.3f} {ref} {speed} "
                     f"{r.gbps:8.0f} {r.tflops:8.1f} {100 * r.frac_of_peak:6.0f}% "
                     f"({r.bound})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="two sizes per kernel")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: mla_decode mla_prefill fused_moe fp8_gemm fusions")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("kernels_bench needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    peaks = measure_peaks(args.rep)
    benches = {"mla_decode": bench_mla_decode, "mla_prefill": bench_mla_prefill,
               "fused_moe": bench_fused_moe, "fp8_gemm": bench_fp8_gemm,
               "fusions": bench_fusions}
    rows: list[Row] = []
    for name, bench in benches.items():
        if args.only is None or name in args.only:
            rows += bench(peaks, gen, args.rep, args.quick)
    print(_table(rows, peaks))
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "peaks": asdict(peaks), "rows": [asdict(r) for r in rows],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
