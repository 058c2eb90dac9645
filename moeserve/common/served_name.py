"""The served model name: what /v1/models lists and what requests must name as ``model``.

One rule for every target (`moeserve up`, `up -f FILE --local`, `up --ray`, the operator), so a
client written against one works against the others:

1. ``--served-model-name`` when given;
2. else the manifest's ``spec.model.name``;
3. else the name of the ``--model`` checkpoint directory (not the path as typed: the same
   checkpoint copied to another machine or mounted elsewhere keeps its name);
4. else (the embedded tiny model) :data:`TINY_MODEL_NAME`.

The name is also the model id the workers hash into prefix-cache keys (``--model-id``), so a
router and its workers must agree on it; every target passes the result to both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moeserve.common.errors import ConfigError

if TYPE_CHECKING:
    from moeserve.common.spec import MoEDeployment

__all__ = ["MAX_NAME_LEN", "TINY_MODEL_NAME", "served_model_name", "with_served_name"]

TINY_MODEL_NAME = "tiny-deepseek-v3"
MAX_NAME_LEN = 253  # spec.model.name's limit (a Kubernetes name)


def served_model_name(explicit: str | None = None, *, manifest: MoEDeployment | None = None,
                      model: str | None = None) -> str:  # fmt: skip
    """The name under the rule above; ``explicit`` is ``--served-model-name``."""
    if explicit is not None:
        name = explicit.strip()
        if not name or len(name) > MAX_NAME_LEN:
            raise ConfigError(f"--served-model-name must be 1 to {MAX_NAME_LEN} characters, "
                              f"got {explicit!r}")  # fmt: skip
        return name
    if manifest is not None:
        return manifest.spec.model.name
    if model:
        return Path(model).resolve().name
    return TINY_MODEL_NAME


def with_served_name(dep: MoEDeployment, explicit: str | None) -> MoEDeployment:
    """``dep`` serving ``--served-model-name`` when given (spec.model.name is the served name
    everywhere a manifest is the input)."""
    if explicit is None:
        return dep
    name = served_model_name(explicit)
    model = dep.spec.model.model_copy(update={"name": name})
    return dep.model_copy(update={"spec": dep.spec.model_copy(update={"model": model})})
