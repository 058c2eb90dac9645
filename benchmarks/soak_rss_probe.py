"""Which soak attack leaves memory in the router: `moeserve up` (tiny model, CPU), a light
plain load, and each attack kind alone, a few at a time, with the router's RSS measured quiet
(no attack in flight) before and after each round.

    python benchmarks/soak_rss_probe.py                          # every kind, 2 rounds of 4
    python benchmarks/soak_rss_probe.py --kinds partial_bodies --rounds 3

Prints, per round, the median of the quiet samples before and after and the peak in between;
a kind that leaves memory behind shows as "after" above "before", round after round.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import threading
import time
from pathlib import Path


def _quiet_rss(pid: int, seconds: float, rss_mib) -> float:  # noqa: ANN001
    """Median of samples every 0.5 s over ``seconds``, after a 1 s settle."""
    time.sleep(1.0)
    xs = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        xs.append(rss_mib(pid))
        time.sleep(0.5)
    return statistics.median(xs)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import soak_attacks as atk
    from moeserve.deploy.local import ClusterSpec, LocalCluster
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint
    from tests import reliability_helpers as h

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(atk.KINDS), help="comma-separated attack kinds")
    p.add_argument("--rounds", type=int, default=2, help="rounds per kind")
    p.add_argument("--per-round", type=int, default=4, help="attacks per round, concurrently")
    p.add_argument("--quiet-s", type=float, default=6.0, help="quiet sampling before / after")
    p.add_argument("--rate", type=float, default=0.5, help="plain requests per second")
    p.add_argument("--partial-bodies", type=int, default=20)
    p.add_argument("--huge-prompt-mb", type=float, default=3.0)
    p.add_argument("--router-args", default="", help="extra router flags, space-separated")
    a = p.parse_args()
    kinds = [k for k in a.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in atk.KINDS]
    if unknown:
        p.error(f"unknown attack kind(s) {unknown}; known: {', '.join(atk.KINDS)}")

    model = str(ensure_tiny_checkpoint())
    prompts = [h.prompt_ids(1000 + i, 60) for i in range(8)]
    want = h.reference_tokens(model, prompts, 32)
    spec = ClusterSpec(model=model, prefill=1, decode=1, port=0, num_kv_blocks=96,
                       metrics=False, router_args=a.router_args.split())  # fmt: skip
    stop = threading.Event()
    with LocalCluster(spec) as c:
        pid = c.worker("router").proc.pid
        attacks = atk.Attacks(c.url, c.grpc_address, prompts, want, 32, a.huge_prompt_mb,
                              a.partial_bodies)  # fmt: skip

        def load() -> None:
            n = 0
            while not stop.wait(1 / a.rate):
                h.stream_tokens(c.url, prompts[n % len(prompts)], 32)
                n += 1

        threading.Thread(target=load, daemon=True).start()
        for _ in range(4):  # warm-up: every kind once, pools and caches sized
            for k in atk.KINDS:
                if k not in ("partial_bodies", "slow_headers"):
                    attacks.run(k)
        print(f"router pid {pid}, after warm-up {_quiet_rss(pid, a.quiet_s, h.rss_mib):.1f} MiB",
              flush=True)  # fmt: skip
        with cf.ThreadPoolExecutor(a.per_round) as pool:
            for kind in kinds:
                for r in range(a.rounds):
                    before = _quiet_rss(pid, a.quiet_s, h.rss_mib)
                    peak = [0.0]
                    futs = [pool.submit(attacks.run, kind) for _ in range(a.per_round)]
                    while not all(f.done() for f in futs):
                        peak[0] = max(peak[0], h.rss_mib(pid))
                        time.sleep(0.2)
                    after = _quiet_rss(pid, a.quiet_s, h.rss_mib)
                    print(f"{kind:<18} round {r + 1}: before {before:6.1f}  peak {peak[0]:6.1f}"
                          f"  after {after:6.1f} MiB  ({after - before:+.1f})", flush=True)
        stop.set()
    log = attacks.log
    print(f"attacks: expected {dict(log.expected)}, unexpected {dict(log.unexpected)}, "
          f"notes {log.notes[:3]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
