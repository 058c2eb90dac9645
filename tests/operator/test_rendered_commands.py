"""The operator's rendered containers against the real `moeserve` command line: every command
of every example parses with `moeserve.cli.build_parser`, the router's ConfigMap resolves with
the router's own config loader, and the worker environment parses as the worker's flag defaults.
A renamed flag, config key or variable therefore fails here, not on a cluster."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.cli import build_parser
from moeserve.common import spec as s
from moeserve.operator.cli import render_documents
from moeserve.router.config import resolve_router_config
from moeserve.worker.env_defaults import env_defaults

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: MoEDeployment" in p.read_text())  # fmt: skip
pytestmark = pytest.mark.timeout(60)


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")]  # fmt: skip


def _containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for owner, pod in _pod_specs(docs):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            out.append((f"{owner}/{c['name']}", c))
    return out


def _parse(command: list[str], where: str) -> argparse.Namespace:
    assert command[0] == "moeserve", f"{where}: runs {command[0]!r}, not moeserve"
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit as e:  # argparse printed which flag it did not know
        pytest.fail(f"{where}: `{' '.join(command)}` does not parse (exit {e.code})")


@pytest.fixture(params=EXAMPLES, ids=lambda p: p.stem)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render_documents(request.param.read_text())


def test_every_rendered_command_parses(docs: list[dict[str, Any]]) -> None:
    containers = _containers(docs)
    assert {c["command"][1] for _, c in containers} >= {"router", "worker"}
    for where, c in containers:
        args = _parse(c["command"], where)
        assert callable(args.func), where


def test_router_configmap_resolves_with_the_router_loader(docs, tmp_path: Path) -> None:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    router = deploy["spec"]["template"]["spec"]["containers"][0]
    mount = next(m["mountPath"] for m in router["volumeMounts"] if m["name"] == "config")
    config_arg = router["command"][router["command"].index("--config") + 1]
    assert Path(config_arg).parent == Path(mount)
    path = tmp_path / Path(config_arg).name
    path.write_text(cm["data"][path.name])
    args = _parse(["moeserve", "router", "--config", str(path)], "router")
    cfg = resolve_router_config(args)
    assert cfg.discovery is not None and cfg.discovery.namespace == deploy["metadata"]["namespace"]
    assert (cfg.http_port, cfg.grpc_port, cfg.metrics_port) == (
        s.PORT_ROUTER_HTTP,
        s.PORT_ROUTER_GRPC,
        s.PORT_ROUTER_METRICS,
    )
    assert cfg.host in ("0.0.0.0", "::"), "a router on loopback is unreachable in a pod"
    ports = {p["containerPort"] for p in router["ports"]}
    assert {cfg.http_port, cfg.grpc_port, cfg.metrics_port} == ports
    # The Role grants exactly what the discovery does: list + watch EndpointSlices.
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["list", "watch"]}]  # fmt: skip
    # Worker pods' labels as the discovery selects them (through their Services' slices).
    for d in docs:
        if d["kind"] == "Service" and d["metadata"]["labels"].get(s.LABEL_COMPONENT) == "worker":
            labels = d["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in cfg.discovery.selector.items())
            assert labels[cfg.discovery.role_label] in ("prefill", "decode")


def test_worker_env_parses_as_flag_defaults(docs: list[dict[str, Any]]) -> None:
    for where, c in _containers(docs):
        if c["command"][1] != "worker":
            continue
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        env[s.ENV_POD_IP] = "10.1.2.3"  # from the downward API on a cluster
        parser = build_parser()
        choices = {"role": ("prefill", "decode", "both")}
        defaults = env_defaults(env, choices)
        assert defaults["block_size"] == int(env[s.ENV_BLOCK_SIZE]), where
        assert defaults["model_id"] == env[s.ENV_MODEL], where
        assert defaults["metrics_port"] == int(env[s.ENV_METRICS_PORT]), where
        assert (defaults["host"], defaults["advertise_host"]) == ("0.0.0.0", "10.1.2.3")
        args = parser.parse_args(c["command"][1:])
        assert args.role == env[s.ENV_ROLE], where


def test_router_reaches_every_rank_the_discovery_dials(docs: list[dict[str, Any]]) -> None:
    """Discovery dials port + i for each local rank; the pool's NetworkPolicy must admit the
    router on exactly that range (endPort), and monitoring on the ranks' metrics ports."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    discovery = yaml.safe_load(cm["data"]["router.yaml"])["discovery"]
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        role = policy["metadata"]["labels"][s.LABEL_ROLE]
        ranks = discovery["ranksPerPod"][role]
        spans = {}
        for rule in policy["spec"]["ingress"]:
            for p in rule.get("ports", []):
                spans[p["port"]] = (p["port"], p.get("endPort", p["port"]))
        first = discovery["port"]
        assert spans[first] == (first, first + ranks - 1), policy["metadata"]["name"]
        metrics = s.PORT_WORKER_METRICS
        assert spans[metrics] == (metrics, metrics + ranks - 1), policy["metadata"]["name"]


def test_router_chat_parsers_reach_the_router_command() -> None:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["router"].update(toolCallParser="deepseek_v3", enableAutoToolChoice=True,
                                 reasoningParser="deepseek_r1")
    router = next(c for _, c in _containers(render_documents(yaml.safe_dump(doc)))
                  if c["command"][1] == "router")
    args = _parse(router["command"], "router")
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser) == (
        "deepseek_v3", True, "deepseek_r1")
