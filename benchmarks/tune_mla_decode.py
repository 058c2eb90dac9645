"""Tile and split sweep of the MLA decode kernel (GPU only): V2-Lite's 16 heads by default,
V3's 128 with --heads 128.

Replayed from CUDA graphs as decode steps run. Floor = the KV bytes of the batch (every
sequence's latents, read once) over the copy bandwidth measured in the same run.

    python benchmarks/tune_mla_decode.py [--batch 1 32 64 128 256] [--context 1024 4096]
        [--heads 128 --block-h 16 32 64]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench, do_bench_cudagraph

from moeserve.kernels.mla_decode import (
    default_block_h,
    default_num_splits,
    default_tiles,
    mla_decode,
)

KV_LORA, ROPE, BLOCK = 512, 64, 64


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64, 128, 256])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="split counts to try besides the default and its half and double")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--block-h", type=int, nargs="+", default=[],
                    help="heads per program to try besides the default")
    ap.add_argument("--quick", action="store_true",
                    help="only the default split count and 2 stages")
    args = ap.parse_args()
    heads = args.heads
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for ctx, bs in itertools.product(args.context, args.batch):
        pages = ctx // BLOCK
        cache = torch.randn(bs * pages + 1, BLOCK, KV_LORA + ROPE, device="cuda",
                            generator=gen).to(torch.bfloat16)  # fmt: skip
        tables = (torch.randperm(bs * pages, device="cuda", generator=gen) + 1).view(bs, pages)
        lens = torch.full((bs,), ctx, device="cuda")
        q = torch.randn(bs, heads, KV_LORA + ROPE, device="cuda", generator=gen)
        q = q.to(torch.bfloat16)
        floor_us = bs * ctx * (KV_LORA + ROPE) * 2 / bw * 1e6
        flops = 2 * bs * heads * ctx * (2 * KV_LORA + ROPE)
        bh0 = default_block_h(heads, bs)
        base = default_num_splits(bs, heads, bh0)
        results = []
        split_set = {base} if args.quick else {base, 2 * base, max(1, base // 2)}
        for splits, block_n, warps, stages, bh in itertools.product(
                sorted(split_set | set(args.splits)), [32, 64], [4, 8],
                [2] if args.quick else [2, 3], sorted({bh0, *args.block_h})):
            def fn(s=splits, n=block_n, w=warps, st=stages, q=q, c=cache, t=tables, ln=lens,
                   b=bh):
                return mla_decode(q, c, t, ln, 0.1, KV_LORA, s, n, w, st, block_h=b)
            try:
                fn()
                torch.cuda.synchronize()
                us = 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")
            except Exception as exc:  # tile over the shared-memory limit
                print(f"  skip splits={splits} n={block_n} w={warps} s={stages} h={bh}: "
                      f"{type(exc).__name__}", flush=True)
                continue
            results.append((us, splits, block_n, warps, stages, bh))
        results.sort()
        current = next(r for r in results if r[1:] == (base, *default_tiles(bs, bh0), 2, bh0))
        best = results[0]
        print(f"ctx={ctx} batch={bs}: floor {floor_us:.1f} us, current {current[0]:.1f} us "
              f"(splits {base}), best {best[0]:.1f} us ({flops / best[0] / 1e6:.0f} TFLOP/s) "
              f"splits={best[1]} block_n={best[2]} warps={best[3]} stages={best[4]} "
              f"block_h={best[5]}; next: "
              + ", ".join(f"{r[0]:.1f}:{'/'.join(map(str, r[1:]))}" for r in results[1:4]),
              flush=True)


if __name__ == "__main__":
    main()
