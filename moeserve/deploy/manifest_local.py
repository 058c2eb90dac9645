"""A MoEDeployment as a local topology: `moeserve up -f FILE --local`, and plain `moeserve up`
(``--model DIR``) as its equivalent manifest (``model_deployment``, also Ray's).

The same spec types the operator and the Ray app use parse the file; pools become worker child
processes (one per EP group, each starting its DP ranks) launched from the one launch plan
(``local.local_launch``), and the router gets the manifest's settings. Pure apart from reading
the file (and, for ``model_deployment``, the checkpoint directory and whether a GPU exists).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moeserve.common import spec as s
from moeserve.common.errors import ConfigError
from moeserve.common.served_name import served_model_name, with_served_name
from moeserve.common.spec import MoEDeployment, SpecError, parse_manifest
from moeserve.deploy.local import LAPTOP_DISAGG_THRESHOLD, ClusterSpec

__all__ = ["cluster_spec_from_manifest", "load_manifest", "local_model_dir", "model_deployment",
           "LAPTOP_DISAGG_THRESHOLD"]


def load_manifest(path: str | Path) -> MoEDeployment:
    """Read and validate a manifest file; errors name the file or the field."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read manifest {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_manifest(doc)


def local_model_dir(dep: MoEDeployment, override: str | None) -> str | None:
    """Checkpoint directory for local workers; None means the embedded tiny model."""
    if override:
        return override
    source = dep.spec.model.source
    if source.preset == "tiny":
        return None
    if source.host_path is not None:
        return str(Path(source.host_path.path) / dep.spec.model.path)
    raise ConfigError(
        "spec.model.source.pvc is a cluster volume and cannot be mounted by local processes: "
        "pass --model DIR with a copy of the checkpoint"
    )


def model_deployment(model: str | None, prefill: int = 1, decode: int = 1,
                     gpus: int | None = None,
                     disagg_threshold: int = LAPTOP_DISAGG_THRESHOLD) -> MoEDeployment:  # fmt: skip
    """`moeserve up --model DIR --prefill N --decode N` (local or Ray) as the equivalent
    manifest: one rank per group, one GPU per rank when a GPU exists; every other value is the
    spec's own default, as for a manifest (the one override is named: ``disagg_threshold``)."""
    name = served_model_name(model=model)
    if model is None:
        source: dict = {"preset": "tiny"}
    else:
        model_dir = Path(model).resolve()
        if not (model_dir / "config.json").is_file():
            raise SpecError([("--model", f"{model} is not a checkpoint directory "
                                         "(no config.json)")])  # fmt: skip
        source = {"hostPath": {"path": str(model_dir)}}
    if gpus is None:
        import torch

        gpus = 1 if torch.cuda.is_available() else 0
    pool = {"gpusPerPod": gpus, "parallelism": {"dp": 1, "ep": 1, "tp": 1}}
    return parse_manifest({
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}", "kind": s.KIND_DEPLOYMENT,
        "metadata": {"name": "moeserve"},
        "spec": {
            # The served name by the one rule of moeserve.common.served_name.
            "model": {"name": name, "source": source},
            "router": {"disaggThreshold": disagg_threshold},
            "prefill": {**pool, "replicas": prefill},
            "decode": {**pool, "replicas": decode},
        },
    })  # fmt: skip


def cluster_spec_from_manifest(dep: MoEDeployment, model: str | None = None,
                               served_name: str | None = None,
                               **overrides: object) -> ClusterSpec:  # fmt: skip
    """ClusterSpec for `LocalCluster`: one worker child per EP group, launched from the pools.
    ``model`` overrides where the checkpoint is, not its name: that stays spec.model.name
    (or ``served_name``, --served-model-name), as on Ray and Kubernetes."""
    dep = with_served_name(dep, served_name)
    spec = dep.spec
    return ClusterSpec(
        deployment=dep,
        model=local_model_dir(dep, model),
        served_model_name=served_model_name(manifest=dep),
        prefill=spec.prefill.replicas,
        decode=spec.decode.replicas,
        disagg_threshold=spec.router.disagg_threshold,
        role_ranks={role: spec.pool(role).parallelism.dp for role in s.ROLES},
        **overrides,
    )
