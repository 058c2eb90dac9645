"""The operator's RBAC is derived from the calls it makes, not written from memory.

Two sources of (group, resource, verb) triples, since neither alone sees every path:
- recorded: the real kopf operator runs against the API emulator through a scenario (create,
  scale so children are pruned, autoscaling on and off, status, delete); each request it sends
  (the test's own are told apart by their User-Agent) is one triple;
- static: every ``kube.<method>(api_version, kind, ...)`` call site in moeserve/operator whose
  kind resolves from module constants, every kind render() applies (server-side apply: create +
  patch), the prunable kinds (list + delete), and kopf.event (core events: create).
The chart's rules must grant every triple, and nothing else.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
API = "moeserve.io/v1alpha1"
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

# kopf's cluster-wide mode also reads namespaces and CRDs (granted in rbac.yaml's ClusterRole,
# outside moeserve.rules); with watchNamespaces it needs neither.
_CLUSTER_WIDE = {(g, r, v) for g, r in (("", "namespaces"),
                                        ("apiextensions.k8s.io", "customresourcedefinitions"))
                 for v in ("get", "list", "watch")}  # fmt: skip


def _verb(request: Any) -> str:
    method = request.method.upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


def _chart_rules() -> set[tuple[str, str, str]]:
    text = (REPO / "charts/moeserve/templates/_helpers.tpl").read_text()
    block = re.search(r'define "moeserve.rules" -}}\n(.*?)\n{{- end', text, re.S)
    assert block, "moeserve.rules not found in the chart helpers"
    granted = set()
    for rule in yaml.safe_load(block.group(1)):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted |= {(group, resource, verb) for verb in rule["verbs"]}
    return granted


_KUBE_VERBS = {"get": ["get"], "get_deployment": ["get"], "list": ["list"],
               "delete": ["delete"], "patch_status": ["patch"], "apply": ["create", "patch"],
               "patch": ["patch"], "create": ["create"]}


def _triple(api_version: str, kind: str, verb: str, sub: str = "") -> tuple[str, str, str]:
    from moeserve.operator.kube import PLURALS

    group = api_version.rpartition("/")[0]
    return group, PLURALS[kind] + (f"/{sub}" if sub else ""), verb


def _resolve(node: ast.expr, scope: dict[str, Any]) -> list[tuple[str, str]]:
    """(api_version, kind) pairs a call's leading arguments can take; [] when they are locals."""
    try:
        if isinstance(node, ast.Starred) and isinstance(node.value, ast.Subscript):
            table = eval(compile(ast.Expression(node.value.value), "<rbac>", "eval"), scope)
            return [tuple(v) for v in table.values()]
        return [eval(compile(ast.Expression(node), "<rbac>", "eval"), scope)]
    except (NameError, AttributeError, KeyError, TypeError):
        return []


def _implied(obj: dict[str, Any]) -> set[tuple[str, str, str]]:
    """What the API server demands of whoever writes ``obj``, beyond the write itself."""
    out: set[tuple[str, str, str]] = set()
    if obj["kind"] == "Role":  # no escalation: the operator must hold what it grants
        for rule in obj["rules"]:
            out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                    for v in rule["verbs"]}  # fmt: skip
    for ref in obj["metadata"].get("ownerReferences") or ():
        if ref.get("blockOwnerDeletion"):  # OwnerReferencesPermissionEnforcement
            out.add(_triple(ref["apiVersion"], ref["kind"], "update", "finalizers"))
    return out


def _static_calls() -> set[tuple[str, str, str]]:
    import importlib

    from moeserve.common.spec import parse_manifest
    from moeserve.operator.meta import PRUNABLE_KINDS
    from moeserve.operator.render import render

    out: set[tuple[str, str, str]] = set()
    for path in sorted((REPO / "moeserve/operator").glob("*.py")):
        module = importlib.import_module(f"moeserve.operator.{path.stem}")
        tree = ast.parse(path.read_text())
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            f = call.func
            if not isinstance(f, ast.Attribute):
                continue
            if isinstance(f.value, ast.Name) and f.value.id == "kopf" and f.attr == "event":
                out.add(("", "events", "create"))
            target = f.value.attr if isinstance(f.value, ast.Attribute) else getattr(
                f.value, "id", "")
            if target != "kube" or f.attr not in _KUBE_VERBS or not call.args:
                continue
            if f.attr == "get_deployment":
                out.add(_triple("apps/v1", "Deployment", "get"))
                continue
            if f.attr == "apply":
                continue  # the manifests: below, from render()
            scope = vars(module)
            if isinstance(call.args[0], ast.Starred):
                pairs = _resolve(call.args[0], scope)
            else:
                pairs = list(zip(_resolve(call.args[0], scope), _resolve(call.args[1], scope),
                                 strict=False))  # fmt: skip
            sub = "status" if f.attr == "patch_status" else next(
                (k.value.value for k in call.keywords if k.arg == "subresource"
                 and isinstance(k.value, ast.Constant)), "")
            for api_version, kind in pairs:
                for verb in _KUBE_VERBS[f.attr]:
                    out.add(_triple(api_version, kind, verb, sub))
    for api_version, kind in PRUNABLE_KINDS:
        out |= {_triple(api_version, kind, v) for v in ("list", "delete")}
    gangs = list(getattr(importlib.import_module("moeserve.operator.build_gang"),
                         "POD_GROUP_API", {})) if (REPO / "moeserve/operator/build_gang.py"
                                                  ).exists() else []  # fmt: skip
    for name in ("tiny-cpu.yaml", "deepseek-v3-wide-ep.yaml"):
        for gang in [None, *gangs, "lws"]:  # every optional child: HPA, PodGroups, LWS
            doc = yaml.safe_load((REPO / "examples" / name).read_text())
            doc["spec"]["decode"]["autoscaling"] = {"enabled": True, "maxReplicas": 4,
                                                    "targetNumRequestsWaiting": 4}  # fmt: skip
            if gang == "lws":
                doc["spec"]["decode"]["workload"] = "lws"
            elif gang:
                doc["spec"]["decode"]["scheduling"] = {"gang": gang, "queue": "q"}
            dep = parse_manifest(doc).model_copy(update={"uid": "u"})
            for obj in render(dep):
                out |= {_triple(obj["apiVersion"], obj["kind"], v) for v in ("create", "patch")}
                out |= _implied(obj)
    return out


def _used(cluster_factory: Any, monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str, str]]:
    used: set[tuple[str, str, str]] = set()
    # The emulator class of the conftest module pytest loaded (importing it here could load a
    # second copy under another name).
    emulator_cls = sys.modules[type(cluster_factory()).__module__].ApiServerEmulator
    handle = emulator_cls._handle

    async def recording(self: Any, request: Any) -> Any:
        agent = request.headers.get("User-Agent", "")
        res = request.resource
        # Not the test's own requests, and not API discovery (a group, no resource).
        if res is not None and res.plural and not agent.startswith("Python/"):
            plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
            verb = _verb(request)
            used.add((res.group or "", plural, verb))
            if verb == "patch" and "apply-patch" in request.headers.get("Content-Type", ""):
                key = (res, request.namespace, request.name)
                if key not in self._objects or self._objects[key].deleted:
                    used.add((res.group or "", plural, "create"))  # server-side apply creates
        return await handle(self, request)

    monkeypatch.setattr(emulator_cls, "_handle", recording)

    async def scenario() -> None:
        async with cluster_factory() as cluster:
            body = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
            await cluster.create(body)
            name = body["metadata"]["name"]

            def sts() -> set[str]:
                return {o["metadata"]["name"] for o in cluster.objects("apps/v1", "StatefulSet")}

            await cluster.wait_for("children", lambda: len(sts()) == 2)
            scaled = copy.deepcopy(body["spec"])
            scaled["decode"]["replicas"] = 2
            scaled["decode"]["autoscaling"] = {"enabled": True, "minReplicas": 1,
                                               "maxReplicas": 3,
                                               "targetNumRequestsWaiting": 4}  # fmt: skip
            await cluster.patch(API, "MoEDeployment", "default", name, {"spec": scaled})
            await cluster.wait_for("hpa", lambda: cluster.objects("autoscaling/v2",
                                                                  "HorizontalPodAutoscaler"))
            await cluster.patch(API, "MoEDeployment", "default", name, {"spec": {"decode": {
                "replicas": 1, "autoscaling": {"enabled": False}}}})  # fmt: skip
            await cluster.wait_for("pruned", lambda: not cluster.objects(
                "autoscaling/v2", "HorizontalPodAutoscaler") and len(sts()) == 2)
            await asyncio.sleep(2.5)  # a few resync timers: status and events
            await cluster.delete(API, "MoEDeployment", "default", name)
            await asyncio.sleep(1.0)

    asyncio.run(scenario())
    return used


def test_chart_rules_are_exactly_the_calls_the_operator_makes(
    cluster_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    used = _used(cluster_factory, monkeypatch) | _static_calls()
    granted = _chart_rules()
    missing = sorted(used - granted - _CLUSTER_WIDE)
    unused = sorted(granted - used)
    assert not missing, f"the operator calls what the chart does not grant: {missing}"
    assert not unused, f"the chart grants what the operator never does: {unused}"
