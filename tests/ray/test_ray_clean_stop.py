"""`moeserve up --ray` stops cleanly on SIGTERM and SIGINT, deployed or still deploying: exit
code 0 well inside Kubernetes' 30 s grace period, no Ray process left, no traceback. Also the
Ray half of the served-model-name check (tests/test_served_model_name.py has the local half):
the same flag gives the same name at /v1/models.
"""

from __future__ import annotations

import re
import signal

import httpx
import pytest

pytest.importorskip("ray")

from moeserve.deploy.ray_cli import STOP_BUDGET_S  # noqa: E402
from tests.stop_helpers import start_up  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

GRACE_S = 30.0  # Kubernetes' default terminationGracePeriodSeconds
_UP = re.compile(r"moeserve is up on Ray: (\S+)/v1")


def _check(stopped) -> None:
    assert stopped.code == 0, stopped.stderr[-4000:]
    assert stopped.elapsed_s < min(GRACE_S, STOP_BUDGET_S + 5), stopped.elapsed_s
    assert not stopped.left, "Ray processes outlived moeserve up --ray"
    assert not stopped.dirt(), "\n".join(stopped.dirt())


def test_sigterm_stops_a_deployed_app_and_the_served_name_is_the_flag() -> None:
    up = start_up("--ray", "--served-model-name", "acme/tiny-prod")
    assert up.wait_for("Ctrl-C stops everything.", 300), "".join((up.out + up.err)[-40:])
    url = next(m.group(1) for line in up.out if (m := _UP.search(line)))
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["acme/tiny-prod"]  # as `moeserve up` (local) reports
    _check(up.stop(signal.SIGTERM, timeout_s=60))


def test_sigint_stops_a_deployed_app() -> None:
    up = start_up("--ray")
    assert up.wait_for("Ctrl-C stops everything.", 300), "".join((up.out + up.err)[-40:])
    _check(up.stop(signal.SIGINT, timeout_s=60))


def test_sigterm_while_deploying_stops_at_once() -> None:
    # serve.run waits for the application to run; a stop must not wait with it (on a real
    # checkpoint that is minutes, past any grace period).
    up = start_up("--ray")
    assert up.wait_for("Started a local Ray instance", 300), "".join((up.out + up.err)[-40:])
    assert up.wait_for("(WorkerRank", 120)  # ranks are starting: the app does not run yet
    stopped = up.stop(signal.SIGTERM, timeout_s=60)
    _check(stopped)
    assert "moeserve is up" not in stopped.stdout
