"""All-to-all cost of expert parallelism: measured on the CPU (gloo), modelled for InfiniBand.

    python benchmarks/ep_alltoall.py --ep 1 2 4 --preset small --batch 8 --steps 20
    python benchmarks/ep_alltoall.py --model-only

Measured: for each EP size, every rank decodes `--batch` requests; over `--steps` decode steps
we time the whole engine step and the time spent inside dispatch/combine (issue + wait), and
report the all-to-all time per MoE layer and its share of the step (mean over ranks).
Modelled: DeepSeek-V3 decode step time vs EP size from DeepEP's published low-latency kernel
latencies (H800 + CX7 400 Gb/s InfiniBand, 128 tokens per rank, FP8 dispatch, BF16 combine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import tempfile
import time
from pathlib import Path

# DeepEP README, "Low-latency kernels with pure RDMA": EP -> (dispatch us, combine us).
DEEPEP_LL_US = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314),
                128: (192, 369), 256: (194, 360)}
SMALL = {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256,
         "n_routed_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 128,
         "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
         "v_head_dim": 32, "n_group": 2, "topk_group": 1}


def make_model(preset: str, root: Path) -> Path:
    from moeserve.worker import checkpoint as ck

    out = root / preset
    if preset == "tiny":
        return ck.make_checkpoint(out, "tiny", dtype="float32")
    cfg = ck.preset_config("tiny")
    cfg.update(SMALL)
    ck.PRESETS["_bench_small"] = cfg
    try:
        return ck.make_checkpoint(out, "_bench_small", dtype="float32")
    finally:
        del ck.PRESETS["_bench_small"]


def rank_main(rank: int, world: int, rendezvous: str, model: str, batch: int, steps: int,
              dbo: bool, out: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    from moeserve.common.sampling import SamplingParams
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine
    from moeserve.worker.parallel.group import RankInfo, init_parallel

    ctx = None
    if world > 1:
        ctx = init_parallel(RankInfo(rank, world, rank, world, rendezvous), timeout_s=60)
    cfg = EngineConfig(model=model, ep=world, dp=world, device="cpu", block_size=16,
                       num_kv_blocks=512, enable_dbo=dbo, dbo_token_threshold=1)
    engine = LLMEngine(cfg, parallel=ctx)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [(7 * i + j) % 500 + 2 for j in range(32)], params)
    for _ in range(3):  # prefill + two warm-up decode steps
        engine.step()
    ep = engine.runner.expert_parallel
    if ep is not None:
        ep.dispatcher.stats.reset()
    moe_layers = len(ep.layers) if ep is not None else 0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - t0
    comm = ep.dispatcher.stats.seconds if ep is not None else 0.0
    result = {"rank": rank, "step_ms": 1e3 * total / steps,
              "a2a_ms_per_layer": 1e3 * comm / (steps * moe_layers) if moe_layers else 0.0,
              "a2a_fraction": comm / total}
    if ctx is not None:
        ctx.close()
    out.put(result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: str, world: int, batch: int, steps: int, dbo: bool = False) -> dict:
    spawn = mp.get_context("spawn")
    q: mp.Queue = spawn.Queue()
    rendezvous = f"127.0.0.1:{_free_port()}"
    procs = [spawn.Process(target=rank_main,
                           args=(r, world, rendezvous, model, batch, steps, dbo, q))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    mean = {k: sum(r[k] for r in results) / world
            for k in ("step_ms", "a2a_ms_per_layer", "a2a_fraction")}
    return {"ep": world, "batch_per_rank": batch, "dbo": dbo, **mean}


def ib_model(tokens_per_rank: int = 128, redundant: int = 32) -> list[dict]:
    """DeepSeek-V3 decode step (ms) per EP size on H800s over 400 Gb/s InfiniBand.

    compute = weights each rank reads per step (memory-bound decode): non-routed weights
    (~16.5 GB FP8, every DP rank holds them) + its routed experts ((256 + redundant) / EP of
    them, 58 MoE layers x 44 MB FP8 each) + KV latents (128 requests x 2k context x 61 layers x
    656 B) at 3.35 TB/s; comm = 58 x (dispatch + combine) from DeepEP's table. DBO's bound:
    max(compute, comm); without overlap: compute + comm.
    """
    bw = 3.35e12
    dense = 16.5e9 + tokens_per_rank * 2048 * 61 * 656
    rows = []
    for ep, (d_us, c_us) in DEEPEP_LL_US.items():
        experts = -(-(256 + redundant) // ep)
        weight_bytes = dense + experts * 58 * 44e6
        compute = 1e3 * weight_bytes / bw
        comm = 58 * (d_us + c_us) / 1e3
        rows.append({"ep": ep, "experts_per_gpu": experts, "gpu_gb": weight_bytes / 1e9,
                     "compute_ms": compute, "a2a_ms": comm, "step_no_overlap_ms": compute + comm,
                     "step_dbo_ms": max(compute, comm),
                     "tok_s_per_gpu_dbo": 1e3 * tokens_per_rank / max(compute, comm)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--batch", type=int, default=8, help="decode requests per rank")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dbo", action="store_true", help="two overlapped micro-batches per step")
    ap.add_argument("--model-only", action="store_true", help="print the InfiniBand model only")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.model_only:
        with tempfile.TemporaryDirectory() as tmp:
            model = str(make_model(args.preset, Path(tmp)))
            for world in args.ep:
                row = measure(model, world, args.batch, args.steps, args.dbo and world > 1)
                print(json.dumps({"preset": args.preset, **row}))
                dbo = "on" if row["dbo"] else "off"
                print(f"| {args.preset} | {world} | {args.batch} | {dbo} | {row['step_ms']:.2f} | "
                      f"{row['a2a_ms_per_layer']:.3f} | {100 * row['a2a_fraction']:.0f}% |",
                      flush=True)
    print("| EP | experts/GPU | weights+KV read GB | compute ms | a2a ms | step ms (no overlap) "
          "| step ms (DBO bound) | tok/s/GPU (DBO) |")
    for r in ib_model():
        print(f"| {r['ep']} | {r['experts_per_gpu']} | {r['gpu_gb']:.1f} | "
              f"{r['compute_ms']:.1f} | {r['a2a_ms']:.1f} | {r['step_no_overlap_ms']:.1f} | "
              f"{r['step_dbo_ms']:.1f} | {r['tok_s_per_gpu_dbo']:.0f} |")


if __name__ == "__main__":
    main()
