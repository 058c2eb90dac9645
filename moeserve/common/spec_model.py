"""The model part of the spec: where the checkpoint comes from, its shape, one EP group's layout.

Kept apart from ``spec.py`` (which re-exports the models) so that file stays within size; the
same rules hold: every default lives here once and every pydantic check has a CEL twin.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from moeserve.common.errors import ConfigError
from moeserve.common.model_config import ModelConfig
from moeserve.common.model_presets import ModelShape, planned_model_config
from moeserve.common.spec_base import FieldRuleError, _cel, _Model

__all__ = ["MODELS_DIR", "Parallelism", "PvcSource", "HostPathSource", "ModelSource",
           "CompileCacheSpec",
           "ModelSpec"]

# Where a worker or router container mounts the model volume.
MODELS_DIR = "/models"


class Parallelism(_Model):
    """Layout of one EP group: attention data-parallel x tensor-parallel ranks = expert ranks."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.dp * self.tp == self.ep", "dp * tp must equal ep", ".ep"),
    ]})

    dp: int = Field(1, ge=1, le=1024, description="Attention data-parallel ranks.")
    ep: int = Field(1, ge=1, le=1024, description="Expert-parallel ranks (GPUs) in one group.")
    tp: int = Field(1, ge=1, le=16, description="Attention tensor-parallel ranks.")

    @model_validator(mode="after")
    def _layout(self) -> Parallelism:
        if self.dp * self.tp != self.ep:
            raise FieldRuleError("ep", f"dp ({self.dp}) * tp ({self.tp}) must equal ep ({self.ep})")
        return self


class PvcSource(_Model):
    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the model.")


class HostPathSource(_Model):
    path: str = Field(pattern=r"^/", description="Directory on the node holding the model.")


class ModelSource(_Model):
    """Where the checkpoint comes from: exactly one of pvc, hostPath, preset."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("[has(self.pvc), has(self.hostPath), has(self.preset)].filter(x, x).size() == 1",
             "exactly one of pvc, hostPath, preset must be set"),
    ]})

    pvc: PvcSource | None = None
    host_path: HostPathSource | None = None
    preset: Literal["tiny"] | None = Field(
        None, description="Generate a random checkpoint of this preset in an init container.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        chosen = [name for name, value in (("pvc", self.pvc), ("hostPath", self.host_path),
                                           ("preset", self.preset)) if value]
        if len(chosen) != 1:
            raise FieldRuleError("", f"exactly one of pvc, hostPath, preset must be set, got "
                                     f"{chosen or 'none'}")
        return self


class CompileCacheSpec(_Model):
    """Where workers keep compiled kernels (Triton's cache) across pod restarts: a directory on
    the node, or a PersistentVolumeClaim (ReadWriteMany where pods span nodes). Without one
    each new pod compiles its kernels again before it reports ready (H200, V2-Lite: start-up
    54-64 s cold against 33 s with the cache warm). Entries are keyed by kernel source, GPU
    and compiler version, so pods of different images and nodes can share one."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!(has(self.pvc) && has(self.hostPath))", "set at most one of pvc, hostPath"),
    ]})

    pvc: str | None = Field(None, min_length=1,
                            description="PersistentVolumeClaim mounted as the cache.")
    host_path: str | None = Field(None, pattern=r"^/",
                                  description="Directory on the node (created if missing).")

    @model_validator(mode="after")
    def _at_most_one(self) -> CompileCacheSpec:
        if self.pvc and self.host_path:
            raise FieldRuleError("", "set at most one of pvc, hostPath")
        return self


class ModelSpec(_Model):
    name: str = Field(min_length=1, max_length=253,
                      description="Served model id (OpenAI `model`), also keys block hashes.")
    source: ModelSource
    path: str = Field("", pattern=r"^([^/].*)?$",
                      description="Checkpoint directory inside the volume (relative).")
    num_experts: int | None = Field(None, ge=1, description="Routed experts per MoE layer; when "
                                    "set, each pool's ep must divide experts + redundant experts.")
    block_size: int = Field(64, ge=1, le=1024, description="KV block size in tokens.")
    shape: ModelShape | None = Field(None, description="Known model shape for the memory plan "
                                     "(default: from a known HuggingFace name or the preset).")
    config: dict[str, Any] = Field(default_factory=dict, description="config.json fields for "
                                   "the memory plan: the whole file, or overrides of `shape`.")

    @model_validator(mode="after")
    def _plannable(self) -> ModelSpec:
        try:
            self.model_config_for_plan()
        except ConfigError as exc:
            raise FieldRuleError("shape" if self.shape and not self.config else "config",
                                 str(exc)) from None
        return self

    def model_config_for_plan(self) -> ModelConfig | None:
        """The checkpoint's shape as far as the manifest tells (None: it does not)."""
        return planned_model_config(self.shape, self.config, self.name, self.source.preset)

    def container_path(self) -> str:
        leaf = self.path or (self.source.preset or "")
        return f"{MODELS_DIR}/{leaf}".rstrip("/")
