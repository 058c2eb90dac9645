"""`moeserve up` stops cleanly on SIGTERM and SIGINT: within a few seconds, exit code 0, nothing
left running, and nothing alarming on the terminal (no traceback, no "terminate called" from an
EP rank, no ERROR line). The Ray target is tests/ray/test_ray_clean_stop.py.

Exit code 0: the stop was asked for and done in order (the router and workers drain), as the
router and workers themselves exit 0 after a drain; Kubernetes then reports the pod Completed.
"""

from __future__ import annotations

import signal

import pytest

from tests.stop_helpers import start_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Measured on 2 shared CPU cores: 2.7 s (manifest, SIGINT) to 4.6 s (plain, SIGTERM).
STOP_LIMIT_S = 10.0
TARGETS = {
    "plain": [],
    # One prefill worker and a decode pool of one EP group of 2 ranks.
    "manifest": ["-f", "examples/tiny-cpu.yaml", "--local"],
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_signal_stops_up_cleanly(target: str, sig: signal.Signals) -> None:
    up = start_up(*TARGETS[target])
    assert up.wait_for("Ctrl-C stops everything.", 240), "".join(up.err[-40:])
    stopped = up.stop(sig, timeout_s=60)
    assert stopped.code == 0, stopped.stderr[-4000:]
    assert stopped.elapsed_s < STOP_LIMIT_S
    assert not stopped.left, "processes outlived moeserve up"
    assert not stopped.dirt(), "\n".join(stopped.dirt())


def test_sigterm_during_start_up_stops_at_once() -> None:
    up = start_up(*TARGETS["manifest"])
    # The prefill worker is up, the decode EP group still joining or loading.
    assert up.wait_for("moeserve worker listening", 240), "".join(up.err[-40:])
    stopped = up.stop(signal.SIGTERM, timeout_s=60)
    assert stopped.code == 0, stopped.stderr[-4000:]
    assert stopped.elapsed_s < STOP_LIMIT_S
    assert not stopped.left
    assert "moeserve is up" not in stopped.stdout
    assert not stopped.dirt(), "\n".join(stopped.dirt())
