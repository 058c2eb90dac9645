"""A MoEDeployment manifest as a local topology: `moeserve up -f FILE --local`.

The same spec types the operator and the Ray app use parse the file; pools become worker child
processes (one per EP group, each starting its DP ranks) and the router gets the manifest's
settings. Pure apart from reading the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moeserve.common.errors import ConfigError
from moeserve.common.served_name import served_model_name
from moeserve.common.spec import MoEDeployment, PoolSpec, parse_manifest

__all__ = ["cluster_spec_from_manifest", "load_manifest", "local_model_dir"]


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


def _pool_args(pool: PoolSpec, block_size: int) -> list[str]:
    p = pool.parallelism
    args = ["--dp", str(p.dp), "--ep", str(p.ep), "--block-size", str(block_size)]
    if pool.eplb.enabled:
        args += ["--enable-eplb", "--eplb-redundant-experts", str(pool.eplb.redundant_experts)]
    if pool.dbo.enabled:
        args += ["--enable-dbo"]
    return args + list(pool.extra_args)


def cluster_spec_from_manifest(dep: MoEDeployment, model: str | None = None,
                               served_name: str | None = None, **overrides):  # fmt: skip
    """ClusterSpec for `LocalCluster`: one worker child per EP group, manifest settings.
    ``model`` overrides where the checkpoint is, not its name: that stays spec.model.name
    (or ``served_name``, --served-model-name), as on Ray and Kubernetes."""
    from moeserve.deploy.local import ClusterSpec

    s = dep.spec
    return ClusterSpec(
        model=local_model_dir(dep, model),
        served_model_name=served_model_name(served_name, manifest=dep),
        prefill=s.prefill.replicas,
        decode=s.decode.replicas,
        disagg_threshold=s.router.disagg_threshold,
        role_args={role: _pool_args(getattr(s, role), s.model.block_size)
                   for role in ("prefill", "decode")},
        role_ranks={role: getattr(s, role).parallelism.dp for role in ("prefill", "decode")},
        **overrides,
    )
