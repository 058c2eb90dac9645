"""The fabric preflight as an init container, and the FabricReady condition from pod status.

Every pod of a group runs ``moeserve preflight`` before its worker starts (same image, env and
resources, so it lands on the same NICs and GPUs); they rendezvous on pod 0's rendezvous port,
which the worker takes over only after the init container exits. A failed check exits non-zero,
so the kubelet retries it with backoff and the group never turns ready; the JSON result in the
termination message is what FabricReady reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import MoEDeployment, Role
from moeserve.operator.render import security_context

__all__ = ["add_preflight", "fabric_condition", "PREFLIGHT_CONTAINER"]

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


def _result(terminated: Mapping[str, Any] | None) -> tuple[int, dict[str, Any] | None] | None:
    if not terminated:
        return None
    data = None
    try:
        data = json.loads(terminated.get("message") or "").get(s.PREFLIGHT_RESULT_KEY)
    except (ValueError, AttributeError):
        pass
    return int(terminated.get("exitCode", 1)), data


def _describe(pod: str, data: Mapping[str, Any] | None, code: int) -> str:
    if data is None:
        return f"{pod}: preflight exited {code} without a result"
    nums = f"all-to-all {data.get('all_to_all_gbps')} GB/s, NIXL {data.get('nixl_gbps')} GB/s"
    problems = "; ".join(data.get("problems") or ()) or "ok"
    return f"{pod}: {nums} ({problems})"


def fabric_condition(dep: MoEDeployment, pods: Iterable[Mapping[str, Any]]
                     ) -> tuple[str, bool, str, str] | None:
    """FabricReady over the pods of pools with a preflight; None when no pool has one."""
    roles = {r for r in s.ROLES if dep.spec.pool(r).preflight.enabled}
    if not roles:
        return None
    failed, passed, pending = [], [], []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        meta = pod.get("metadata") or {}
        if (meta.get("labels") or {}).get(s.LABEL_ROLE) not in roles:
            continue
        name = meta.get("name", "?")
        status = next((c for c in (pod.get("status") or {}).get("initContainerStatuses") or ()
                       if c.get("name") == PREFLIGHT_CONTAINER), {})
        now = _result((status.get("state") or {}).get("terminated"))
        last = _result((status.get("lastState") or {}).get("terminated"))
        if now is not None and now[0] == 0:
            passed.append(_describe(name, now[1], 0))
        elif now is not None or last is not None:
            code, data = now if now is not None else last  # type: ignore[misc]
            failed.append(_describe(name, data, code))
        else:
            pending.append(name)
    if failed:
        return ("FabricReady", False, "PreflightFailed", "; ".join(failed))
    if pending or not passed:
        return ("FabricReady", False, "Pending",
                "preflight running on " + (", ".join(pending) or "no pod yet"))
    return ("FabricReady", True, "Passed", "; ".join(passed))
