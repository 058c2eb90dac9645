"""Day-2 parts of the spec: gang scheduling, rolling updates, SLA autoscaling, preflight.

Kept apart from ``spec.py`` (which re-exports them) so that file stays readable; the same rules
hold: every default lives here once and every pydantic check has a CEL twin for the CRD.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from moeserve.common.spec_base import FieldRuleError, _cel, _Model

__all__ = ["AutoscalingSpec", "GangMode", "SchedulingSpec", "RolloutSpec", "DEFAULT_SCHEDULERS",
           "ScaleToZeroSpec",
           "SlaAutoscalingSpec", "PreflightSpec"]

GangMode = Literal["none", "coscheduling", "volcano", "kueue"]
# The scheduler that understands each gang kind, unless spec.scheduling.schedulerName says
# otherwise. Kueue gates pods itself and leaves placement to the default scheduler.
DEFAULT_SCHEDULERS: dict[str, str | None] = {
    "none": None, "coscheduling": "scheduler-plugins-scheduler", "volcano": "volcano",
    "kueue": None,
}


class AutoscalingSpec(_Model):
    """HPA bounds (in EP groups) and per-pod targets on the pool's custom metrics."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas",
             ".minReplicas"),
        _cel("!self.enabled || has(self.targetNumRequestsWaiting) || "
             "has(self.targetKvCacheUsagePerc) || has(self.targetTimeToFirstTokenSeconds)",
             "an enabled autoscaler needs at least one target"),
    ]})

    enabled: bool = False
    min_replicas: int = Field(1, ge=1, le=1000)
    max_replicas: int = Field(1, ge=1, le=1000)
    target_num_requests_waiting: float | None = Field(None, gt=0)
    target_kv_cache_usage_perc: float | None = Field(None, gt=0, le=1)
    target_time_to_first_token_seconds: float | None = Field(None, gt=0)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=3600)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise FieldRuleError("minReplicas", f"minReplicas ({self.min_replicas}) must be <= "
                                                f"maxReplicas ({self.max_replicas})")
        targets = (self.target_num_requests_waiting, self.target_kv_cache_usage_perc,
                   self.target_time_to_first_token_seconds)
        if self.enabled and all(t is None for t in targets):
            raise FieldRuleError("", "an enabled autoscaler needs at least one target")
        return self


class SchedulingSpec(_Model):
    """How one EP group is placed: all of its pods or none (a half-placed group only burns GPUs
    waiting at the rendezvous)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.gang != 'kueue' || has(self.queue)", "kueue gang scheduling needs a queue",
             ".queue"),
    ]})

    gang: GangMode = Field("none", description="PodGroup kind per EP group: coscheduling "
                           "(scheduler-plugins), volcano, kueue (pod-group labels) or none.")
    scheduler_name: str | None = Field(None, min_length=1, description="Defaults to the gang "
                                       "kind's scheduler.")
    queue: str | None = Field(None, min_length=1, description="Volcano queue or Kueue "
                              "LocalQueue name.")
    schedule_timeout_seconds: int = Field(600, ge=1, le=86400, description="A group not "
                                          "placed within this long is reported Unschedulable.")
    priority_class_name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _queue(self) -> SchedulingSpec:
        if self.gang == "kueue" and not self.queue:
            raise FieldRuleError("queue", "kueue gang scheduling needs a queue")
        return self

    def scheduler(self) -> str | None:
        return self.scheduler_name or DEFAULT_SCHEDULERS[self.gang]


class RolloutSpec(_Model):
    """Rolling update of a pool, counted in whole EP groups (a group is one model replica)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.maxSurge + self.maxUnavailable >= 1",
             "maxSurge + maxUnavailable must be at least 1", ".maxSurge"),
    ]})

    max_surge: int = Field(1, ge=0, le=100, description="Extra EP groups during a roll.")
    max_unavailable: int = Field(0, ge=0, le=100, description="EP groups that may be "
                                 "unready during a roll, below the desired count.")
    progress_deadline_seconds: int = Field(1800, ge=1, le=86400, description="A roll with no "
                                           "new ready group for this long is Degraded.")

    @model_validator(mode="after")
    def _progress(self) -> RolloutSpec:
        if self.max_surge + self.max_unavailable < 1:
            raise FieldRuleError("maxSurge", "maxSurge + maxUnavailable must be at least 1")
        return self


class ScaleToZeroSpec(_Model):
    enabled: bool = False
    idle_seconds: int = Field(900, ge=1, le=86400, description="No load for this long scales "
                              "both pools to zero groups.")
    wake_prefill: bool = Field(True, description="Wake a prefill group with the decode group "
                               "(else decode prefills locally until the planner adds one).")
    hold_seconds: float = Field(120, gt=0, le=3600, description="How long the router holds a "
                                "request while a group wakes before answering 503.")


class SlaAutoscalingSpec(_Model):
    """Deployment-wide autoscaling. ``hpa``: each pool's own HPA (pool.autoscaling). ``sla``:
    the operator's planner sizes both pools together from TTFT/ITL targets and the measured
    load, every ``intervalSeconds``."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.minDecode <= self.maxDecode", "minDecode must be <= maxDecode", ".minDecode"),
        _cel("self.minPrefill <= self.maxPrefill", "minPrefill must be <= maxPrefill",
             ".minPrefill"),
    ]})

    mode: Literal["hpa", "sla"] = "hpa"
    ttft_seconds: float = Field(2.0, gt=0, description="Target time to first token (p90).")
    itl_seconds: float = Field(0.1, gt=0, description="Target inter-token latency (p90).")
    prefill_tokens_per_second_per_group: float = Field(
        50000, gt=0, description="Prompt tokens/s one prefill group sustains (benchmarked).")
    decode_tokens_per_second_per_group: float = Field(
        5000, gt=0, description="Generated tokens/s one decode group sustains (benchmarked).")
    min_prefill: int = Field(0, ge=0, le=1000)
    max_prefill: int = Field(8, ge=0, le=1000)
    min_decode: int = Field(1, ge=1, le=1000)
    max_decode: int = Field(8, ge=1, le=1000)
    interval_seconds: int = Field(30, ge=1, le=3600)
    scale_down_delay_seconds: int = Field(300, ge=0, le=86400)
    metrics_url: str | None = Field(None, min_length=1, description="Prometheus base URL the "
                                    "operator reads load from.")
    scale_to_zero: ScaleToZeroSpec = Field(default_factory=ScaleToZeroSpec)

    @model_validator(mode="after")
    def _bounds(self) -> SlaAutoscalingSpec:
        if self.min_decode > self.max_decode:
            raise FieldRuleError("minDecode", "minDecode must be <= maxDecode")
        if self.min_prefill > self.max_prefill:
            raise FieldRuleError("minPrefill", "minPrefill must be <= maxPrefill")
        return self


class PreflightSpec(_Model):
    """Fabric check before a group serves: an all-to-all across its pods and a NIXL read
    between them, each against a bandwidth floor (`moeserve preflight`, an init container)."""

    enabled: bool = False
    min_all_to_all_gbps: float = Field(0, ge=0, description="All-to-all floor, GB/s per rank.")
    min_nixl_gbps: float = Field(0, ge=0, description="NIXL read floor, GB/s.")
    bytes: int = Field(64 << 20, ge=1024, le=1 << 34, description="Payload per test.")
    timeout_seconds: int = Field(600, ge=10, le=86400, description="Rendezvous and transfer "
                                 "timeout (all pods of the group must start within it).")
