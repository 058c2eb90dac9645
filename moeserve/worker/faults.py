"""Fault injection for reliability tests: make a worker drop a stream, stall, or break a transfer.

Off by default. Turned on per process with ``--faults`` or the ``MOESERVE_FAULTS`` environment
variable, a comma-separated ``key=value`` list, e.g. ``drop_stream_after=5,stall_prefill_s=30``.
Faults are plain values read by the code paths they affect (worker server, KV pull), so a
production process without the switch runs exactly the normal path.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from moeserve.common.errors import ConfigError
from moeserve.common.truth import parse_bool

__all__ = ["ENV_VAR", "FaultPlan", "parse_faults"]

ENV_VAR = "MOESERVE_FAULTS"


@dataclass(frozen=True)
class FaultPlan:
    """Every field 0 / False means "no fault"."""

    drop_stream_after: int = 0
    """Generate: end the stream with UNAVAILABLE after this many messages (worker stays up)"""
    stall_stream_after: int = 0
    """Generate: stop sending (the request hangs) after this many messages"""
    stall_prefill_s: float = 0.0
    """Prefill: sleep this long before computing (a hanging prefill worker)"""
    fail_prefill: bool = False
    """Prefill: fail with UNAVAILABLE"""
    stall_transfer_s: float = 0.0
    """decode side: hold the KV READ this long before posting it (a stalled transfer)"""
    fail_transfer: bool = False
    """decode side: treat every KV READ as failed"""

    @property
    def active(self) -> bool:
        return self != FaultPlan()


def parse_faults(spec: str | None = None) -> FaultPlan:
    """``FaultPlan`` from ``spec``, or from ``$MOESERVE_FAULTS`` when ``spec`` is None."""
    text = os.environ.get(ENV_VAR, "") if spec is None else spec
    fields = {f.name: f for f in dataclasses.fields(FaultPlan)}
    values: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in fields:
            raise ConfigError(f"unknown fault {key!r} in {ENV_VAR}; known: {sorted(fields)}")
        kind = type(getattr(FaultPlan(), key))
        try:
            if kind is bool:
                values[key] = not sep or parse_bool(raw)
            else:
                values[key] = kind(raw)
        except ValueError:
            raise ConfigError(f"fault {key!r} needs a {kind.__name__}, got {raw!r}") from None
        if values[key] < 0:  # type: ignore[operator]
            raise ConfigError(f"fault {key!r} must be >= 0, got {raw!r}")
    return FaultPlan(**values)  # type: ignore[arg-type]
