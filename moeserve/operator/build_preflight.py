"""The fabric preflight as an init container (FabricReady, computed from the pods' results, is
``conditions.fabric_condition``).

Every pod of a group runs ``moeserve preflight`` before its worker starts (same image, env and
resources, so it lands on the same NICs and GPUs); they rendezvous on pod 0's rendezvous port,
which the worker takes over only after the init container exits. A failed check exits non-zero,
so the kubelet retries it with backoff and the group never turns ready; the JSON result in the
termination message is what FabricReady reports.
"""

from __future__ import annotations

from typing import Any

from moeserve.common.spec import MoEDeployment, Role
from moeserve.operator.meta import security_context

__all__ = ["add_preflight", "PREFLIGHT_CONTAINER"]

PREFLIGHT_CONTAINER = "preflight"


def add_preflight(pod: dict[str, Any], dep: MoEDeployment, role: Role) -> None:
    """Insert the preflight init container into a group's pod spec (after model download)."""
    check = dep.spec.pool(role).preflight
    if not check.enabled:
        return
    worker = pod["containers"][0]
    container = {
        "name": PREFLIGHT_CONTAINER,
        "image": worker["image"],
        "imagePullPolicy": worker.get("imagePullPolicy", "IfNotPresent"),
        "command": ["moeserve", "preflight",
                    "--min-alltoall-gbps", f"{check.min_all_to_all_gbps:g}",
                    "--min-nixl-gbps", f"{check.min_nixl_gbps:g}",
                    "--bytes", str(check.bytes), "--timeout-s", str(check.timeout_seconds)],
        "env": list(worker["env"]),
        "resources": dict(worker.get("resources") or {}),
        "securityContext": security_context(),
        # The result (measured GB/s) is the termination message; logs if it could not be written.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [m for m in worker["volumeMounts"]
                         if m["mountPath"] in ("/tmp", "/cache", "/dev/shm")],
    }
    pod["initContainers"] = [*pod.get("initContainers", []), container]
