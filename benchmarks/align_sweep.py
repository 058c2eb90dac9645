"""moe_align_block_size: single-program Triton kernel (CHUNK x warps) against the torch ops,
and at prefill sizes the three-launch chunked layout against the torch ops.

Replayed from CUDA graphs, as in a decode step. V2-Lite routing (64 experts, 6 per token).

    python benchmarks/align_sweep.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench_cudagraph

from moeserve.kernels.moe_align import (
    moe_align_block_size,
    moe_align_block_size_chunked,
    moe_align_block_size_ref,
)


def main() -> None:
    experts, top_k, block_m = 64, 6, 16
    for tokens in (1, 32, 64, 128, 170, 256, 512):
        ids = torch.rand(tokens, experts, device="cuda").argsort(1)[:, :top_k].to(torch.int32)
        cells = []
        def ref(ids=ids):
            return moe_align_block_size_ref(ids, block_m, experts)

        def tri(c, w, ids=ids):
            return lambda: moe_align_block_size(ids, block_m, experts, c, w)

        variants = [("torch", ref)] + [(f"c{c}w{w}", tri(c, w)) for c in (32, 64, 128, 256)
                                       for w in (4, 8)]  # fmt: skip
        for name, fn in variants:
            fn()
            torch.cuda.synchronize()
            cells.append(f"{name} {1e3 * do_bench_cudagraph(fn, rep=20, return_mode='median'):.1f}")
        print(f"T={tokens:4d} copies={tokens * top_k:5d} us: " + "  ".join(cells), flush=True)
    for tokens in (1024, 4096, 8192):  # prefill: block_m 128 as moe_config picks there
        ids = torch.rand(tokens, experts, device="cuda").argsort(1)[:, :top_k].to(torch.int32)
        cells = []
        for name, fn in (("torch", moe_align_block_size_ref),
                         ("chunked", moe_align_block_size_chunked)):
            def run(fn=fn, ids=ids):
                return fn(ids, 128, experts)

            run()
            torch.cuda.synchronize()
            us = 1e3 * do_bench_cudagraph(run, rep=20, return_mode="median")
            cells.append(f"{name} {us:.1f}")
        print(f"T={tokens:4d} copies={tokens * top_k:5d} us: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
