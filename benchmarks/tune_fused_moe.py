"""Tile sweep of the fused-MoE Triton kernel and the MLA prefill forms, at DeepSeek-V2-Lite sizes.

For each token count the fused MoE runs every candidate tile config (routing: each token's k
experts drawn uniformly without replacement) and prints the best next to the config
`moe_config` picks today, the weight-read floor (bytes of the experts hit over the copy
bandwidth measured in the same run) and torch's grouped GEMM path. Then one layer of MLA
prefill attention at 1k/4k/8k: the absorbed Triton kernel against the MHA form (kv_b
expansion + SDPA). GPU only.

    python benchmarks/tune_fused_moe.py [--tokens 1 8 32 64 128 256 1024 8192] [--json out]

--fp8: the W8A8 block-scaled path instead, at DeepSeek-V3 sizes (H 7168, I 2048, 256 routed
experts top-8 + 1 shared): each candidate tile next to `moe_config_fp8`'s pick, the fp8
weight-read floor, the bf16 kernel on the same routing, and (one batch) the error against
fused_moe_ref. Decode sizes are replayed from CUDA graphs, which also proves the path capturable.

    python benchmarks/tune_fused_moe.py --fp8 [--tokens 1 64 256 8192] [--no-sweep]
"""

# Closures below are timed inside the loop iteration that defines them.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench, do_bench_cudagraph

from moeserve.kernels.fused_moe import fused_moe, fused_moe_ref
from moeserve.kernels.mla_prefill import PrefillConfig, mla_prefill
from moeserve.kernels.mla_prefill_mha import gather_latents, mla_prefill_mha
from moeserve.kernels.moe_config import MoeConfig, moe_config, moe_config_fp8

HEADS, KV_LORA, ROPE, NOPE, V_DIM = 16, 512, 64, 128, 128
HIDDEN, INTER, EXPERTS, TOP_K = 2048, 1408, 64, 6
DTYPE = torch.bfloat16


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=5, rep=40, return_mode="median"))


def _graph_ms(fn) -> float:
    """Replayed from a CUDA graph, as decode steps run: no Python launch cost in the time."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=40, return_mode="median"))


def copy_gbps() -> float:
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def candidates(tokens: int) -> list[MoeConfig]:
    if tokens * TOP_K / EXPERTS <= 32:
        grid = itertools.product([16, 32, 64], [32, 64, 128], [128, 256], [4], [3, 4, 5])
    else:
        grid = itertools.product([64, 128], [64, 128, 256], [64, 128], [4, 8], [3, 4])
    return [MoeConfig(*c) for c in grid]


def routing(tokens: int, gen: torch.Generator, used: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k experts drawn uniformly from the first ``used`` (skewed when < 64)."""
    ids = torch.rand(tokens, used, generator=gen).argsort(dim=1)[:, :TOP_K]
    weights = torch.rand(tokens, TOP_K, generator=gen)
    return weights.cuda(), ids.to(torch.int32).cuda()


def torch_grouped(x, w13, w2, weights, ids) -> torch.Tensor:
    from moeserve.worker.model.moe import _grouped_linear

    flat = ids.flatten().long()
    order = flat.argsort(stable=True)
    counts = torch.zeros(EXPERTS, dtype=torch.int64, device=x.device)
    counts.index_add_(0, flat[order], torch.ones_like(order))
    tokens = order // TOP_K
    h = _grouped_linear(x[tokens], w13, counts)
    h = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
    y = _grouped_linear(h, w2, counts).float() * weights.flatten()[order, None]
    return torch.zeros_like(x, dtype=torch.float32).index_add_(0, tokens, y)


def sweep_moe(token_counts: list[int], bw: float, used: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda") * 0.02).to(DTYPE)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, device="cuda") * 0.02).to(DTYPE)
    rows = []
    for t in token_counts:
        x = torch.randn(t, HIDDEN, device="cuda").to(DTYPE)
        weights, ids = routing(t, gen, used)
        hit = int(ids.unique().numel())
        floor_ms = hit * 3 * HIDDEN * INTER * 2 / (bw * 1e9) * 1e3
        flops = 2 * t * TOP_K * 3 * HIDDEN * INTER
        current = moe_config(t * TOP_K, EXPERTS)
        results = []
        for cfg in candidates(t) + [current]:
            try:
                ms = _graph_ms(lambda cfg=cfg: fused_moe(x, w13, w2, weights, ids, config=cfg))
            except Exception as exc:  # out of shared memory / registers for this tile
                print(f"  T={t} {cfg}: {type(exc).__name__}", flush=True)
                continue
            results.append((ms, cfg))
        best_ms, best = min(results, key=lambda r: r[0])
        current_ms = next(ms for ms, c in results if c == current)
        try:
            grouped_ms = _graph_ms(lambda: torch_grouped(x, w13, w2, weights, ids))
        except Exception as exc:  # a build whose grouped GEMM cannot be captured
            print(f"  torch grouped: {type(exc).__name__}: {exc}", flush=True)
            grouped_ms = float("nan")
        row = {"tokens": t, "experts_hit": hit, "floor_ms": floor_ms, "best_ms": best_ms,
               "best": best.__dict__, "current_ms": current_ms, "current": current.__dict__,
               "torch_grouped_ms": grouped_ms, "best_tflops": flops / best_ms / 1e9}
        rows.append(row)
        top = ", ".join(f"{c.block_m}/{c.block_n}/{c.block_k}/{c.num_warps}/{c.num_stages} "
                        f"{ms:.3f}" for ms, c in sorted(results, key=lambda r: r[0])[:4])
        by_m = {m: min(ms for ms, c in results if c.block_m == m)
                for m in sorted({c.block_m for _, c in results})}  # fmt: skip
        print(f"used={used} T={t:5d} hit={hit:2d} floor {floor_ms:.3f} ms  current "
              f"{current_ms:.3f} ms  torch grouped {grouped_ms:.3f} ms  best M/N/K/w/s: {top}  "
              f"best by BLOCK_M: {by_m}", flush=True)
    return rows


def prefill_forms(lengths: list[int]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    block = 64
    rows = []
    scale = (NOPE + ROPE) ** -0.5
    for n in lengths:
        pages = n // block
        cache = torch.randn(pages + 1, block, KV_LORA + ROPE, device="cuda", generator=gen)
        cache = cache.to(DTYPE)
        table = torch.randperm(pages, device="cuda", generator=gen)[None] + 1
        lens = torch.tensor([n], device="cuda")
        starts = torch.tensor([0, n], device="cuda")
        q_nope = torch.randn(n, HEADS, NOPE, device="cuda", generator=gen).to(DTYPE)
        q_pe = torch.randn(n, HEADS, ROPE, device="cuda", generator=gen).to(DTYPE)
        w = (torch.randn(HEADS * (NOPE + V_DIM), KV_LORA, device="cuda", generator=gen)
             * 0.03).to(DTYPE)  # fmt: skip
        w_uk = w.view(HEADS, -1, KV_LORA)[:, :NOPE]
        w_uv = w.view(HEADS, -1, KV_LORA)[:, NOPE:]

        def absorbed():
            q = torch.cat([torch.einsum("thd,hdr->thr", q_nope, w_uk), q_pe], -1)
            o = mla_prefill(q, cache, table, lens, starts, n, scale, KV_LORA)
            return torch.einsum("thr,hvr->thv", o, w_uv)

        def mha():
            return mla_prefill_mha(torch.cat([q_nope, q_pe], -1),
                                   gather_latents(cache, table[0], n), w, scale, KV_LORA, V_DIM)

        def mha_padded_v():  # V padded to the QK head dim: the flash backend's constraint
            lat = gather_latents(cache, table[0], n)
            kv = torch.nn.functional.linear(lat[:, :KV_LORA], w).view(n, HEADS, -1)
            k = torch.cat([kv[..., :NOPE], lat[:, None, KV_LORA:].expand(-1, HEADS, -1)], -1)
            v = torch.nn.functional.pad(kv[..., NOPE:], (0, NOPE + ROPE - V_DIM))
            q = torch.cat([q_nope, q_pe], -1)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=scale)
            return o[0].transpose(0, 1)[..., :V_DIM]

        a, m = absorbed(), mha()
        err = float((a.float() - m.float()).norm() / a.float().norm())
        t_abs, t_mha = _ms(absorbed), _ms(mha)
        t_pad = _ms(mha_padded_v)
        print(f"  padded-V SDPA {t_pad:.3f} ms", flush=True)
        mha_flops = 2 * HEADS * (NOPE + ROPE + V_DIM) * n * n / 2 + 2 * n * KV_LORA * w.shape[0]
        rows.append({"tokens": n, "absorbed_ms": t_abs, "mha_ms": t_mha, "rel_err": err,
                     "mha_padded_v_ms": t_pad,
                     "mha_tflops": mha_flops / t_mha / 1e9})
        print(f"prefill n={n:5d}: absorbed Triton {t_abs:.3f} ms, MHA+SDPA {t_mha:.3f} ms "
              f"({mha_flops / t_mha / 1e9:.0f} TFLOP/s), rel diff {err:.1e}", flush=True)
    return rows


V3_HIDDEN, V3_INTER, V3_ROUTED, V3_TOP_K = 7168, 2048, 256, 8


def fp8_candidates(tokens: int) -> list[MoeConfig]:
    rows = tokens * (V3_TOP_K + 1) / (V3_ROUTED + 1)
    if rows <= 32:
        tiles = [(16, 64, 4, 4, 128), (16, 64, 4, 4, 64), (16, 128, 4, 4, 128),
                 (16, 32, 4, 4, 128), (16, 64, 4, 3, 128), (32, 64, 4, 4, 128),
                 (32, 128, 4, 4, 128), (64, 128, 4, 4, 128)]
    else:
        # The gated launch keeps four [BLOCK_M, gate N] float32 tiles live (two accumulators,
        # two scaled dot results): 128 x 128 with 8 warps spills (34 ms at 8k against 15).
        tiles = [(64, 256, 8, 3, 128), (64, 256, 8, 4, 128), (64, 128, 8, 4, 128),
                 (128, 128, 8, 3, 64), (128, 128, 8, 4, 64), (128, 256, 8, 3, 64)]
    return [MoeConfig(m, n, 128, w, st, gate_block_n=g) for m, n, w, st, g in tiles]


def v3_routing(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-8 of 256 drawn uniformly, then the shared expert (slot 256) for every token."""
    ids = torch.rand(tokens, V3_ROUTED, generator=gen).argsort(dim=1)[:, :V3_TOP_K]
    weights = torch.rand(tokens, V3_TOP_K, generator=gen)
    ids = torch.cat([ids, torch.full((tokens, 1), V3_ROUTED)], 1)
    weights = torch.cat([weights, torch.ones(tokens, 1)], 1)
    return weights.cuda(), ids.to(torch.int32).cuda()


def sweep_fp8(token_counts: list[int], bw: float, sweep: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    e, h, i = V3_ROUTED + 1, V3_HIDDEN, V3_INTER
    # Random e4m3 values (uniform in +-1 before the cast) with block scales around 1/300.
    w13 = torch.empty(e, 2 * i, h, dtype=DTYPE, device="cuda").uniform_(-1, 1)
    w2 = torch.empty(e, h, i, dtype=DTYPE, device="cuda").uniform_(-1, 1)
    s13 = torch.rand(e, 2 * i // 128, h // 128, device="cuda") / 150
    s2 = torch.rand(e, h // 128, i // 128, device="cuda") / 150
    w13_q, w2_q = w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
    w13.mul_(s13.repeat_interleave(128, 1).repeat_interleave(128, 2).to(DTYPE))
    w2.mul_(s2.repeat_interleave(128, 1).repeat_interleave(128, 2).to(DTYPE))
    scales = {"w13_scale": s13, "w2_scale": s2, "num_shared": 1}
    rows = []
    for t in token_counts:
        x = torch.randn(t, h, device="cuda").to(DTYPE)
        weights, ids = v3_routing(t, gen)
        hit = int(ids.unique().numel())
        floor_ms = hit * 3 * h * i / (bw * 1e9) * 1e3
        flops = 2 * t * (V3_TOP_K + 1) * 3 * h * i
        timer = _graph_ms if t <= 256 else _ms
        current = moe_config_fp8(t * (V3_TOP_K + 1), e)
        results = []
        for cfg in (fp8_candidates(t) if sweep else []) + [current]:
            try:
                ms = timer(lambda cfg=cfg: fused_moe(x, w13_q, w2_q, weights, ids, cfg,
                                                     **scales))
            except Exception as exc:
                print(f"  T={t} {cfg}: {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            results.append((ms, cfg))
        best_ms, best = min(results, key=lambda r: r[0])
        current_ms = next(ms for ms, c in results if c == current)
        bf16_ms = timer(lambda: fused_moe(x, w13, w2, weights, ids, num_shared=1))
        err = float("nan")
        if t == 64:  # the reference loops over 257 experts in float32: one batch only
            out = fused_moe(x, w13_q, w2_q, weights, ids, **scales).float()
            ref = fused_moe_ref(x, w13_q, w2_q, weights, ids, **scales).float()
            err = float((out - ref).norm() / ref.norm())
        row = {"tokens": t, "experts_hit": hit, "floor_ms": floor_ms, "current_ms": current_ms,
               "current": current.__dict__, "best_ms": best_ms, "best": best.__dict__,
               "bf16_ms": bf16_ms, "rel_err_vs_ref": err,
               "current_tflops": flops / current_ms / 1e9}
        rows.append(row)
        top = ", ".join(f"{c.block_m}/{c.block_n}/{c.gate_n()}/{c.num_warps}/{c.num_stages} "
                        f"{ms:.3f}" for ms, c in sorted(results, key=lambda r: r[0])[:5])
        print(f"fp8 T={t:5d} hit={hit:3d} floor {floor_ms:.3f} ms  current {current_ms:.3f} ms "
              f"({current_ms / floor_ms:.2f}x floor, {flops / current_ms / 1e9:.0f} TFLOP/s)  "
              f"bf16 {bf16_ms:.3f} ms  err {err:.1e}  best M/N/gateN/w/s: {top}", flush=True)
    return rows


def prefill_tiles(lengths: list[int]) -> list[dict]:
    """The absorbed prefill kernel alone (the form mixed-step CUDA graphs use for prompt
    chunks) over its tile configs: one sequence of n new tokens after n cached ones."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    block, scale, rows = 64, (NOPE + ROPE) ** -0.5, []
    for n in lengths:
        pages = 2 * n // block
        cache = torch.randn(pages + 1, block, KV_LORA + ROPE, device="cuda", generator=gen)
        cache = cache.to(DTYPE)
        table = torch.randperm(pages, device="cuda", generator=gen)[None] + 1
        lens, starts = torch.tensor([2 * n], device="cuda"), torch.tensor([0, n], device="cuda")
        q = torch.randn(n, HEADS, KV_LORA + ROPE, device="cuda", generator=gen).to(DTYPE)
        ref = mla_prefill(q, cache, table, lens, starts, n, scale, KV_LORA).float()
        flops = 2 * HEADS * (2 * KV_LORA + ROPE) * n * (n + n / 2)
        results = []
        for bm, bn, w, st in itertools.product([32, 64, 128], [16, 32, 64], [4, 8], [1, 2]):
            cfg = PrefillConfig(bm, bn, w, st)
            run = lambda cfg=cfg: mla_prefill(q, cache, table, lens, starts, n, scale, KV_LORA,
                                              config=cfg)  # noqa: E731
            try:
                err = float((run().float() - ref).norm() / ref.norm())
                results.append((_ms(run), cfg, err))
            except Exception as exc:  # out of shared memory / registers for this tile
                print(f"  n={n} {cfg}: {type(exc).__name__}", flush=True)
        default = next(r for r in results if r[1] == PrefillConfig())
        best = min(results, key=lambda r: r[0])
        top = ", ".join(f"{c.block_m}/{c.block_n}/{c.num_warps}/{c.num_stages} {ms:.3f}"
                        for ms, c, _ in sorted(results, key=lambda r: r[0])[:5])
        print(f"absorbed prefill n={n} (+{n} cached): default {default[0]:.3f} ms "
              f"({flops / default[0] / 1e9:.0f} TFLOP/s), best {best[0]:.3f} ms "
              f"({flops / best[0] / 1e9:.0f} TFLOP/s, err {best[2]:.1e})  M/N/w/s: {top}",
              flush=True)
        rows.append({"tokens": n, "default_ms": default[0], "best_ms": best[0],
                     "best": best[1].__dict__})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 1024,
                                                               8192])
    ap.add_argument("--prefill", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--prefill-tiles", type=int, nargs="*", default=[],
                    help="sweep the absorbed prefill kernel's tiles at these lengths")
    ap.add_argument("--used-experts", type=int, nargs="+", default=[EXPERTS],
                    help="route over only the first N experts (the random V2-Lite checkpoint "
                    "hits ~14 of 64 at batch 128)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--fp8", action="store_true", help="the W8A8 path at V3 sizes")
    ap.add_argument("--no-sweep", action="store_true", help="--fp8: time the picked tiles only")
    args = ap.parse_args()
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s", flush=True)
    if args.fp8:
        tokens = args.tokens if args.tokens != ap.get_default("tokens") else [1, 64, 256, 8192]
        out_fp8 = {"copy_gbps": bw, "fp8": sweep_fp8(tokens, bw, not args.no_sweep)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out_fp8, f, indent=2)
        return
    out = {"copy_gbps": bw, "prefill": [] if args.skip_prefill else prefill_forms(args.prefill),
           "prefill_tiles": prefill_tiles(args.prefill_tiles),
           "moe": {used: sweep_moe(args.tokens, bw, used) for used in args.used_experts}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
