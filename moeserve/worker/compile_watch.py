"""Counts the compilations a serving process does after it reported ready.

A worker warms up (worker/warmup.py) so that no request pays for a kernel compilation, an
autotune or a CUDA graph capture; this module checks that promise in production. It hooks the
compilers themselves, process-wide:

- ``triton``: Triton's JIT cache-miss hook (``triton.knobs.runtime.jit_cache_hook``), called
  before every in-process compilation of a new kernel specialization (a new constexpr or
  integer-divisibility key), including one loaded from Triton's on-disk cache;
- ``dynamo``: TorchDynamo's frame compilations (every new frame and every recompile), read
  from its own counters when asked: importing TorchDynamo costs a worker 1.5 s of start-up
  and nothing compiles through it before something else imported it;
- ``cuda_graph``: graph captures, which moeserve's own capture code reports (``note``).

Before ``mark_ready`` events are only counted in ``before_ready``; after it they are logged
(WARNING, naming the kernel) and counted in ``after_ready``, which the worker exports as
``moeserve:worker_compilations_after_ready_total{kind}``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from typing import Any

__all__ = ["CompileWatch", "KINDS", "WATCH"]

logger = logging.getLogger(__name__)

KINDS = ("triton", "dynamo", "cuda_graph")


class CompileWatch:
    def __init__(self) -> None:
        self.ready = False
        self.before_ready: Counter[str] = Counter()
        self.after_ready: Counter[str] = Counter()
        self._lock = threading.Lock()  # Triton compiles from any thread that launches
        self._installed = False
        self._dynamo_at_ready = 0
        # load / capture / warmup seconds of this process's engine (worker/warmup.py)
        self.startup_seconds: dict[str, float] = {}

    def note(self, kind: str, what: str = "") -> None:
        """One compilation of ``kind`` (one of KINDS) happened now."""
        with self._lock:
            (self.after_ready if self.ready else self.before_ready)[kind] += 1
            ready = self.ready
        if ready:
            logger.warning("%s compilation after ready (a request waited for it): %s", kind,
                           what or "?")
        else:  # what the warm-up covered, to compare with a miss (MOESERVE_LOG_LEVEL=debug)
            logger.debug("%s compilation before ready: %s", kind, what or "?")

    def mark_ready(self) -> None:
        with self._lock:
            self._dynamo_at_ready = _dynamo_frames()
            if self._dynamo_at_ready:
                self.before_ready["dynamo"] += self._dynamo_at_ready
            self.ready = True

    def counts_after_ready(self) -> dict[str, int]:
        """Compilations since ``mark_ready``, by kind (every kind of KINDS, zeros included)."""
        with self._lock:
            counts = {kind: self.after_ready[kind] for kind in KINDS}
            if self.ready:
                counts["dynamo"] = _dynamo_frames() - self._dynamo_at_ready
            return counts

    def install(self) -> None:
        """Hook Triton's JIT (when importable); idempotent."""
        if self._installed:
            return
        self._installed = True
        try:
            from triton import knobs
        except ImportError:  # no Triton (or one without knobs): nothing of it can compile
            return
        runtime = knobs.runtime
        previous = runtime.jit_cache_hook

        def on_cache_miss(*, key: Any = None, repr: str = "", **kwargs: Any) -> bool | None:
            # One log line naming the specialization (the key holds the argument classes).
            self.note("triton", " ".join(f"{repr} key={key}".split())[:1500])
            # A hook returning True makes Triton skip the compilation: defer to any other one.
            return previous(key=key, repr=repr, **kwargs) if previous is not None else None

        runtime.jit_cache_hook = on_cache_miss


def _dynamo_frames() -> int:
    """Frames TorchDynamo tried to compile in this process (0 while it was never imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["frames"]["total"])


WATCH = CompileWatch()
"""The process's one watch: the compilers' hooks are process-wide too."""
