"""Building blocks shared by the spec modules: the frozen camelCase base model, CEL entries and
the cross-field rule error. Split out of ``spec.py`` so that sub-specs (``spec_ops``) can live in
their own modules without importing ``spec`` (which imports them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = ["FieldRuleError", "_Model", "_cel", "_field_path", "_message"]


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CRD x-kubernetes-validations entry; every rule mirrors a pydantic check."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class FieldRuleError(ValueError):
    """A cross-field rule broken inside one model; ``field`` is relative to that model."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def _field_path(loc: tuple[int | str, ...], error: Mapping[str, Any]) -> str:
    parts = [str(p) if isinstance(p, str) else f"[{p}]" for p in loc]
    rule = error.get("ctx", {}).get("error")
    if isinstance(rule, FieldRuleError) and rule.field:
        parts.extend(rule.field.split("."))
    return ".".join(parts).replace(".[", "[")


def _message(error: Mapping[str, Any]) -> str:
    rule = error.get("ctx", {}).get("error")
    if isinstance(rule, FieldRuleError):
        return str(rule)
    return str(error["msg"])
