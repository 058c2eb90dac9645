"""Progress of long work a user waits on: checkpoint writing, weight loading, bench requests.

One policy for all of them. On a terminal (stderr is a TTY): a tqdm bar on stderr. Elsewhere
(pods, CI, pipes): a log line at most every `LOG_INTERVAL_S`, so a ten-minute weight load says
where it is while a load of a second says nothing. Both only while the caller's logger is at
INFO or below. $MOESERVE_PROGRESS=1 forces the bar (tests, `script` captures), =0 turns both off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

from moeserve.common.truth import FALSE_WORDS, TRUE_WORDS

__all__ = ["ENV_PROGRESS", "LOG_INTERVAL_S", "Progress", "progress", "track"]

ENV_PROGRESS = "MOESERVE_PROGRESS"
LOG_INTERVAL_S = 10.0

T = TypeVar("T")


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> None: ...
    def __enter__(self) -> Progress: ...
    def __exit__(self, *exc: object) -> Any: ...


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LogProgress(_Closing):
    """The non-terminal form: a periodic `desc: done/total unit (pct)` log line."""

    def __init__(self, total: int | None, desc: str, unit: str, unit_scale: bool,
                 logger: logging.Logger, interval_s: float) -> None:
        self.total, self.desc, self.unit, self.logger = total, desc, unit, logger
        self.unit_scale, self.interval_s = unit_scale, interval_s
        self.n = 0
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            count = self._count(self.n) + (f"/{self._count(self.total)}" if self.total else "")
            if not self.unit_scale:
                count += f" {self.unit}s"
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            self.logger.info("%s: %s%s", self.desc, count, pct)

    def _count(self, n: int) -> str:
        """As tqdm writes counts: `12/91 tensors`, `1.85GB/4.87GB`."""
        return tqdm.format_sizeof(n) + self.unit if self.unit_scale else str(n)


class _NoProgress(_Closing):
    def update(self, n: int = 1) -> None:
        pass


def progress(total: int | None, desc: str, *, unit: str = "it", unit_scale: bool = False,
             logger: logging.Logger | None = None, enabled: bool = True) -> Progress:
    """A progress reporter for `total` units of work (None: unknown): a context manager with
    update(n), closed on exit (tqdm's interface).
    `unit_scale`: show counts with k/M/G prefixes (for bytes or parameters).

    `logger` is the caller's: its level decides whether anything shows, and the non-terminal
    lines go through it. `enabled=False` is for the caller that knows it is a duplicate (every
    EP rank but the first loads the same checkpoint).
    """
    log = logger or logging.getLogger("moeserve")
    forced = os.environ.get(ENV_PROGRESS, "").strip().lower()
    if not enabled or (forced and forced in FALSE_WORDS):
        return _NoProgress()
    bar = dict(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
               mininterval=0.5)
    if forced in TRUE_WORDS:
        return tqdm(**bar)
    if not log.isEnabledFor(logging.INFO):
        return _NoProgress()
    if sys.stderr is not None and sys.stderr.isatty():
        return tqdm(**bar)
    return _LogProgress(total, desc, unit, unit_scale, log, LOG_INTERVAL_S)


def track(items: Iterable[T], total: int | None, desc: str, *, unit: str = "it",
          logger: logging.Logger | None = None, enabled: bool = True) -> Iterator[T]:
    """Yield from `items`, counting one unit per item; the reporter closes when they run out."""
    with progress(total, desc, unit=unit, logger=logger, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
