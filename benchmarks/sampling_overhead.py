"""Decode step time with logprobs and with penalties / logit_bias / min_p, against plain
sampling, at one batch size (the engine on the embedded tiny model or a checkpoint).

    python benchmarks/sampling_overhead.py --batch 64 --tokens 64 [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import ensure_tiny_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine

CASES = {
    "plain": {},
    "logprobs=5": {"logprobs": 5},
    "penalties+bias+min_p": {"frequency_penalty": 0.5, "presence_penalty": 0.5,
                             "repetition_penalty": 1.1, "logit_bias": {7: 1.0}, "min_p": 0.05},
}


def step_ms(engine: LLMEngine, batch: int, tokens: int, extra: dict) -> float:
    """Mean wall time of a decode step (prefill steps excluded)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.8, ignore_eos=True, **extra)
    for i in range(batch):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", [2 + (i * 37 + j) % 400
                                                           for j in range(32)], params)
    while engine.scheduler.num_waiting:  # the prompts
        engine.step()
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / max(steps, 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = args.model or str(ensure_tiny_checkpoint(Path(tempfile.mkdtemp())))
    engine = LLMEngine(EngineConfig(model=model, max_num_seqs=max(args.batch, 8),
                                    num_kv_blocks=4096))
    step_ms(engine, args.batch, 8, {})  # warm-up (kernels, allocator)
    base = None
    for name, extra in CASES.items():
        ms = min(step_ms(engine, args.batch, args.tokens, extra) for _ in range(args.repeats))
        base = base or ms
        print(f"{name:24s} {ms:7.3f} ms/step  ({(ms / base - 1) * 100:+.1f}% vs plain)")


if __name__ == "__main__":
    main()
