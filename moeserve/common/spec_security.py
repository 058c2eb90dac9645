"""``spec.security`` of a MoEDeployment: who may scrape metrics, and worker-plane mTLS.

Router API keys stay at ``spec.router.apiKeySecret`` (they concern the router's clients only).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = ["SecuritySpec", "TlsSpec", "DEFAULT_MONITORING_SELECTOR", "TLS_MOUNT"]

# The namespace Prometheus usually runs in; `kubernetes.io/metadata.name` is set by the API
# server on every namespace (Kubernetes >= 1.22), so it needs no labelling by hand.
DEFAULT_MONITORING_SELECTOR = {"kubernetes.io/metadata.name": "monitoring"}
TLS_MOUNT = "/etc/moeserve/tls"

# The spec models' base config (camelCase aliases, unknown fields refused, frozen), spelled out
# here so this module does not import the spec module that imports it.
_CONFIG = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TlsSpec(BaseModel):
    model_config = _CONFIG

    secret_name: str = Field(min_length=1, max_length=253, description=(
        "Secret with `tls.crt`, `tls.key` and `ca.crt` (cert-manager's layout), mounted in the "
        "router and every worker; peers must present a certificate signed by `ca.crt`."))
    server_name: str | None = Field(None, min_length=1, description=(
        "Name the peers' certificates carry, when they are not issued per pod address."))


class SecuritySpec(BaseModel):
    model_config = _CONFIG

    monitoring_namespace_selector: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_MONITORING_SELECTOR),
        description="Labels of the namespaces allowed to scrape worker metrics (matchLabels).",
    )
    tls: TlsSpec | None = Field(None, description="Worker-plane mTLS; unset means plaintext.")
