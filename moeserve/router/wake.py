"""Hold requests while the deployment is scaled to zero, and tell the autoscaler about them.

With no decode worker known at all (the operator scaled both pools to zero after an idle
period), a request waits up to ``hold_s`` for one to appear instead of the usual few seconds,
and while it waits the gauge ``moeserve:router_requests_held`` counts it: the operator's SLA
autoscaler reads that series and wakes a decode group (and a prefill group if the spec wants
one). A hold that runs out ends with a clear 503 naming the wait, never a hang.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge

from moeserve.common.spec import METRIC_REQUESTS_HELD

__all__ = ["WakeGate", "METRIC_REQUESTS_HELD"]



class WakeGate:
    def __init__(self, hold_s: float, registry: CollectorRegistry | None = None):
        self.hold_s = hold_s
        self.held = 0
        self._gauge = Gauge(METRIC_REQUESTS_HELD, "Requests held while the deployment wakes "
                            "from zero groups.", registry=registry)

    @property
    def enabled(self) -> bool:
        return self.hold_s > 0

    def wait_s(self, any_decoder_known: bool, default_s: float) -> float:
        """How long a request may wait for a decode worker: the hold while at zero."""
        return self.hold_s if self.enabled and not any_decoder_known else default_s

    @contextlib.contextmanager
    def holding(self, active: bool) -> Iterator[None]:
        if not active:
            yield
            return
        self.held += 1
        self._gauge.set(self.held)
        try:
            yield
        finally:
            self.held -= 1
            self._gauge.set(self.held)
