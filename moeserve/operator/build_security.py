"""Worker-plane mTLS in the rendered pods: the Secret's volume, its mount and the flags.

With ``spec.security.tls`` set, the router and every worker mount the Secret read-only at
``/etc/moeserve/tls`` and start with ``--tls-cert/--tls-key/--tls-ca`` (moeserve.common.tls), so
worker gRPC serves TLS, requires a client certificate signed by ``ca.crt``, and the router's and
decode workers' calls present theirs. The kubelet's gRPC probes cannot speak TLS, so worker
probes become TCP probes of the gRPC port then.
"""

from __future__ import annotations

from typing import Any

from moeserve.common.spec import MoEDeployment
from moeserve.common.spec_security import TLS_MOUNT

__all__ = ["tls_args", "tls_volumes", "tls_mounts", "tls_probe", "monitoring_selector"]

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
