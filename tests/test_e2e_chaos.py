"""Chaos on CPU: `moeserve up --prefill 2 --decode 2` under steady streamed greedy load; one
decode and one prefill worker are SIGKILLed mid-load and restarted by the supervisor. Every
request must end with exactly the tokens of an uninterrupted run, or (only where the migration
limit was hit) a clear retryable error.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from moeserve.deploy.local import ClusterSpec, LocalCluster
from tests.reliability_helpers import classify, metric, prompt_ids, reference_tokens, stream_tokens

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MAX_TOKENS = 48
CLIENTS = 4
PROMPTS = [prompt_ids(s) for s in range(12)]


def _busiest(cluster: LocalCluster, role: str) -> str:
    """Name of the child of ``role`` the router has the most requests on (mid-stream)."""
    status = httpx.get(f"{cluster.url}/v1/status", timeout=5).json()
    workers = [w for w in status["workers"] if role in w["roles"]]
    best = max(workers, key=lambda w: (w["router_inflight"], w["num_running"]))
    return next(c.name for c in cluster.children if c.address == best["address"])


def _all_available(cluster: LocalCluster) -> bool:
    status = httpx.get(f"{cluster.url}/v1/status", timeout=5).json()
    return all(w["available"] for w in status["workers"])


def test_chaos_kill_decode_and_prefill_mid_load(model_dir: Path) -> None:
    want = reference_tokens(str(model_dir), PROMPTS, MAX_TOKENS)
    spec = ClusterSpec(
        model=str(model_dir), prefill=2, decode=2, port=0, num_kv_blocks=96, metrics=True,
        router_args=["--stall-timeout-s", "10", "--eject-base-s", "0.5"],
    )  # fmt: skip
    results: list[tuple[int, object]] = []
    stop = threading.Event()

    with LocalCluster(spec, log=None) as cluster:
        def client(k: int) -> None:
            with httpx.Client(timeout=120) as http:
                i = k
                while not stop.is_set():
                    j = i % len(PROMPTS)
                    results.append((j, stream_tokens(cluster.url, PROMPTS[j], MAX_TOKENS,
                                                     client=http)))  # fmt: skip
                    i += CLIENTS

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(3.0)  # steady load: every client mid-stream
        decode = _busiest(cluster, "decode")
        os.kill(cluster.worker(decode).proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        prefill = _busiest(cluster, "prefill")
        os.kill(cluster.worker(prefill).proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # Load goes on until both are restarted and re-admitted, then a little longer.
        while not (cluster.supervisor.restarts.get(decode) and
                   cluster.supervisor.restarts.get(prefill) and _all_available(cluster)):
            assert time.monotonic() - killed_at < 180, "killed workers did not come back"
            time.sleep(0.5)
        recovered_s = time.monotonic() - killed_at
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(150)
        migrations = metric(f"{cluster.url}/metrics", "moeserve:router_migrations_total")

    counts = Counter(classify(out, want[j]) for j, out in results)
    print(f"\nchaos: {len(results)} requests, killed {decode} + {prefill}, back after "
          f"{recovered_s:.1f} s; ok {counts['ok']} lost {counts['lost']} repeated "
          f"{counts['repeated']} wrong {counts['wrong']} migration-limit "
          f"{counts['migration_limit']} other errors {counts['error']}; router migrations "
          f"{migrations:.0f}")  # fmt: skip
    errors = [out.error for j, out in results if classify(out, want[j]) == "error"]
    assert counts["lost"] == counts["repeated"] == counts["wrong"] == 0
    assert counts["error"] == 0, errors[:3]
    assert migrations >= 1 and counts["ok"] >= len(results) - counts["migration_limit"]
