"""Tile and split sweep of the MLA decode kernel at DeepSeek-V2-Lite sizes (GPU only).

Replayed from CUDA graphs as decode steps run. Floor = the KV bytes of the batch (every
sequence's latents, read once) over the copy bandwidth measured in the same run.

    python benchmarks/tune_mla_decode.py [--batch 1 32 64 128 256] [--context 1024 4096]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench, do_bench_cudagraph

from moeserve.kernels.mla_decode import default_num_splits, default_tiles, mla_decode

HEADS, KV_LORA, ROPE, BLOCK = 16, 512, 64, 64


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
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for ctx, bs in itertools.product(args.context, args.batch):
        pages = ctx // BLOCK
        cache = torch.randn(bs * pages + 1, BLOCK, KV_LORA + ROPE, device="cuda",
                            generator=gen).to(torch.bfloat16)  # fmt: skip
        tables = (torch.randperm(bs * pages, device="cuda", generator=gen) + 1).view(bs, pages)
        lens = torch.full((bs,), ctx, device="cuda")
        q = torch.randn(bs, HEADS, KV_LORA + ROPE, device="cuda", generator=gen)
        q = q.to(torch.bfloat16)
        floor_us = bs * ctx * (KV_LORA + ROPE) * 2 / bw * 1e6
        base = default_num_splits(bs, HEADS)
        results = []
        for splits, block_n, warps, stages in itertools.product(
                sorted({base, 2 * base, max(1, base // 2), *args.splits}), [32, 64], [4, 8],
                [2, 3]):
            def fn(s=splits, n=block_n, w=warps, st=stages, q=q, c=cache, t=tables, ln=lens):
                return mla_decode(q, c, t, ln, 0.1, KV_LORA, s, n, w, st)
            try:
                fn()
                torch.cuda.synchronize()
                us = 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")
            except Exception as exc:  # tile over the shared-memory limit
                print(f"  skip splits={splits} n={block_n} w={warps} s={stages}: "
                      f"{type(exc).__name__}", flush=True)
                continue
            results.append((us, splits, block_n, warps, stages))
        results.sort()
        current = next(r for r in results if r[1:] == (base, *default_tiles(bs), 2))
        best = results[0]
        print(f"ctx={ctx} batch={bs}: floor {floor_us:.1f} us, current {current[0]:.1f} us "
              f"(splits {base}), best {best[0]:.1f} us splits={best[1]} block_n={best[2]} "
              f"warps={best[3]} stages={best[4]}; next: "
              + ", ".join(f"{r[0]:.1f}:{r[1]}/{r[2]}/{r[3]}/{r[4]}" for r in results[1:4]),
              flush=True)


if __name__ == "__main__":
    main()
