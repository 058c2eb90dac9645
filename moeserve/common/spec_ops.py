"""Day-2 parts of a pool's spec: gang scheduling of EP groups and rolling updates.

Kept apart from ``spec.py`` (which re-exports them) so that file stays readable; the same rules
hold: every default lives here once and every pydantic check has a CEL twin for the CRD.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from moeserve.common.spec_base import FieldRuleError, _cel, _Model

__all__ = ["GangMode", "SchedulingSpec", "RolloutSpec", "DEFAULT_SCHEDULERS"]

GangMode = Literal["none", "coscheduling", "volcano", "kueue"]
# The scheduler that understands each gang kind, unless spec.scheduling.schedulerName says
# otherwise. Kueue gates pods itself and leaves placement to the default scheduler.
DEFAULT_SCHEDULERS: dict[str, str | None] = {
    "none": None, "coscheduling": "scheduler-plugins-scheduler", "volcano": "volcano",
    "kueue": None,
}


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
