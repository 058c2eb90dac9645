"""Worker-plane mTLS in the rendered pods: the Secret's volume, its mount and the flags.

With ``spec.security.tls`` set, the router and every worker mount the Secret read-only at
``/etc/moeserve/tls`` and start with ``--tls-cert/--tls-key/--tls-ca`` (moeserve.common.tls), so
worker gRPC serves TLS, requires a client certificate signed by ``ca.crt``, and the router's and
decode workers' calls present theirs. The kubelet's gRPC probes cannot speak TLS, so worker
probes become TCP probes of the gRPC port then.
"""

from __future__ import annotations

from typing import Any

from moeserve.common.spec import MoEDeployment, SpecError
from moeserve.common.spec_security import TLS_MOUNT
from moeserve.common.worker_auth import PREVIOUS, SECRET_KEYS, PlaneSecret
from moeserve.operator.meta import child_labels, object_meta

__all__ = ["tls_args", "tls_volumes", "tls_mounts", "tls_probe", "monitoring_selector",
           "ROTATION_ANNOTATION", "plane_generation", "plane_secret_name", "plane_secret_env",
           "build_plane_secret"]

# Worker-plane tokens (moeserve.common.worker_auth): one Secret per generation, named
# <deployment>-worker-plane-<n>, created by the operator (never read back: it holds no read
# permission on Secrets). Bumping this annotation to n+1 creates generation n+1 and rolls the
# pods, which present and accept both n+1 and n while they roll; generation n-1 is deleted.
ROTATION_ANNOTATION = "moeserve.io/worker-token-rotation"

_VOLUME = "tls"


def tls_args(dep: MoEDeployment) -> list[str]:
    tls = dep.spec.security.tls
    if tls is None:
        return []
    args = ["--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key",
            "--tls-ca", f"{TLS_MOUNT}/ca.crt"]  # fmt: skip
    if tls.server_name:
        args += ["--tls-server-name", tls.server_name]
    return args


def tls_volumes(dep: MoEDeployment) -> list[dict[str, Any]]:
    tls = dep.spec.security.tls
    if tls is None:
        return []
    # 0440 with the pod's fsGroup: readable by the non-root user, by nobody else.
    return [{"name": _VOLUME, "secret": {"secretName": tls.secret_name, "defaultMode": 0o440}}]


def tls_mounts(dep: MoEDeployment) -> list[dict[str, Any]]:
    if dep.spec.security.tls is None:
        return []
    return [{"name": _VOLUME, "mountPath": TLS_MOUNT, "readOnly": True}]


def tls_probe(dep: MoEDeployment, probe: dict[str, Any]) -> dict[str, Any]:
    """``probe`` unchanged, or with its gRPC check turned into a TCP one under mTLS."""
    if dep.spec.security.tls is None or "grpc" not in probe:
        return probe
    out = {k: v for k, v in probe.items() if k != "grpc"}
    out["tcpSocket"] = {"port": probe["grpc"]["port"]}
    return out


def monitoring_selector(dep: MoEDeployment) -> dict[str, str]:
    return dict(dep.spec.security.monitoring_namespace_selector)


def plane_generation(dep: MoEDeployment) -> int:
    raw = dep.annotations.get(ROTATION_ANNOTATION, "0")
    if not raw.isdigit():
        raise SpecError([(f"metadata.annotations[{ROTATION_ANNOTATION}]",
                          f"must be a non-negative integer, got {raw!r}")])
    return int(raw)


def plane_secret_name(dep: MoEDeployment, generation: int | None = None) -> str:
    gen = plane_generation(dep) if generation is None else generation
    return f"{dep.name}-worker-plane-{gen}"


def plane_secret_env(dep: MoEDeployment, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The variables ``names`` from this generation's Secret, and ``<NAME>_PREVIOUS`` from the
    one before (optional: absent at generation 0 and once deleted)."""
    gen = plane_generation(dep)
    env = [{"name": n, "valueFrom": {"secretKeyRef": {
        "name": plane_secret_name(dep, gen), "key": SECRET_KEYS[n]}}} for n in names]
    if gen > 0:
        env += [{"name": n + PREVIOUS, "valueFrom": {"secretKeyRef": {
            "name": plane_secret_name(dep, gen - 1), "key": SECRET_KEYS[n], "optional": True}}}
            for n in names]
    return env


def build_plane_secret(dep: MoEDeployment, secret: PlaneSecret) -> dict[str, Any]:
    """This generation's Secret with fresh tokens; owned by the deployment (garbage-collected
    with it). Created once (apply.ensure_plane_secret), never rendered: its values are random."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": object_meta(dep, plane_secret_name(dep), child_labels(dep, "worker-plane")),
        "stringData": secret.data(),
    }
