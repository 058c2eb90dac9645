"""kopf wiring: thin handlers that hand every trigger to :class:`Reconciler`.

Handlers are registered on an explicit registry built from :class:`OperatorConfig` (no
import-time state), and every kopf setting is made in the one startup handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from moeserve.common.spec import API_GROUP, API_VERSION, SpecError, parse_manifest
from moeserve.operator.autoscale import Autoscaler, MetricsSource, PrometheusSource
from moeserve.operator.kube import Kube, KubeError, load_config
from moeserve.operator.meta import MANAGED_BY
from moeserve.operator.reconcile import Outcome, Reconciler

__all__ = ["OperatorConfig", "build_registry"]

DEPLOYMENTS = (API_GROUP, API_VERSION, "moedeployments")
POOLS = (API_GROUP, API_VERSION, "moeworkerpools")
# Children whose deletion or status change the operator reacts to at once; the resync timer
# restores edits of any child.
WATCHED_CHILDREN = (("apps", "v1", "statefulsets"), ("apps", "v1", "deployments"),
                    ("", "v1", "services"))
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass(frozen=True)
class OperatorConfig:
    resync_seconds: float = 60.0
    namespaces: tuple[str, ...] = field(default_factory=tuple)  # empty: the whole cluster
    max_workers: int = 8
    # Tests shorten the watch so that a restarted emulator is noticed quickly.
    watch_server_timeout: int | None = None
    # SLA autoscaling: how often deployments are looked at (each is planned at its own
    # spec.autoscaling.intervalSeconds), and where load comes from (None: Prometheus).
    autoscale_seconds: float = 5.0
    metrics_source: MetricsSource | None = None


def _finish(outcome: Outcome | None, raise_on_retry: bool) -> None:
    if outcome is None:
        return
    if outcome.event is not None:
        kind, reason, message = outcome.event
        kopf.event(dict(outcome.body), type=kind, reason=reason, message=message)
    if outcome.retry and raise_on_retry:
        raise kopf.TemporaryError(outcome.error or "reconcile failed", delay=15)


def _login(**_: Any) -> kopf.ConnectionInfo:
    # kopf's own client login reads $KUBECONFIG as it was at import; ours reads it now.
    client = load_config()
    header = client.get_api_key_with_prefix("BearerToken") or \
        client.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=client.host, ca_path=client.ssl_ca_cert, insecure=not client.verify_ssl,
        scheme=scheme or None, token=token or None, certificate_path=client.cert_file,
        private_key_path=client.key_file)


def _autoscale(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> None:
    """One SLA-planner pass for a deployment, at its own spec.autoscaling.intervalSeconds."""
    try:
        dep = parse_manifest(body)
    except SpecError:
        return  # the reconciler reports it
    key, now = (dep.namespace, dep.name), time.monotonic()
    if dep.spec.autoscaling.mode != "sla" or \
            now - memo.planned.get(key, -1e9) < dep.spec.autoscaling.interval_seconds:
        return
    memo.planned[key] = now
    try:
        reason = memo.autoscaler.tick(dep)
    except (KubeError, OSError, ValueError) as exc:
        logger.warning(f"SLA autoscaler: {exc}")  # metrics down: keep the sizes
        return
    if reason:
        kopf.event(dict(body), type="Normal", reason="Scaled", message=reason)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(_login)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Handler progress in annotations: status is ours and its schema prunes unknown keys.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="moeserve.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="moeserve.io", key="last-handled-configuration")
        # Only kopf's warnings become Events; our own Events (InvalidSpec, ...) are explicit.
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = config.max_workers
        # One replica (the chart runs one): no peering objects to install.
        settings.peering.standalone = True
        if config.watch_server_timeout is not None:
            settings.watching.server_timeout = config.watch_server_timeout
        kube = Kube.from_environment()
        memo.reconciler = Reconciler(kube)
        memo.autoscaler = Autoscaler(kube, config.metrics_source or PrometheusSource())
        memo.planned = {}

    @kopf.on.resume(*DEPLOYMENTS, registry=registry)
    @kopf.on.create(*DEPLOYMENTS, registry=registry)
    @kopf.on.update(*DEPLOYMENTS, registry=registry)
    def reconcile_deployment(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        _finish(memo.reconciler.reconcile(body), raise_on_retry=True)

    @kopf.timer(*DEPLOYMENTS, interval=config.resync_seconds, registry=registry)
    def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        _finish(memo.reconciler.reconcile(body), raise_on_retry=False)

    @kopf.timer(*DEPLOYMENTS, interval=config.autoscale_seconds, registry=registry,
                id="sla-autoscaler")
    def autoscale(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        _autoscale(body, memo, logger)

    @kopf.on.delete(*DEPLOYMENTS, optional=True, registry=registry)
    def deleted(logger: kopf.Logger, **_: Any) -> None:
        logger.info("children go with their owner references (garbage collector)")

    def child_changed(type: str | None, body: kopf.Body, memo: kopf.Memo,
                      resource: kopf.Resource, **_: Any) -> None:
        outcome = memo.reconciler.child_changed(resource.plural, body, deleted=type == "DELETED")
        _finish(outcome, raise_on_retry=False)

    for group, version, plural in WATCHED_CHILDREN:
        kopf.on.event(group, version, plural, labels=MANAGED, registry=registry,
                      id=f"child-{plural}")(child_changed)

    @kopf.on.event(*POOLS, labels=MANAGED, registry=registry)
    def pool_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        spec: Mapping[str, Any] = body.get("spec") or {}
        status: Mapping[str, Any] = body.get("status") or {}
        # The HPA scaled the pool: spec.replicas moved away from the groups that exist.
        scaled = spec.get("replicas") != status.get("replicas")
        outcome = memo.reconciler.child_changed(
            "moeworkerpools", body, deleted=type == "DELETED" or scaled)
        _finish(outcome, raise_on_retry=False)

    return registry
