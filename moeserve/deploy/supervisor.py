"""Restart dead children of `moeserve up` with backoff, as Kubernetes or Ray would restart them.

A restarted child gets the same ports it had (its first start bound port 0 and printed the port
it got), so the router's worker list stays valid and the router re-admits the worker once it
answers Health again. The backoff doubles per restart and resets after a child has run for
``stable_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RestartPolicy", "Supervisor", "fixed_port_args"]

logger = logging.getLogger(__name__)


@dataclass
class RestartPolicy:
    base_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    stable_s: float = 30.0
    max_restarts: int = 1000


@dataclass
class _State:
    restarts: int = 0
    next_backoff_s: float = 0.0
    due: float = 0.0
    started: float = field(default_factory=time.monotonic)


def fixed_port_args(args: list[str], ports: dict[str, str]) -> list[str]:
    """``args`` with each ``--flag 0`` in ``ports`` replaced by the port the child got.

    A flag the child was not given but whose port it printed (the router's ``--grpc-port``,
    0 by default) is appended, so the restart binds that port again instead of a new one.
    """
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in ports and out[i + 1] == "0" and ports[a]:
            out[i + 1] = ports[a]
    for flag, port in ports.items():
        given = any(a == flag or a.startswith(flag + "=") for a in out)
        if port and not given:
            out += [flag, port]
    return out


class Supervisor:
    """Polls children; ``respawn(child)`` restarts one. ``exited(child)`` says whether it died."""

    def __init__(
        self, children: Callable[[], list], exited: Callable[[object], bool],
        respawn: Callable[[object], None], policy: RestartPolicy | None = None,
        poll_s: float = 0.1,
    ):  # fmt: skip
        self.children = children
        self.exited = exited
        self.respawn = respawn
        self.policy = policy or RestartPolicy()
        self.poll_s = poll_s
        self.restarts: dict[str, int] = {}
        self._state: dict[int, _State] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        p = self.policy
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            for child in self.children():
                st = self._state.setdefault(id(child), _State())
                if not self.exited(child):
                    if now - st.started > p.stable_s:
                        st.next_backoff_s = 0.0
                    continue
                if st.restarts >= p.max_restarts:
                    continue
                if st.due == 0.0:
                    st.next_backoff_s = min(max(st.next_backoff_s * 2, p.base_backoff_s),
                                            p.max_backoff_s)  # fmt: skip
                    st.due = now + st.next_backoff_s
                    logger.warning("%s exited; restarting in %.1f s", child.name, st.next_backoff_s)
                if now < st.due or self._stop.is_set():
                    continue
                st.restarts += 1
                st.due, st.started = 0.0, now
                self.restarts[child.name] = st.restarts
                try:
                    self.respawn(child)
                except Exception:  # it stays dead; the next poll schedules another try
                    logger.exception("restarting %s failed", child.name)
