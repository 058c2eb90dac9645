"""The CRDs: generated from the spec models, identical in the chart, valid CRDs for several
Kubernetes versions, and their schemas (and CEL rules) accept and reject what pydantic does."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from moeserve.common.spec import SpecError, parse_manifest, parse_spec
from moeserve.operator.crds import CHART_CRDS, CRD_FILES, build_crds, dump_crd
from moeserve.operator.render import render

REPO = Path(__file__).resolve().parents[2]
VERSIONS = ("1.30.0", "1.32.0", "1.34.0", "1.37.0")
pytestmark = pytest.mark.timeout(60)


def crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "crds" / CRD_FILES[kind]).read_text())


def schema(kind: str) -> dict[str, Any]:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_checked_in_crds_are_generated_and_chart_copies_identical(kind: str) -> None:
    top = (REPO / "crds" / CRD_FILES[kind]).read_text()
    assert top == dump_crd(build_crds()[kind]), (
        "crds/ is stale: python -m moeserve.operator.crds --write"
    )
    assert (REPO / CHART_CRDS / CRD_FILES[kind]).read_text() == top
    assert sorted(p.name for p in (REPO / CHART_CRDS).iterdir()) == sorted(
        p.name for p in (REPO / "crds").iterdir()
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_crds_validate_as_crds(kind: str, version: str) -> None:
    kubernetes_validate.validate(crd(kind), version, strict=True)


def test_crd_shape() -> None:
    dep = crd("MoEDeployment")["spec"]["versions"][0]
    assert dep["subresources"] == {"status": {}}
    assert [c["name"] for c in dep["additionalPrinterColumns"]] == [
        "Phase",
        "Ready",
        "Router",
        "Age",
    ]
    pool = crd("MoEWorkerPool")["spec"]["versions"][0]
    assert pool["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    spec = schema("MoEDeployment")["properties"]["spec"]["properties"]
    assert spec["decode"]["properties"]["replicas"]["default"] == 1
    assert spec["model"]["properties"]["blockSize"]["default"] == 64


def _validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 bounds are draft-4 style (boolean exclusiveMinimum).
    return jsonschema.Draft4Validator(schema(kind))


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "deepseek-v3-wide-ep.yaml"])
def test_samples_validate_against_crd_schemas(name: str) -> None:
    doc = example(name)
    _validator("MoEDeployment").validate(doc)
    dep = parse_manifest(doc).model_copy(update={"uid": "u"})
    pools = [o for o in render(dep) if o["kind"] == "MoEWorkerPool"]
    assert len(pools) == 2
    for pool in pools:
        _validator("MoEWorkerPool").validate(pool)
        _validator("MoEWorkerPool").validate(
            {**pool, "status": {"replicas": 1, "readyReplicas": 0, "selector": "a=b"}}
        )


SCHEMA_REJECTS = {
    "ep zero": ("decode", "parallelism", "ep", 0),
    "unknown preset": ("model", "source", "preset", "huge"),
    "service type": ("router", "serviceType", "Ingress"),
    "kv target above 1": ("decode", "autoscaling", "targetKvCacheUsagePerc", 1.5),
    "absolute model path": ("model", "path", "/abs"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REJECTS))
def test_schema_and_pydantic_reject_the_same_bad_fields(case: str) -> None:
    *path, value = SCHEMA_REJECTS[case]
    doc = copy.deepcopy(example("tiny-cpu.yaml"))
    node = doc["spec"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    errors = list(_validator("MoEDeployment").iter_errors(doc))
    assert errors, case
    with pytest.raises(SpecError) as info:
        parse_spec(doc["spec"])
    assert info.value.fields[0].startswith("spec." + ".".join(path[:-1]))


# --- CEL: every x-kubernetes-validations rule, evaluated on the defaulted object ----------


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()):
    for rule in node.get("x-kubernetes-validations", []):
        yield path, rule
    for name, sub in (node.get("properties") or {}).items():
        yield from _rules(sub, (*path, name))


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def cel_violations(doc: dict[str, Any]) -> list[str]:
    env = celpy.Environment()
    broken = []
    for path, rule in _rules(schema("MoEDeployment")):
        target = _at(doc, path)
        if target is None:
            continue  # the API server runs a rule only where its object exists
        result = env.program(env.compile(rule["rule"])).evaluate(
            {"self": celpy.json_to_cel(target)}
        )
        if not bool(result):
            broken.append(".".join(path) + (rule.get("fieldPath") or ""))
    return broken


def defaulted(doc: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores after schema defaulting (pydantic applies the same)."""
    spec = parse_spec(doc["spec"]).model_dump(by_alias=True, exclude_none=True)
    return {**doc, "spec": spec}


CEL_CASES = {
    "auto tool choice without a parser": ({"router": {"enableAutoToolChoice": True}},
                                          "spec.router.enableAutoToolChoice"),
    "dp*tp != ep": ({"decode": {"parallelism": {"dp": 2, "ep": 3}}}, "spec.decode.parallelism.ep"),
    "ep not multiple of gpus": (
        {"prefill": {"gpusPerPod": 4, "parallelism": {"dp": 6, "ep": 6}}},
        "spec.prefill.parallelism.ep",
    ),
    "tp does not divide gpus": (
        {"prefill": {"gpusPerPod": 4, "parallelism": {"dp": 1, "ep": 8, "tp": 8}}},
        "spec.prefill.parallelism.tp",
    ),
    "experts not divisible": ({"model": {"numExperts": 7}}, "spec.decode.parallelism.ep"),
    "min > max": (
        {"decode": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}},
        "spec.decode.autoscaling.minReplicas",
    ),
    "enabled without target": (
        {"decode": {"autoscaling": {"enabled": True}}},
        "spec.decode.autoscaling",
    ),
    "metrics auth without keys": ({"router": {"apiKeyMetrics": True}},
                                  "spec.router.apiKeyMetrics"),
    "two compile caches": ({"compileCache": {"pvc": "c", "hostPath": "/var/cache/x"}},
                           "spec.compileCache"),
    "two sources": (
        {"model": {"source": {"preset": "tiny", "hostPath": {"path": "/x"}}}},
        "spec.model.source",
    ),
}


def _with(patch: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(example("tiny-cpu.yaml"))

    def merge(into: dict[str, Any], p: dict[str, Any]) -> None:
        for k, v in p.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(doc["spec"], patch)
    return doc


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "deepseek-v3-wide-ep.yaml"])
def test_cel_rules_accept_examples(name: str) -> None:
    assert cel_violations(defaulted(example(name))) == []


@pytest.mark.parametrize("case", sorted(CEL_CASES))
def test_cel_rules_reject_what_pydantic_rejects(case: str) -> None:
    patch, field = CEL_CASES[case]
    doc = _with(patch)
    with pytest.raises(SpecError) as info:
        parse_spec(doc["spec"])
    assert field in info.value.fields
    # Default what is valid field by field, as the API server would, then run the rules.
    raw = copy.deepcopy(doc)
    stored = {**raw, "spec": _default_loosely(raw["spec"])}
    assert cel_violations(stored), f"CEL accepted {case!r}, pydantic did not"


def _default_loosely(spec: dict[str, Any]) -> dict[str, Any]:
    base = defaulted(example("tiny-cpu.yaml"))["spec"]

    def merge(into: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        for k, v in p.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v
        return into

    out = merge(copy.deepcopy(base), spec)
    source = spec.get("model", {}).get("source")
    if source is not None:
        out["model"]["source"] = source  # sources are a one-of, not merged
    return out


def test_cel_name_length_rule() -> None:
    env = celpy.Environment()
    rule = schema("MoEDeployment")["x-kubernetes-validations"][0]["rule"]
    prog = env.program(env.compile(rule))
    assert prog.evaluate({"self": celpy.json_to_cel({"metadata": {"name": "a" * 40}})})
    assert not prog.evaluate({"self": celpy.json_to_cel({"metadata": {"name": "a" * 41}})})
    with pytest.raises(SpecError) as info:
        parse_manifest({**example("tiny-cpu.yaml"), "metadata": {"name": "a" * 41}})
    assert info.value.fields == ["metadata.name"]
