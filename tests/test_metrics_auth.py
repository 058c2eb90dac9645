"""Issue 22 item 6: the separate metrics port honours the metrics key; the CRD can turn it on."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from moeserve.common.metrics import start_metrics_server, worker_metrics_keys
from moeserve.common.spec import SpecError, parse_manifest, parse_spec
from moeserve.operator.render import render
from moeserve.router.server import add_router_parser, metrics_port_keys

KEY = "sk-metrics-0123456789"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def variant(name: str, **spec_patch: Any) -> dict[str, Any]:
    doc = copy.deepcopy(example(name))
    for k, v in spec_patch.items():
        doc["spec"][k] = {**doc["spec"].get(k, {}), **v}
    return doc


def rendered(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return render(parse_manifest(doc).model_copy(update={"uid": "u-1"}))


@pytest.fixture
def port_with_key():
    registry = CollectorRegistry()
    Gauge("moeserve:num_requests_waiting", "w", registry=registry).set(3)
    httpd = start_metrics_server(0, "127.0.0.1", registry, keys=["sk-other", KEY])
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", KEY])
def test_metrics_port_refuses_without_the_key(port_with_key: str, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = httpx.get(f"{port_with_key}/metrics", headers=headers, timeout=5)
    assert resp.status_code == 401 and "moeserve" not in resp.text
    assert resp.headers["www-authenticate"].startswith("Bearer")


def test_metrics_port_answers_with_the_key(port_with_key: str) -> None:
    resp = httpx.get(f"{port_with_key}/metrics", headers={"Authorization": f"bearer {KEY}"},
                     timeout=5)
    assert resp.status_code == 200
    assert "moeserve:num_requests_waiting 3.0" in resp.text.splitlines()


def test_health_stays_open_for_the_liveness_probe_and_shows_no_series(port_with_key: str) -> None:
    resp = httpx.get(f"{port_with_key}/health", timeout=5)
    assert resp.status_code == 200 and "moeserve" not in resp.text


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_router_parser(parser.add_subparsers())
    return parser.parse_args(["router", *flags])


def test_router_gives_its_metrics_port_the_keys_only_with_api_key_metrics() -> None:
    args = _args("--api-key", KEY, "--api-key-metrics")
    assert metrics_port_keys(args, [KEY]) == [KEY]
    assert metrics_port_keys(_args("--api-key", KEY), [KEY]) == []


def test_spec_turns_metrics_auth_on() -> None:
    doc = variant("tiny-cpu.yaml", router={"apiKeySecret": "llm-keys", "apiKeyMetrics": True})
    router = next(o for o in rendered(doc) if o["kind"] == "Deployment"
                  and o["metadata"]["name"].endswith("-router"))
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert "--api-key-metrics" in container["command"]
    # The kubelet sends no key: liveness reads the open /health of the metrics port.
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    plain = next(o for o in rendered(example("tiny-cpu.yaml")) if o["kind"] == "Deployment"
                 and o["metadata"]["name"].endswith("-router"))
    assert "--api-key-metrics" not in plain["spec"]["template"]["spec"]["containers"][0]["command"]


def test_metrics_auth_without_keys_names_the_field() -> None:
    doc = variant("tiny-cpu.yaml", router={"apiKeyMetrics": True})
    with pytest.raises(SpecError) as info:
        parse_spec(doc["spec"])
    assert "spec.router.apiKeyMetrics" in info.value.fields


# ------------------------------------------------------------------ workers' metrics ports


def test_worker_metrics_keys_follow_the_deployments_metrics_key() -> None:
    """Was: a worker's metrics port answered anyone, even with the router's metrics keyed."""
    env = {"MOESERVE_METRICS_KEYS": f"sk-other,\n{KEY}"}
    assert worker_metrics_keys(("plane-token",), env) == ["sk-other", KEY, "plane-token"]
    # Not keyed: open, like the router's port without --api-key-metrics.
    assert worker_metrics_keys(("plane-token",), {}) == []
    assert worker_metrics_keys((), {"MOESERVE_METRICS_KEYS": " , "}) == []


def test_spec_gives_workers_the_metrics_key_only_with_api_key_metrics() -> None:
    doc = variant("tiny-cpu.yaml", router={"apiKeySecret": "llm-keys", "apiKeyMetrics": True})

    def worker_env(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sets = [o for o in objects if o["kind"] == "StatefulSet"]
        assert sets
        envs = [c["env"] for o in sets for c in o["spec"]["template"]["spec"]["containers"]]
        return [e for env in envs for e in env if e["name"] == "MOESERVE_METRICS_KEYS"]

    keyed = worker_env(rendered(doc))
    assert keyed and all(e["valueFrom"] == {"secretKeyRef": {"name": "llm-keys", "key": "api-keys"}}
                         for e in keyed)  # fmt: skip
    assert len(keyed) == len([o for o in rendered(doc) if o["kind"] == "StatefulSet"])
    open_doc = variant("tiny-cpu.yaml", router={"apiKeySecret": "llm-keys"})
    assert worker_env(rendered(open_doc)) == []
