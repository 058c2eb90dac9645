"""The chart's scrape configuration and autoscaling queries against a real Prometheus scraping
`moeserve up` under load.

No Kubernetes here, so the test plays Kubernetes' part: each Service of `moeserve operator render
-f examples/tiny-cpu.yaml` becomes one static target per port, carrying the ``__meta_kubernetes_*``
labels endpoints discovery would give the pod behind it (Service and pod labels, port and
container names), and the metrics port points at the matching local process (router, prefill,
decode). The relabel rules are those the Prometheus Operator generates for the chart's rendered
ServiceMonitor (selector, port, the standard namespace/pod/service labels), followed by the
ServiceMonitor's own relabelings. Then the SLA planner's queries (its real PrometheusSource) and
the prometheus-adapter rules (placeholders filled in as the adapter fills them for an HPA's pods)
must answer non-zero for every pool, and token counts must match what the client sent.

Run twice: open, and keyed (the router's ``--api-key-metrics``, which `moeserve up` and the
operator extend to the workers' metrics ports, with the chart's
``serviceMonitor.bearerTokenSecret``): every target must still be scraped, and refuse a scraper
without the key.

Skips without a `prometheus` binary, unless MOESERVE_REQUIRE_PROMETHEUS=1 (CI), then fails.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from moeserve.common.spec import parse_manifest
from moeserve.deploy.local import ClusterSpec, LocalCluster
from moeserve.operator.autoscale import (
    POOL_ROUTER,
    PROM_LABEL_DEPLOYMENT,
    PROM_LABEL_POOL,
    PrometheusSource,
)
from moeserve.operator.render import render
from tests.promql_helpers import (
    MONITORING,
    REPO,
    adapter_rules,
    grafana_exprs,
    helm_template,
    load_dashboard,
    service_monitor,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRAPE_S = 1  # the ServiceMonitor's interval, set through the chart's values
# KV for a few requests at a time per worker, so both pools queue and the waiting gauges move:
# most clients send two-block prompts for a dozen tokens (decode-bound); a few send three-block
# prompts for one token, which the prefill worker finishes alone (prefill-bound).
KV_BLOCKS = 8
CLIENTS = (8, 4)  # (prefill + decode, prefill only)
SHAPES = ((100, 12), (180, 1))  # (prompt tokens, max_tokens) of each kind of client
WORKER_POOLS = ("prefill", "decode")
# The keyed run: the Secret the chart's ServiceMonitor names, and the one key it holds.
KEY_SECRET, KEY = ("moeserve-metrics-key", "api-key"), "sk-scrape-0123456789"


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("MOESERVE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("MOESERVE_REQUIRE_PROMETHEUS=1 but no `prometheus` on PATH "
                        "(Debian: apt-get install -y prometheus)")
        pytest.skip("no `prometheus` on PATH (Debian: apt-get install -y prometheus)")
    return found


# ------------------------------------------------------------------ Kubernetes, played here


def _san(name: str) -> str:
    """A Kubernetes label name as discovery spells it in a meta label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _meta(kind: str, labels: dict[str, str]) -> dict[str, str]:
    out = {}
    for k, v in labels.items():
        out[f"__meta_kubernetes_{kind}_label_{_san(k)}"] = v
        out[f"__meta_kubernetes_{kind}_labelpresent_{_san(k)}"] = "true"
    return out


def _pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods the rendered workloads would run: name, labels, containers."""
    pods = []
    for o in objects:
        if o["kind"] not in ("StatefulSet", "Deployment"):
            continue
        template = o["spec"]["template"]
        name = o["metadata"]["name"]
        pods.append({
            "name": f"{name}-0" if o["kind"] == "StatefulSet" else f"{name}-6d9f7c8b5-q2x4z",
            "labels": template["metadata"]["labels"],
            "containers": template["spec"]["containers"],
        })  # fmt: skip
    return pods


def discovered_targets(objects: list[dict[str, Any]], metrics_address: dict[str, str]
                       ) -> list[dict[str, Any]]:
    """Endpoints discovery's targets: one per (Service, port, pod), metrics ports pointing at the
    local process of that pool (``metrics_address``: pool -> host:port)."""
    pods = _pods(objects)
    targets = []
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        svc_labels = svc["metadata"]["labels"]
        pool = svc_labels.get("moeserve.io/role") or svc_labels["moeserve.io/component"]
        for pod in (p for p in pods if selector.items() <= p["labels"].items()):
            for port in svc["spec"]["ports"]:
                target = port["targetPort"]  # a number or a container port's name
                container, number = next(
                    (c, p["containerPort"]) for c in pod["containers"] for p in c.get("ports", [])
                    if target in (p["containerPort"], p.get("name")))  # fmt: skip
                # Only the metrics port has a process behind it; the rest must be dropped.
                address = metrics_address[pool] if port["name"] == "metrics" else "127.0.0.1:9"
                targets.append({"targets": [address], "labels": {
                    "__meta_kubernetes_namespace": svc["metadata"]["namespace"],
                    "__meta_kubernetes_service_name": svc["metadata"]["name"],
                    **_meta("service", svc_labels),
                    "__meta_kubernetes_endpoint_port_name": port["name"],
                    "__meta_kubernetes_endpoint_port_protocol": "TCP",
                    "__meta_kubernetes_endpoint_ready": "true",
                    "__meta_kubernetes_endpoint_address_target_kind": "Pod",
                    "__meta_kubernetes_endpoint_address_target_name": pod["name"],
                    "__meta_kubernetes_pod_name": pod["name"],
                    **_meta("pod", pod["labels"]),
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port["name"],
                    "__meta_kubernetes_pod_container_port_number": str(number),
                }})  # fmt: skip
    return targets


def _snake(relabeling: dict[str, Any]) -> dict[str, Any]:
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return {keys.get(k, k): v for k, v in relabeling.items()}


def operator_scrape_config(sm: dict[str, Any], targets: list[dict[str, Any]],
                           secrets: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
    """The scrape config the Prometheus Operator generates for the ServiceMonitor's first
    endpoint, with static targets in place of Kubernetes discovery. ``secrets``: (Secret, key)
    -> value, what the Prometheus Operator reads for the endpoint's ``bearerTokenSecret``."""
    spec, endpoint = sm["spec"], sm["spec"]["endpoints"][0]
    relabel: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    for key, value in spec["selector"]["matchLabels"].items():
        relabel.append({"action": "keep", "regex": f"({value});true", "source_labels": [
            f"__meta_kubernetes_service_label_{_san(key)}",
            f"__meta_kubernetes_service_labelpresent_{_san(key)}"]})
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"],
         "regex": endpoint["port"]},
        {"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                           "__meta_kubernetes_endpoint_address_target_name"],
         "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    ]  # fmt: skip
    for kind, key in (("service", "targetLabels"), ("pod", "podTargetLabels")):
        for label in spec.get(key, []):
            relabel.append({"source_labels": [f"__meta_kubernetes_{kind}_label_{_san(label)}"],
                            "target_label": _san(label), "regex": "(.+)",
                            "replacement": "${1}"})  # fmt: skip
    relabel += [
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job",
         "replacement": "${1}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
        *(_snake(r) for r in endpoint.get("relabelings", [])),
    ]  # fmt: skip
    auth = {}
    if "bearerTokenSecret" in endpoint:
        ref = endpoint["bearerTokenSecret"]
        auth = {"authorization": {"type": "Bearer",
                                  "credentials": (secrets or {})[(ref["name"], ref["key"])]}}
    return {
        **auth,
        "job_name": f"serviceMonitor/{sm['metadata']['namespace']}/{sm['metadata']['name']}/0",
        "scrape_interval": endpoint["interval"],
        "metrics_path": endpoint["path"],
        "static_configs": targets,
        "relabel_configs": relabel,
    }


# ------------------------------------------------------------------ Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary: str, config: dict[str, Any], workdir: Path):
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------ load


class Load:
    """``CLIENTS`` threads sending completions until stopped; counts what the client saw."""

    def __init__(self, url: str, headers: dict[str, str]):
        self.url, self.stop_event, self.headers = url, threading.Event(), headers
        self.model = httpx.get(f"{url}/v1/models", headers=headers,
                               timeout=10).json()["data"][0]["id"]
        self.prompt_tokens = self.completion_tokens = self.requests = 0
        self.lock = threading.Lock()
        self.pool = cf.ThreadPoolExecutor(sum(CLIENTS))
        shapes = [SHAPES[0]] * CLIENTS[0] + [SHAPES[1]] * CLIENTS[1]
        self.futures = [self.pool.submit(self._client, i, *shape)
                        for i, shape in enumerate(shapes)]  # fmt: skip

    def _client(self, seed: int, prompt_len: int, max_tokens: int) -> None:
        with httpx.Client(timeout=60, headers=self.headers) as http:
            n = 0
            while not self.stop_event.is_set():
                n += 1
                prompt = [(seed * 7919 + n * 131 + i * 104729) % 500 + 2 for i in range(prompt_len)]
                resp = http.post(f"{self.url}/v1/completions", json={
                    "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True})  # fmt: skip
                assert resp.status_code == 200, resp.text
                usage = resp.json()["usage"]
                with self.lock:
                    self.prompt_tokens += usage["prompt_tokens"]
                    self.completion_tokens += usage["completion_tokens"]
                    self.requests += 1

    def finish(self) -> None:
        self.stop_event.set()
        for f in self.futures:
            f.result()  # a failed request fails the test here
        self.pool.shutdown()


# ------------------------------------------------------------------ the test


def _value(result: list[dict[str, Any]]) -> float:
    """The one sample of an instant query (0 when empty or NaN)."""
    if not result:
        return 0.0
    assert len(result) == 1, result
    v = float(result[0]["value"][1])
    return 0.0 if v != v else v


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "keyed"])
def test_autoscaling_queries_on_real_prometheus(prometheus_bin: str, model_dir: Path,
                                                tmp_path: Path, keyed: bool) -> None:
    values = ["--set", f"serviceMonitor.interval={SCRAPE_S}s"]
    router_args, headers = [], {}
    if keyed:
        values += ["--set", f"serviceMonitor.bearerTokenSecret.name={KEY_SECRET[0]}",
                   "--set", f"serviceMonitor.bearerTokenSecret.key={KEY_SECRET[1]}"]
        router_args, headers = ["--api-key", KEY, "--api-key-metrics"], {"Authorization":
                                                                          f"Bearer {KEY}"}
    chart = helm_template(*MONITORING, *values)
    sm, rules = service_monitor(chart), adapter_rules(chart)
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    objects = render(parse_manifest(doc))
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    pods = {pool: [p["name"] for p in _pods(objects)
                   if p["labels"].get("moeserve.io/role") == pool] for pool in WORKER_POOLS}

    # The router's metrics port, as on Kubernetes (the HTTP port's /metrics negotiates nothing).
    router_metrics = f"127.0.0.1:{_free_port()}"
    spec = ClusterSpec(model=str(model_dir), port=0, metrics=True, num_kv_blocks=KV_BLOCKS,
                       router_args=["--metrics-port", router_metrics.rsplit(":", 1)[1],
                                    *router_args])
    with LocalCluster(spec, log=None) as cluster:
        address = {pool: re.search(r"//([^/]+)", cluster.worker(f"{pool}-0").metrics).group(1)
                   for pool in WORKER_POOLS}  # fmt: skip
        address[POOL_ROUTER] = router_metrics
        targets = discovered_targets(objects, address)
        # A Service the ServiceMonitor's selector leaves out (the operator's own, made by helm).
        targets.append({"targets": [address[POOL_ROUTER]], "labels": {
            "__meta_kubernetes_namespace": ns, "__meta_kubernetes_service_name": "moeserve",
            **_meta("service", {"app.kubernetes.io/managed-by": "Helm"}),
            "__meta_kubernetes_endpoint_port_name": "metrics"}})  # fmt: skip
        if keyed:  # every metrics port, the workers' too, refuses a scraper without the key
            for pool, where in address.items():
                assert httpx.get(f"http://{where}/metrics", timeout=5).status_code == 401, pool
        config = {"global": {"scrape_interval": f"{SCRAPE_S}s"},
                  "scrape_configs": [operator_scrape_config(sm, targets, {KEY_SECRET: KEY})]}
        prom = Prometheus(prometheus_bin, config, tmp_path)
        try:
            _check(prom, cluster, rules, ns, name, pods, headers)
        finally:
            prom.stop()


def _check(prom: Prometheus, cluster: LocalCluster, rules, ns: str, name: str,
           pods: dict[str, list[str]], headers: dict[str, str]) -> None:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["autoscaling"] = {"mode": "sla", "metricsUrl": prom.url}
    dep = parse_manifest(doc)
    source = PrometheusSource()
    # What each pool's HPA would ask prometheus-adapter for, per pod of the pool.
    adapter = {(rule.served_as, pool): rule.query(ns, pods[pool])
               for rule in rules for pool in WORKER_POOLS}
    seen: dict[str, float] = {}
    load = Load(cluster.url, headers)
    started = time.monotonic()
    try:
        deadline = started + 45
        while time.monotonic() < deadline:
            time.sleep(SCRAPE_S)
            sample = source.sample(dep)
            got = {"planner prefill_tokens_per_s": sample.prefill_tokens_per_s,
                   "planner decode_tokens_per_s": sample.decode_tokens_per_s,
                   "planner ttft_p90_s": sample.ttft_p90_s or 0.0,
                   "planner itl_p90_s": sample.itl_p90_s or 0.0}  # fmt: skip
            for (metric, pool), query in adapter.items():
                result = prom.query(query)
                assert {r["metric"]["pod"] for r in result} <= set(pods[pool]), result
                got[f"adapter {metric} {pool}"] = max((float(r["value"][1]) for r in result
                                                       if r["value"][1] != "NaN"), default=0.0)
            for key, value in got.items():
                seen[key] = max(seen.get(key, 0.0), value)
            if all(seen.values()):
                break
    finally:
        load.finish()
    print(f"\nqueries non-zero after {time.monotonic() - started:.1f}s of load")
    print("\nmax over the load:", {k: round(v, 4) for k, v in sorted(seen.items())})
    assert all(seen.values()), {k: v for k, v in seen.items() if not v}

    # Exactly the three processes were scraped, with the planner's labels.
    up = {(t["labels"]["pod"], t["labels"][PROM_LABEL_POOL], t["health"]) for t in prom.targets()}
    assert {(pool, health) for _, pool, health in up} == {
        ("prefill", "up"), ("decode", "up"), (POOL_ROUTER, "up")}, up
    assert len(up) == 3, up

    # Token counts: the planner's selector sees each token once, as the client counted them.
    time.sleep(2.5 * SCRAPE_S)  # a scrape after the last request
    sel = source.selector(dep)
    prompt = _value(prom.query(f"sum(moeserve:prompt_tokens_total{{{sel}}})"))
    generated = _value(prom.query(f"sum(moeserve:generation_tokens_total{{{sel}}})"))
    everywhere = _value(prom.query(
        f'sum(moeserve:prompt_tokens_total{{namespace="{ns}",{PROM_LABEL_DEPLOYMENT}="{name}"}})'))
    print(f"client: {load.requests} requests, {load.prompt_tokens} prompt / "
          f"{load.completion_tokens} generated tokens; router series: {prompt:.0f} / "
          f"{generated:.0f}; prompt tokens summed over all pools: {everywhere:.0f}")
    assert (prompt, generated) == (load.prompt_tokens, load.completion_tokens)
    assert everywhere >= 2 * prompt  # why every query picks a pool

    # Every dashboard query runs; the per-pool ones return a series for each pool they cover.
    exprs = grafana_exprs(load_dashboard(), {"namespace": ns, "deployment": name})
    pools_of = {}
    for expr in exprs:
        pools_of[expr] = {r["metric"].get(PROM_LABEL_POOL) for r in prom.query(expr)}
    assert sum(1 for p in pools_of.values() if p) >= len(exprs) * 2 // 3, pools_of
    ttft = next(e for e in exprs if "time_to_first_token_seconds_bucket" in e)
    assert pools_of[ttft] == {"prefill", "decode", POOL_ROUTER}, pools_of[ttft]
