"""Soak: streamed greedy load on `moeserve up`, workers SIGKILLed and SIGSTOPped periodically,
issue 22's attacks mixed in; exits non-zero when a target fails.

    python benchmarks/soak.py --minutes 30              # the issue's run
    python benchmarks/soak.py --minutes 5 --log soak.log
    python benchmarks/soak.py --minutes 4 --attacks partial_bodies   # one attack kind only

Targets, checked at the end (a one-screen summary, PASS/FAIL per line):

- tokens: every request's tokens equal an uninterrupted in-process run: 0 lost, 0 repeated,
  0 wrong, 0 other errors (a migration-limit error, retryable by contract, is counted apart);
- attacks (benchmarks/soak_attacks.py): each answered as a hardened router must, 0 unexpected;
- router RSS: flat, within +5%: the median of each whole ``--rss-window-s`` window after the
  warm-up, over the samples taken with no attack in flight (none ended within a sample
  period; no attack starts in the last ``--rss-quiet-s`` of each window), and the RSS once
  the load has stopped and ten plain requests have run, against the first window's median;
  the medians over all samples are printed too.
  Peaks while attacks are in flight (a 3 MiB prompt being tokenized, bodies held open) are
  printed but not judged: the router's limits bound them; what must not happen is memory kept
  after they end (the issue's 380 MiB that never came back);
- /health: p99 latency under 100 ms over the whole run (a keep-alive client, every 250 ms);
- ejections: none of a healthy worker (one outside every kill / freeze window of that worker,
  from the router's "ejecting worker" log lines).

Each minute prints ok / failed / migrated counts, TTFT and ITL p50/p99, /health p99, the load
average and every process's RSS.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

RSS_DRIFT = 0.05
HEALTH_P99_MS = 100.0


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(int(round((len(xs) - 1) * p / 100)), len(xs) - 1)]


class Soak:
    def __init__(self, args: argparse.Namespace):
        from benchmarks import soak_attacks as atk
        from moeserve.deploy.local import ClusterSpec, LocalCluster
        from moeserve.worker.checkpoint import ensure_tiny_checkpoint
        from tests import reliability_helpers as h

        self.h, self.atk, self.args = h, atk, args
        self.model = args.model or str(ensure_tiny_checkpoint())
        self.prompts = [h.prompt_ids(1000 + i, args.prompt_len) for i in range(args.prompts)]
        print(f"reference run of {len(self.prompts)} prompts ...", flush=True)
        self.want = h.reference_tokens(self.model, self.prompts, args.max_tokens)
        spec = ClusterSpec(
            model=self.model, prefill=args.prefill, decode=args.decode, port=0,
            num_kv_blocks=args.num_kv_blocks, metrics=False,
        )  # fmt: skip
        self.log = atk.EjectionLog(open(args.log, "a") if args.log else None)
        self.cluster = LocalCluster(spec, log=self.log)
        self.results: list[tuple[float, int, object]] = []  # (start, prompt index, Outcome)
        self.faults: list[tuple[float, float, str, str]] = []  # (start, end, address, what)
        self.frozen: set[int] = set()
        self.lock = threading.Lock()

    def _one(self, j: int) -> None:
        start = time.monotonic()
        out = self.h.stream_tokens(self.cluster.url, self.prompts[j], self.args.max_tokens)
        with self.lock:
            self.results.append((start, j, out))

    def _pick(self, role: str):  # noqa: ANN202 (a LocalCluster child)
        import httpx

        try:
            status = httpx.get(f"{self.cluster.url}/v1/status", timeout=5).json()
        except httpx.HTTPError as e:
            print(f"  no fault this time: /v1/status failed ({e})", flush=True)
            return None
        workers = [w for w in status["workers"] if role in w["roles"] and w["available"]]
        if not workers:
            return None
        w = max(workers, key=lambda w: (w["router_inflight"], w["num_running"]))
        return next(c for c in self.cluster.children if c.address == w["address"])

    def _kill(self, n: int) -> None:
        child = self._pick("decode" if n % 2 == 0 else "prefill")
        if child is None:
            return
        now = time.monotonic()
        os.kill(child.proc.pid, signal.SIGKILL)
        # Ejected, restarted on the same port, probed healthy again: all within the window.
        self.faults.append((now, now + self.args.fault_window_s, child.address, "kill"))
        print(f"  SIGKILL {child.name}", flush=True)

    def _freeze(self, n: int) -> None:
        child = self._pick("decode" if n % 2 == 0 else "prefill")
        if child is None:
            return
        pid, now = child.proc.pid, time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)
        end = now + self.args.freeze_s
        self.faults.append((now, end + self.args.fault_window_s, child.address, "freeze"))
        print(f"  SIGSTOP {child.name} for {self.args.freeze_s:.0f} s", flush=True)
        threading.Timer(self.args.freeze_s, self._thaw, (pid,)).start()

    def _thaw(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.frozen.discard(pid)

    def _minute(self, m: int, since: float, until: float, migrated: float) -> None:
        h = self.h
        with self.lock:
            done = [(j, o) for s, j, o in self.results if since <= s + o.latency_s < until]
        kinds = Counter(h.classify(o, self.want[j]) for j, o in done)
        ttft = [o.ttft_s for _, o in done if o.ttft_s is not None]
        itl = [x for _, o in done for x in o.itl_s]
        health = [ms for t, ms in self.watch.health_ms if since <= t < until]
        rss = {c.name: h.rss_mib(c.proc.pid) for c in self.cluster.children
               if c.proc.poll() is None}  # fmt: skip
        print(f"min {m:3d}: ok {kinds['ok']:4d} failed {len(done) - kinds['ok']:3d} "
              f"(lost {kinds['lost']} repeated {kinds['repeated']} wrong {kinds['wrong']} "
              f"limit {kinds['migration_limit']} error {kinds['error']}) "
              f"migrated {migrated:3.0f} | TTFT p50 {_pct(ttft, 50) * 1e3:5.0f} "
              f"p99 {_pct(ttft, 99) * 1e3:5.0f} ms | ITL p50 {_pct(itl, 50) * 1e3:5.1f} "
              f"p99 {_pct(itl, 99) * 1e3:6.1f} ms | /health p99 {_pct(health, 99):5.1f} ms | "
              f"load {os.getloadavg()[0]:.1f} | RSS MiB "
              + " ".join(f"{k}={v:.0f}" for k, v in sorted(rss.items())), flush=True)  # fmt: skip

    def run(self) -> int:
        a = self.args
        rng = random.Random(a.seed)
        self.load_start = os.getloadavg()
        with self.cluster, cf.ThreadPoolExecutor(a.max_concurrency) as pool, \
                cf.ThreadPoolExecutor(8) as attackers:  # fmt: skip
            c = self.cluster
            router = c.worker("router")
            attacks = self.atk.Attacks(c.url, c.grpc_address, self.prompts, self.want,
                                       a.max_tokens, a.huge_prompt_mb, a.partial_bodies)
            self.watch = self.atk.Watch(c.url, lambda: router.proc.pid, attacks.quiet).start()
            print(f"cluster up at {c.url}: {a.prefill} prefill + {a.decode} decode; {a.rate} "
                  f"req/s for {a.minutes} min; a kill every {a.faults_every} s, a "
                  f"{a.freeze_s:.0f} s freeze every {a.freeze_every} s, an attack every "
                  f"{a.attack_every} s; load average {self.load_start[0]:.2f} on "
                  f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
            t0 = self.t0 = time.monotonic()
            end = t0 + a.minutes * 60
            next_req, next_minute = t0, t0 + 60
            # Freezes half-way between kills: one fault at a time.
            next_kill = t0 + a.faults_every
            next_freeze = t0 + a.freeze_every / 2 + a.faults_every / 2
            next_attack = t0 + 1
            kills = freezes = n_attacks = 0
            minute, last_mig = 1, 0.0
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_req:
                    pool.submit(self._one, rng.randrange(len(self.prompts)))
                    next_req += rng.expovariate(a.rate)
                if a.faults_every and now >= next_kill:
                    self._kill(kills)
                    kills, next_kill = kills + 1, next_kill + a.faults_every
                if a.freeze_every and now >= next_freeze:
                    self._freeze(freezes)
                    freezes, next_freeze = freezes + 1, next_freeze + a.freeze_every
                # The tail of each RSS window starts no attack: the router's memory is sampled
                # with nothing of theirs in flight (what it kept, not what it is handling).
                quiet = (now - t0) % a.rss_window_s >= a.rss_window_s - a.rss_quiet_s
                if a.attack_every and now >= next_attack and not quiet:
                    kind = a.attacks[n_attacks % len(a.attacks)]
                    attackers.submit(attacks.run, kind)
                    n_attacks, next_attack = n_attacks + 1, next_attack + a.attack_every
                if now >= next_minute:
                    mig = self._migrations()
                    self._minute(minute, next_minute - 60, next_minute, mig - last_mig)
                    last_mig, minute, next_minute = mig, minute + 1, next_minute + 60
                time.sleep(0.01)
            for pid in list(self.frozen):
                self._thaw(pid)
            pool.shutdown(wait=True)
            attackers.shutdown(wait=True)
            time.sleep(2 * self.atk.SAMPLE_EVERY_S)  # a sample with nothing in flight
            self.idle_rss = self.h.rss_mib(router.proc.pid)
            for j in range(10):
                self.h.stream_tokens(c.url, self.prompts[j % len(self.prompts)], a.max_tokens)
            self.settled_rss = self.h.rss_mib(router.proc.pid)
            self.watch.close()
            total_mig = self._migrations()
        return self._summary(total_mig, attacks)

    def _migrations(self) -> float:
        try:
            return self.h.metric(f"{self.cluster.url}/metrics", "moeserve:router_migrations_total")
        except Exception:  # the router busy or restarting: the count is only reported
            return float("nan")

    def _rss_check(self) -> tuple[str, bool, str]:
        a, start = self.args, self.t0 + self.args.warmup_s
        medians: list[float] = []  # samples with no attack in flight: what the router kept
        busy: list[float] = []  # all samples, attacks in flight included: printed, not judged
        while start + a.rss_window_s <= self.t0 + a.minutes * 60:  # whole windows of the load
            end = start + a.rss_window_s
            window = [(mib, q) for t, mib, q in self.watch.rss if start <= t < end]
            kept = [mib for mib, q in window if q]
            if kept:
                medians.append(statistics.median(kept))
            if window:
                busy.append(statistics.median(mib for mib, _ in window))
            start += a.rss_window_s
        if not medians:
            return ("router RSS", False, "no quiet sample after the warm-up: run longer")
        peak = max(mib for _, mib, _ in self.watch.rss)
        drift = max(*medians, self.settled_rss) / medians[0] - 1
        return ("router RSS", drift <= RSS_DRIFT,
                f"median per {a.rss_window_s:.0f} s window after a {a.warmup_s:.0f} s warm-up, "
                "no attack in flight: " + " ".join(f"{m:.0f}" for m in medians[:10])
                + " MiB (all samples: " + " ".join(f"{m:.0f}" for m in busy[:10]) + "), at the end "
                f"{self.settled_rss:.0f} ({drift * 100:+.1f}%, limit +{RSS_DRIFT * 100:.0f}%); "
                f"idle right after the load {self.idle_rss:.0f}, peak {peak:.0f}")  # fmt: skip

    def _migration_cost(self) -> str:
        """The longest chunk gap of requests mid-stream at a decode kill or freeze, next to the
        inter-token latency of undisturbed ones."""
        hits = [(s, e) for s, e, addr, _ in self.faults if "decode" in self._name(addr)]
        hit = [o.max_gap_s for s, _, o in self.results if o.error is None
               and any(s < fs < s + o.latency_s for fs, _ in hits)]  # fmt: skip
        calm = [x for s, _, o in self.results for x in o.itl_s
                if not any(s < fs < s + o.latency_s for fs, _ in hits)]
        if not hit:
            return "no request was mid-stream at a decode fault"
        return (f"{len(hit)} requests mid-stream at a decode kill/freeze: longest chunk gap p50 "
                f"{_pct(hit, 50) * 1e3:.0f} ms, max {max(hit) * 1e3:.0f} ms (undisturbed ITL p50 "
                f"{_pct(calm, 50) * 1e3:.1f}, p99 {_pct(calm, 99) * 1e3:.1f} ms)")

    def _name(self, address: str) -> str:
        return next((c.name for c in self.cluster.children if c.address == address), "")

    def _summary(self, migrations: float, attacks) -> int:  # noqa: ANN001
        a, w = self.args, self.watch
        checks: list[tuple[str, bool, str]] = []
        kinds = Counter(self.h.classify(o, self.want[j]) for _, j, o in self.results)
        bad = kinds["lost"] + kinds["repeated"] + kinds["wrong"] + kinds["error"]
        errors = Counter(str(o.error.get("message", ""))[:60] for _, j, o in self.results
                         if self.h.classify(o, self.want[j]) == "error")  # fmt: skip
        checks.append(("tokens", bad == 0 and len(self.results) > 0,
                       f"{len(self.results)} requests: ok {kinds['ok']}, lost {kinds['lost']}, "
                       f"repeated {kinds['repeated']}, wrong {kinds['wrong']}, errors "
                       f"{kinds['error']}; migration-limit {kinds['migration_limit']}; "
                       f"migrations {migrations:.0f}"))  # fmt: skip
        log = attacks.log
        checks.append(("attacks", not log.unexpected and sum(log.expected.values()) > 0,
                       "as expected " + ", ".join(f"{k} {log.expected[k]}" for k in
                                                  a.attacks) +
                       f"; retryable {sum(log.retryable.values())}; unexpected "
                       f"{sum(log.unexpected.values())}"))  # fmt: skip
        checks.append(self._rss_check())
        ms = [x for _, x in w.health_ms]
        p99 = _pct(ms, 99)
        checks.append(("/health", bool(ms) and p99 < HEALTH_P99_MS and not w.health_errors,
                       f"{len(ms)} probes: p50 {_pct(ms, 50):.1f} ms, p99 {p99:.1f} ms, max "
                       f"{max(ms, default=float('nan')):.1f} ms, errors {w.health_errors} "
                       f"(limit p99 {HEALTH_P99_MS:.0f} ms)"))  # fmt: skip
        healthy = [(t, addr, why) for t, addr, why in self.log.ejections
                   if not any(s - 1 <= t <= e and addr == fa for s, e, fa, _ in self.faults)]
        checks.append(("ejections", not healthy,
                       f"{len(self.log.ejections)} in all, {len(healthy)} of a healthy worker; "
                       f"faults: {Counter(f[3] for f in self.faults)}"))  # fmt: skip
        loads = [x for _, x in w.load]
        print(f"\n=== soak summary: {a.minutes} min, {a.prefill} prefill + {a.decode} decode, "
              f"{a.rate} req/s; load average {self.load_start[0]:.2f} at start, max "
              f"{max(loads, default=0):.2f}, {os.getloadavg()[0]:.2f} at end "
              f"({os.cpu_count()} CPUs) ===")  # fmt: skip
        for name, ok, detail in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name:<11} {detail}")
        print(f"      {self._migration_cost()}")
        for msg, n in errors.most_common(3):
            print(f"      error x{n}: {msg}")
        for note in log.notes[:5]:
            print(f"      unexpected {note}")
        for t, addr, why in healthy[:5]:
            print(f"      healthy worker ejected at {t - self.t0:.0f} s: {addr}: {why[:70]}")
        failed = [name for name, ok, _ in checks if not ok]
        print("RESULT: " + ("PASS" if not failed else "FAIL (" + ", ".join(failed) + ")"))
        return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="duration of the load")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--faults-every", type=float, default=60.0,
                   help="seconds between SIGKILLs (alternately decode, prefill); 0: none")
    p.add_argument("--freeze-every", type=float, default=120.0,
                   help="seconds between SIGSTOPs of a worker (alternately decode, prefill), "
                        "half-way between kills; 0: none")
    p.add_argument("--freeze-s", type=float, default=8.0, help="how long a worker stays frozen")
    p.add_argument("--fault-window-s", type=float, default=45.0,
                   help="after a kill (or a thaw): ejections of that worker are expected")
    p.add_argument("--attack-every", type=float, default=5.0,
                   help="seconds between attacks (each kind of benchmarks/soak_attacks.py in "
                        "turn); 0: none")
    p.add_argument("--attacks", default=None,
                   help="comma-separated attack kinds to run in turn (default: all of "
                        "benchmarks/soak_attacks.py)")
    p.add_argument("--huge-prompt-mb", type=float, default=3.0)
    p.add_argument("--partial-bodies", type=int, default=20,
                   help="bodies held open at once by one partial_bodies attack (1 MiB each)")
    p.add_argument("--warmup-s", type=float, default=60.0,
                   help="router RSS is judged from this on (allocator pools, caches fill)")
    p.add_argument("--rss-window-s", type=float, default=120.0,
                   help="the router RSS median is taken per window of this length")
    p.add_argument("--rss-quiet-s", type=float, default=40.0,
                   help="no attack starts in the last this many seconds of each RSS window "
                        "(longer than an attack lasts: a held body up to the 30 s body timeout)")
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
    # in tests/ (the e2e tests use the same ones), the attacks beside this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.soak_attacks import KINDS

    args.attacks = [k for k in (args.attacks or ",".join(KINDS)).split(",") if k]
    unknown = [k for k in args.attacks if k not in KINDS]
    if unknown or not args.attacks:
        p.error(f"--attacks: unknown or no kind {unknown}; known: {', '.join(KINDS)}")
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
