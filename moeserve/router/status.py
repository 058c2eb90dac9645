"""The router's view of every worker, as served at GET /v1/status (and mirrored in metrics).

A JSON-ready snapshot: per worker its roles, whether it is connected, ejected (and for how
long), draining, its load and cached blocks, plus the prefill/decode pairs refused as
incompatible, and the router's own admission state.
"""

from __future__ import annotations

import time
from typing import Any

from moeserve.router.serving import Router

__all__ = ["snapshot"]


def snapshot(router: Router) -> dict[str, Any]:
    pool, now = router.pool, time.monotonic()
    workers = []
    for c in pool.clients.values():
        workers.append({
            "address": c.address,
            "roles": sorted(c.roles),
            "available": c.available(now),
            "healthy": c.healthy,
            "draining": c.draining,
            "ejected": now < c.ejected_until,
            "ejected_for_s": round(max(c.ejected_until - now, 0.0), 3),
            "ejections": c.ejections,
            "last_error": c.last_error,
            "num_running": c.load.num_running,
            "num_waiting": c.load.num_waiting,
            "kv_usage": round(c.load.kv_usage, 4),
            "cached_blocks": pool.index.num_blocks(c.address),
            "router_inflight": c.inflight,
            "compat_fingerprint": c.fingerprint,
        })  # fmt: skip
    s = router.settings
    return {
        "router": {
            "draining": router.draining,
            "inflight": router.inflight,
            "max_inflight": s.max_inflight,
            "inflight_tokens": router.inflight_tokens,
            "max_inflight_tokens": s.max_inflight_tokens,
        },
        "workers": workers,
        "incompatible_pairs": [
            {"prefill": p, "decode": d, "reason": reason}
            for (p, d), reason in sorted(pool.incompatible.items())
        ],
    }
