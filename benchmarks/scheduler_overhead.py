"""Host time of a decode step's bookkeeping: the scheduler and KV-cache manager alone.

The model is replaced by a stub that returns a token for every request, so what is timed is
what the engine does around the GPU each step (schedule, allocate, apply tokens, stop checks,
outputs), on the embedded tiny checkpoint's engine with `--batch` running requests.

  python benchmarks/scheduler_overhead.py --batch 1 128 256
"""

from __future__ import annotations

import argparse
import time

import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import ensure_tiny_checkpoint
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.sampler import SampledTokens
from moeserve.worker.scheduler import Scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 128, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--async-scheduling", default="off", choices=["on", "off"],
                    help="on: time the bookkeeping of steps scheduled ahead")
    args = ap.parse_args()
    model = str(ensure_tiny_checkpoint())
    for batch in args.batch:
        engine = LLMEngine(EngineConfig(
            model=model, num_kv_blocks=batch * (args.context + args.steps) // 16 + 64,
            max_num_seqs=max(batch, 1), block_size=16,
            max_num_batched_tokens=max(batch * args.context, 8192),
            enable_prefix_caching=args.prefix_caching, async_scheduling=args.async_scheduling))

        def stub(out):
            ids = [r.request_id for r in out.scheduled
                   if Scheduler.needs_sampling(r, out.num_scheduled_tokens[r.request_id])]
            return SampledTokens(ids, torch.full((len(ids),), 7))

        engine.runner.launch = stub
        params = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(str(i), [(31 * i + j) % 500 + 2 for j in range(args.context)],
                               params)
        engine.step()  # the (stubbed) prefill
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        per_step = (time.perf_counter() - start) / args.steps
        print(f"batch {batch:4d}: {per_step * 1e6:7.0f} us per decode step "
              f"({per_step * 1e6 / batch:.2f} us a request)")


if __name__ == "__main__":
    main()
