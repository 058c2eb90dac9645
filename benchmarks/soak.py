"""Soak: steady streamed greedy load on `moeserve up` with a worker SIGKILLed periodically.

    python benchmarks/soak.py --minutes 30 --rate 1 --faults-every 60

Every request's tokens are compared with an uninterrupted in-process run (lost / repeated /
wrong must stay 0; a migration-limit error is counted apart). Each minute prints ok / failed /
migrated counts, TTFT and ITL p50/p99, and every process's RSS; the end prints the totals, the
RSS trend per process, and what a migration costs the client: the longest gap between two
streamed chunks of requests that were mid-stream when their decode worker was killed, next to
the ITL of undisturbed requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(int(round((len(xs) - 1) * p / 100)), len(xs) - 1)]


class Soak:
    def __init__(self, args: argparse.Namespace):
        from moeserve.deploy.local import ClusterSpec, LocalCluster
        from moeserve.worker.checkpoint import ensure_tiny_checkpoint
        from tests import reliability_helpers as h

        self.h, self.args = h, args
        self.model = args.model or str(ensure_tiny_checkpoint())
        self.prompts = [h.prompt_ids(1000 + i, args.prompt_len) for i in range(args.prompts)]
        print(f"reference run of {len(self.prompts)} prompts ...", flush=True)
        self.want = h.reference_tokens(self.model, self.prompts, args.max_tokens)
        spec = ClusterSpec(
            model=self.model, prefill=args.prefill, decode=args.decode, port=0,
            num_kv_blocks=args.num_kv_blocks, metrics=False,
        )  # fmt: skip
        self.cluster = LocalCluster(spec, log=open(args.log, "a") if args.log else None)
        self.results: list[tuple[float, int, object]] = []  # (start, prompt index, Outcome)
        self.kills: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def _one(self, j: int) -> None:
        start = time.monotonic()
        out = self.h.stream_tokens(self.cluster.url, self.prompts[j], self.args.max_tokens)
        with self.lock:
            self.results.append((start, j, out))

    def _kill(self, n: int) -> None:
        import httpx

        role = "decode" if n % 2 == 0 else "prefill"
        status = httpx.get(f"{self.cluster.url}/v1/status", timeout=5).json()
        workers = [w for w in status["workers"] if role in w["roles"] and w["available"]]
        if not workers:
            return
        w = max(workers, key=lambda w: (w["router_inflight"], w["num_running"]))
        child = next(c for c in self.cluster.children if c.address == w["address"])
        os.kill(child.proc.pid, signal.SIGKILL)
        self.kills.append((time.monotonic(), child.name))
        print(f"  SIGKILL {child.name} ({w['router_inflight']} requests on it)", flush=True)

    def _migrations(self) -> float:
        return self.h.metric(f"{self.cluster.url}/metrics", "moeserve:router_migrations_total")

    def _minute(self, m: int, since: float, until: float, migrated: float) -> dict[str, float]:
        h = self.h
        with self.lock:
            done = [(j, o) for s, j, o in self.results if since <= s + o.latency_s < until]
        kinds = Counter(h.classify(o, self.want[j]) for j, o in done)
        ttft = [o.ttft_s for _, o in done if o.ttft_s is not None]
        itl = [x for _, o in done for x in o.itl_s]
        rss = {c.name: h.rss_mib(c.proc.pid) for c in self.cluster.children
               if c.proc.poll() is None}  # fmt: skip
        failed = len(done) - kinds["ok"]
        print(f"min {m:3d}: ok {kinds['ok']:4d} failed {failed:3d} "
              f"(lost {kinds['lost']} repeated {kinds['repeated']} wrong {kinds['wrong']} "
              f"limit {kinds['migration_limit']} error {kinds['error']}) "
              f"migrated {migrated:3.0f} | "
              f"TTFT p50 {_pct(ttft, 50) * 1e3:6.0f} p99 {_pct(ttft, 99) * 1e3:6.0f} ms | "
              f"ITL p50 {_pct(itl, 50) * 1e3:5.1f} p99 {_pct(itl, 99) * 1e3:6.1f} ms | RSS MiB "
              + " ".join(f"{k}={v:.0f}" for k, v in sorted(rss.items())), flush=True)  # fmt: skip
        return rss

    def run(self) -> int:
        a = self.args
        rng = random.Random(a.seed)
        with self.cluster, cf.ThreadPoolExecutor(a.max_concurrency) as pool:
            print(f"cluster up at {self.cluster.url}: {a.prefill} prefill + {a.decode} decode; "
                  f"{a.rate} req/s for {a.minutes} min, a kill every {a.faults_every} s",
                  flush=True)  # fmt: skip
            t0 = time.monotonic()
            end = t0 + a.minutes * 60
            next_req, next_kill, next_minute = t0, t0 + a.faults_every, t0 + 60
            kills, minute, last_mig = 0, 1, 0.0
            rss_rows: list[dict[str, float]] = []
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_req:
                    pool.submit(self._one, rng.randrange(len(self.prompts)))
                    next_req += rng.expovariate(a.rate)
                if a.faults_every and now >= next_kill:
                    self._kill(kills)
                    kills += 1
                    next_kill += a.faults_every
                if now >= next_minute:
                    mig = self._migrations()
                    rss_rows.append(self._minute(minute, next_minute - 60, next_minute,
                                                 mig - last_mig))  # fmt: skip
                    last_mig, minute, next_minute = mig, minute + 1, next_minute + 60
                time.sleep(0.01)
            pool.shutdown(wait=True)
            total_mig = self._migrations()
        return self._summary(total_mig, rss_rows)

    def _summary(self, migrations: float, rss_rows: list[dict[str, float]]) -> int:
        h = self.h
        kinds = Counter(h.classify(o, self.want[j]) for _, j, o in self.results)
        print(f"\ntotal: {len(self.results)} requests: ok {kinds['ok']} lost {kinds['lost']} "
              f"repeated {kinds['repeated']} wrong {kinds['wrong']} migration-limit "
              f"{kinds['migration_limit']} other errors {kinds['error']}; migrations "
              f"{migrations:.0f}; kills {len(self.kills)}")  # fmt: skip
        if len(rss_rows) >= 2:
            first, last = rss_rows[0], rss_rows[-1]
            print("RSS first -> last minute (MiB): " + ", ".join(
                f"{k} {first[k]:.0f}->{last.get(k, float('nan')):.0f}" for k in sorted(first)))
        kill_times = [t for t, name in self.kills if name.startswith("decode")]
        hit = [o for s, _, o in self.results
               if any(s < t < s + o.latency_s for t in kill_times) and o.error is None]
        calm = [x for s, _, o in self.results for x in o.itl_s
                if not any(s < t < s + o.latency_s for t in kill_times)]
        if hit:
            gaps = [o.max_gap_s for o in hit]
            print(f"migration cost: {len(hit)} requests mid-stream at a decode kill; their "
                  f"longest chunk gap p50 {statistics.median(gaps) * 1e3:.0f} ms, max "
                  f"{max(gaps) * 1e3:.0f} ms (undisturbed ITL p50 {_pct(calm, 50) * 1e3:.1f} ms, "
                  f"p99 {_pct(calm, 99) * 1e3:.1f} ms)")  # fmt: skip
        bad = kinds["lost"] + kinds["repeated"] + kinds["wrong"] + kinds["error"]
        return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--faults-every", type=float, default=60.0,
                   help="seconds between SIGKILLs (alternately decode, prefill); 0: none")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=60)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=96)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="append the children's output to this file")
    args = p.parse_args()
    # `python benchmarks/soak.py` from the repository root: the shared request helpers live
    # in tests/ (the e2e tests use the same ones).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
