"""Embedded schemas of the third-party kinds the operator renders, which kubernetes-validate
does not ship: scheduler-plugins' and Volcano's PodGroup and LWS's LeaderWorkerSet. Transcribed
(spec fields only, with their types) from the upstream CRDs: scheduler-plugins `config/crd/bases/
scheduling.x-k8s.io_podgroups.yaml` (v1alpha1), Volcano `config/crd/volcano/bases/
scheduling.volcano.sh_podgroups.yaml` (v1beta1) and lws `config/crd/bases/
leaderworkerset.x-k8s.io_leaderworkersets.yaml` (v1; the pod template inside is validated as a
core PodTemplate by kubernetes-validate). Unknown spec fields are errors, as a structural CRD
schema would prune them silently."""

from __future__ import annotations

from typing import Any

import jsonschema

_QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
_META = {
    "type": "object", "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                 "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {
            "type": "object", "required": ["apiVersion", "kind", "name", "uid"]}},
    },
}


def _kind(api_version: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version}, "kind": {"const": "PodGroup"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "properties": spec,
                     "required": ["minMember"]},
        },
    }


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): _kind("scheduling.x-k8s.io/v1alpha1", {
        "minMember": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        "minResources": _QUANTITIES,
        "scheduleTimeoutSeconds": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
    }),
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): _kind("scheduling.volcano.sh/v1beta1", {
        "minMember": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        "minTaskMember": {"type": "object", "additionalProperties": {"type": "integer"}},
        "minResources": _QUANTITIES,
        "priorityClassName": {"type": "string"},
        "queue": {"type": "string"},
        "networkTopology": {"type": "object"},
    }),
}


_INT_OR_STRING = {"type": ["integer", "string"]}
SCHEMAS[("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"}, "metadata": _META,
        "spec": {"type": "object", "additionalProperties": False, "required": [
            "leaderWorkerTemplate"], "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
            "networkConfig": {"type": "object"},
            "rolloutStrategy": {"type": "object", "additionalProperties": False, "properties": {
                "type": {"enum": ["RollingUpdate"]},
                "rollingUpdateConfiguration": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "maxSurge": _INT_OR_STRING, "maxUnavailable": _INT_OR_STRING,
                        "partition": {"type": "integer"}}}}},
            "leaderWorkerTemplate": {
                "type": "object", "additionalProperties": False, "required": ["workerTemplate"],
                "properties": {
                    "size": {"type": "integer", "minimum": 1},
                    "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None",
                                               "RecreateGroupAfterStart"]},
                    "leaderTemplate": {"type": "object"},
                    "workerTemplate": {"type": "object", "required": ["spec"]},
                    "subGroupPolicy": {"type": "object"},
                }},
        }},
    },
}


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod templates inside a third-party object, as core PodTemplates for kubernetes-validate."""
    if obj.get("kind") != "LeaderWorkerSet":
        return []
    template = obj["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": obj["metadata"]["name"]}, "template": template}]


def validate_third_party(obj: dict[str, Any]) -> bool:
    """Validate ``obj`` if it is a known third-party kind; False when it is not one."""
    schema = SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is None:
        return False
    jsonschema.validate(obj, schema)
    return True
