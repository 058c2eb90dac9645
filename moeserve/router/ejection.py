"""Passive health: how long a worker whose call failed stays out of routing. Pure state.

One fault is one event, however many calls it breaks: a dead or frozen worker fails every
request it holds within a few milliseconds, and counting each of them would push the backoff
to its cap at once (one fault with 8 calls in flight used to eject for 1, 2, 4, ... 30 s, and
the restarted worker then sat idle for 30 s). So a failure while the worker is still ejected
belongs to the fault that ejected it and changes nothing; the backoff doubles only for a new
fault after the worker came back, and a call that succeeds resets it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Ejection"]


@dataclass
class Ejection:
    """One worker's ejection state."""

    until: float = 0.0
    """monotonic time the current ejection ends (0: never ejected)"""
    consecutive: int = 0
    """ejection events since the last successful call"""
    count: int = 0
    """ejection events in all"""

    def ejected(self, now: float) -> bool:
        return now < self.until

    def fail(self, now: float, base_s: float, max_s: float) -> float | None:
        """A call failed at ``now``: the new ejection's length, or None when the failure falls
        in the current ejection (the same event)."""
        if self.ejected(now):
            return None
        backoff = min(base_s * 2**self.consecutive, max_s)
        self.consecutive += 1
        self.count += 1
        self.until = now + backoff
        return backoff

    def succeed(self) -> None:
        self.consecutive = 0
