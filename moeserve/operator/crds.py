"""CustomResourceDefinitions generated from the pydantic spec and status models.

The checked-in `crds/*.yaml` (and the chart's identical copies) are this module's output, so the
schema defaults and CEL rules come from `moeserve/common/spec.py` only. Regenerate with::

    python -m moeserve.operator.crds --write

A test fails when the checked-in files differ from what this module renders.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from moeserve.common.spec import (
    API_GROUP,
    API_VERSION,
    KIND_DEPLOYMENT,
    KIND_WORKER_POOL,
    MoEDeploymentSpec,
    Role,
)
from moeserve.operator.status import DeploymentStatus, WorkerPoolStatus

__all__ = ["structural_schema", "build_crds", "dump_crd", "CRD_FILES", "WorkerPoolSpec"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = {KIND_DEPLOYMENT: "moedeployments.yaml", KIND_WORKER_POOL: "moeworkerpools.yaml"}
_KEEP = ("type", "description", "default", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "minLength", "maxLength", "pattern", "enum", "format", "minItems",
         "maxItems", "x-kubernetes-validations")


class WorkerPoolSpec(BaseModel):
    """One role's worker pool of a MoEDeployment; replicas counts EP groups."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    deployment: str = Field(min_length=1, description="The owning MoEDeployment.")
    role: Role
    replicas: int = Field(ge=0, description="EP groups; the scale subresource's replicas.")
    pods_per_group: int = Field(ge=1)
    ranks_per_group: int = Field(ge=1)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict) and "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def structural_schema(node: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """Turn pydantic's JSON schema into a Kubernetes structural schema: refs inlined,
    optionals unwrapped, free-form maps preserved, int-or-string quantities marked."""
    node = _resolve(node, defs)
    branches = [_resolve(b, defs) for b in node.get("anyOf", [])]
    if branches:
        non_null = [b for b in branches if b.get("type") != "null"]
        types = sorted(b.get("type", "") for b in non_null)
        if types == ["integer", "string"]:
            out = {"x-kubernetes-int-or-string": True}
            return out | {k: node[k] for k in ("description",) if k in node}
        assert len(non_null) == 1, f"unsupported union {branches}"
        node = {**non_null[0], **{k: v for k, v in node.items() if k not in ("anyOf",)}}
        if node.get("default", 0) is None:
            del node["default"]
    out = {k: copy.deepcopy(node[k]) for k in _KEEP if k in node}
    # OpenAPI v3.0 (what Kubernetes speaks) has boolean exclusive bounds.
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in out and not isinstance(out[bound], bool):
            out[limit], out[bound] = out[bound], True
    if "const" in node:
        out["enum"] = [node["const"]]
        out.setdefault("type", "string")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    kind = out.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            required = set(node.get("required", []))
            out["properties"] = {}
            for name, sub in props.items():
                child = structural_schema(sub, defs)
                optional = any(b.get("type") == "null" for b in sub.get("anyOf", []))
                # An omitted nested object defaults to {} so that its own defaults apply
                # (not for optional ones, whose presence means something).
                if name not in required and not optional and child.get("type") == "object" \
                        and "properties" in child and "default" not in child:
                    child["default"] = {}
                out["properties"][name] = child
            if required:
                out["required"] = sorted(required)
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural_schema(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural_schema(node.get("items", {}), defs)
    elif kind is None and "x-kubernetes-int-or-string" not in out:
        out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural_schema(raw, raw.get("$defs", {}))


def _crd(kind: str, plural: str, short: list[str], spec: dict[str, Any],
         status: dict[str, Any], columns: list[dict[str, Any]],
         subresources: dict[str, Any], root_rules: list[dict[str, str]]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if root_rules:
        schema["x-kubernetes-validations"] = root_rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}",
                     "labels": {"app.kubernetes.io/name": "moeserve"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short, "categories": ["moeserve"]},
            "versions": [{
                "name": API_VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": subresources,
                "additionalPrinterColumns": columns,
            }],
        },
    }


def build_crds() -> dict[str, dict[str, Any]]:
    deployment_spec = model_schema(MoEDeploymentSpec)
    deployment_spec["description"] = "Desired state of a MoEDeployment."
    deployment = _crd(
        KIND_DEPLOYMENT, "moedeployments", ["moed", "moe"], deployment_spec,
        model_schema(DeploymentStatus),
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready",
             "description": "Ready EP groups / desired EP groups"},
            {"name": "Router", "type": "string", "jsonPath": ".status.routerEndpoint"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        subresources={"status": {}},
        # Pod names are <name>-<role>-<group>-<ordinal> and carry a revision-hash label.
        root_rules=[{"rule": "self.metadata.name.size() <= 40",
                     "message": "metadata.name must be at most 40 characters",
                     "fieldPath": ".metadata.name"}],
    )
    pool = _crd(
        KIND_WORKER_POOL, "moeworkerpools", ["moewp"], model_schema(WorkerPoolSpec),
        model_schema(WorkerPoolStatus),
        columns=[
            {"name": "Deployment", "type": "string", "jsonPath": ".spec.deployment"},
            {"name": "Role", "type": "string", "jsonPath": ".spec.role"},
            {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        subresources={"status": {}, "scale": {
            "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"}},
        root_rules=[],
    )
    return {KIND_DEPLOYMENT: deployment, KIND_WORKER_POOL: pool}


# The chart templates its CRDs from here (templates/crds.yaml, behind crds.install) rather than
# keeping them in its crds/ folder, which helm installs once and never upgrades.
CHART_CRDS = Path("charts") / "moeserve" / "files" / "crds"

HEADER = ("# Generated by `python -m moeserve.operator.crds --write` from\n"
          "# moeserve/common/spec.py; do not edit by hand.\n")


def dump_crd(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def write(root: Path = REPO_ROOT) -> list[Path]:
    written = []
    for kind, crd in build_crds().items():
        for folder in (root / "crds", root / CHART_CRDS):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / CRD_FILES[kind]
            path.write_text(dump_crd(crd))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help=f"write crds/ and {CHART_CRDS}/ instead of printing")
    args = parser.parse_args(argv)
    if args.write:
        for path in write():
            print(path)
    else:
        print("---\n".join(dump_crd(c) for c in build_crds().values()), end="")


if __name__ == "__main__":
    main()
