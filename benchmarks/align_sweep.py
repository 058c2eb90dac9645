"""moe_align_block_size at decode sizes: the single-program Triton kernel against the chunked
three-launch layout (count, scan, place) at several chunk sizes and the torch ops, with the
shared experts' columns as the decode step lays them out (V2-Lite: 64 routed top-6 + 2 shared;
V3: 256 routed top-8 + 1 shared); then the prefill sizes (chunked against torch).

Replayed from CUDA graphs, as in a decode step.

    python benchmarks/align_sweep.py [--tokens 1 64 128 256 512]
"""

# Closures below are timed inside the loop iteration that defines them.
# ruff: noqa: B023
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from moeserve.kernels.moe_align import (
    moe_align_block_size,
    moe_align_block_size_chunked,
    moe_align_block_size_ref,
)
from moeserve.kernels.moe_config import moe_config
from moeserve.worker.model.moe import append_shared

SHAPES = {"v2-lite": (64, 6, 2), "v3": (256, 8, 1)}  # routed experts, top-k, shared


def _us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")


def _ids(tokens: int, routed: int, top_k: int, shared: int) -> torch.Tensor:
    ids = torch.rand(tokens, routed, device="cuda").argsort(1)[:, :top_k].to(torch.int32)
    weights = torch.rand(tokens, top_k, device="cuda")
    return append_shared(weights, ids, routed, shared)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 128, 256, 512])
    args = ap.parse_args()
    for model, (routed, top_k, shared) in SHAPES.items():
        experts = routed + shared
        for tokens in args.tokens:
            ids = _ids(tokens, routed, top_k, shared)
            block_m = moe_config(ids.numel(), experts).block_m
            ref_us = _us(lambda: moe_align_block_size_ref(ids, block_m, experts))
            single_us = _us(lambda: moe_align_block_size(ids, block_m, experts,
                                                         num_shared=shared))
            cells = [f"torch {ref_us:.1f}", f"single {single_us:.1f}"]
            for chunk in (32, 64, 128, 256):
                us = _us(lambda c=chunk: moe_align_block_size_chunked(ids, block_m, experts,
                                                                      shared, chunk=c))
                cells.append(f"chunked{chunk} {us:.1f}")
            print(f"{model} T={tokens:4d} copies={ids.numel():5d} block_m={block_m} us: "
                  + "  ".join(cells), flush=True)
    routed, top_k, _ = SHAPES["v2-lite"]
    for tokens in (1024, 4096, 8192):  # prefill: shared experts apart, block_m 128
        ids = _ids(tokens, routed, top_k, 0)
        cells = [f"{name} {_us(lambda fn=fn: fn(ids, 128, routed)):.1f}"
                 for name, fn in (("torch", moe_align_block_size_ref),
                                  ("chunked", moe_align_block_size_chunked))]
        print(f"v2-lite T={tokens:4d} copies={ids.numel():5d} us: " + "  ".join(cells),
              flush=True)


if __name__ == "__main__":
    main()
