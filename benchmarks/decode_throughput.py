"""Decode throughput of the moeserve engine next to HuggingFace transformers, same weights.

Builds a random checkpoint of a preset (default: DeepSeek-V2-Lite shape, bf16), then for each
batch size runs B prompts through prefill and times only the decode steps that follow:
decode tokens/s and mean step time. Then the same with transformers' generate (decode time =
generate(n+1 tokens) - generate(1 token)). Prints a table; --out writes JSON.

  python benchmarks/decode_throughput.py --preset v2-lite --device cuda --batch-sizes 1,32,128
  python benchmarks/decode_throughput.py --preset tiny --device cpu --dtype float32 --no-hf
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 30000)) for _ in range(length)] for _ in range(batch)]


def bench_moeserve(model: str, args, vocab: int) -> list[dict]:
    engine = LLMEngine(EngineConfig(
        model=model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=args.prefill_budget,
        enable_prefix_caching=False, kv_cache_memory_gb=args.kv_gb,
    ))
    params = SamplingParams(max_tokens=args.decode_tokens + 1, temperature=0, ignore_eos=True)
    rows = []
    for batch in [args.batch_sizes[0]] + args.batch_sizes:  # first pass warms up
        for i, p in enumerate(_prompts(batch, args.prompt_len, vocab, batch)):
            engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", p, params)
        started: set[str] = set()
        while len(started) < batch:  # prefill: every request has its first token
            started.update(o.request_id for o in engine.step())
        _sync(args.device)
        t0 = time.perf_counter()
        steps = tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            steps += 1
        _sync(args.device)
        dt = time.perf_counter() - t0
        rows.append({"engine": "moeserve", "batch": batch, "decode_tokens": tokens,
                     "seconds": dt, "tokens_per_s": tokens / dt, "step_ms": 1e3 * dt / steps})
    del engine
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows[1:]


def bench_hf(model: str, args, vocab: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype if args.dtype != "auto" else "bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(args.device).eval()
    rows = []

    def generate(ids, n):
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
        _sync(args.device)
        return time.perf_counter() - t0

    for batch in [args.batch_sizes[0]] + args.batch_sizes:
        ids = torch.tensor(_prompts(batch, args.prompt_len, vocab, batch), device=args.device)
        t_prefill = generate(ids, 1)
        t_all = generate(ids, args.decode_tokens + 1)
        dt = max(t_all - t_prefill, 1e-9)
        tokens = batch * args.decode_tokens
        rows.append({"engine": "transformers", "batch": batch, "decode_tokens": tokens,
                     "seconds": dt, "tokens_per_s": tokens / dt,
                     "step_ms": 1e3 * dt / args.decode_tokens})
    return rows[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-lite")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--model", default=None, help="existing checkpoint instead of a new one")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--prefill-budget", type=int, default=8192)
    ap.add_argument("--kv-gb", type=float, default=1.0, help="CPU KV cache size")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        t0 = time.perf_counter()
        if model is None:
            model = str(make_checkpoint(Path(tmp) / args.preset, args.preset, layers=args.layers,
                                        dtype=args.dtype, device=args.device))
        made = time.perf_counter() - t0
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        rows = bench_moeserve(model, args, vocab)
        if not args.no_hf:
            rows += bench_hf(model, args, vocab)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{args.preset} layers={args.layers or 'all'} {args.dtype} on {device}; prompt "
          f"{args.prompt_len}, {args.decode_tokens} decode steps; checkpoint made in {made:.0f} s")
    print(f"{'engine':<14}{'batch':>6}{'tok/s':>12}{'step ms':>10}")
    for r in rows:
        print(f"{r['engine']:<14}{r['batch']:>6}{r['tokens_per_s']:>12.1f}{r['step_ms']:>10.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": device,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
