"""The MoEDeployment spec types: defaults, field-named errors, purity (no kopf needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeserve.common import spec as s
from moeserve.common.spec import SpecError, parse_manifest, parse_spec

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)

MINIMAL = {"model": {"name": "m", "source": {"preset": "tiny"}},
           "prefill": {"gpusPerPod": 0}, "decode": {"gpusPerPod": 0}}


def errors_of(spec: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    return dict(info.value.problems)


def test_defaults_live_in_the_models() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.image == s.DEFAULT_WORKER_IMAGE
    assert spec.model.block_size == 64 and spec.model.container_path() == "/models/tiny"
    assert spec.router.disagg_threshold == 256 and spec.router.replicas == 1
    assert spec.decode.replicas == 1 and spec.decode.parallelism.ep == 1
    assert spec.decode.autoscaling.enabled is False
    assert s.pods_per_group(spec.decode) == 1


@pytest.mark.parametrize("patch,field", [
    ({"decode": {"gpusPerPod": 0, "parallelism": {"dp": 3, "ep": 2}}},
     "spec.decode.parallelism.ep"),
    ({"decode": {"parallelism": {"ep": 12, "dp": 12}, "gpusPerPod": 8}},
     "spec.decode.parallelism.ep"),
    ({"decode": {"gpusPerPod": 0, "replicas": 0}}, "spec.decode.replicas"),
    ({"decode": {"gpusPerPod": 0, "autoscaling": {"minReplicas": 4, "maxReplicas": 2}}},
     "spec.decode.autoscaling.minReplicas"),
    ({"decode": {"gpusPerPod": 0, "paralelism": {}}}, "spec.decode.paralelism"),
    ({"model": {"name": "m", "source": {}}}, "spec.model.source"),
    ({"model": {"name": "m", "source": {"preset": "tiny"}, "numExperts": 7},
      "decode": {"gpusPerPod": 0, "parallelism": {"dp": 2, "ep": 2}}},
     "spec.decode.parallelism.ep"),
    ({"decode": {"gpusPerPod": 0, "env": [{"name": "A B"}]}}, "spec.decode.env[0].name"),
    ({"router": {"serviceType": "Ingress"}}, "spec.router.serviceType"),
])
def test_errors_name_the_field(patch: dict, field: str) -> None:
    spec = {**MINIMAL, **patch}
    problems = errors_of(spec)
    assert field in problems, problems
    assert str(SpecError(list(problems.items()))).count(field) >= 1


def test_missing_pools_and_wrong_types() -> None:
    problems = errors_of({"model": {"name": "m", "source": {"preset": "tiny"}}})
    assert set(problems) == {"spec.prefill", "spec.decode"}
    problems = errors_of({**MINIMAL, "decode": {"gpusPerPod": "many"}})
    assert "spec.decode.gpusPerPod" in problems
    with pytest.raises(SpecError) as info:
        parse_spec(["not", "a", "mapping"])
    assert info.value.fields == ["spec"]


def test_manifest_identity_checks() -> None:
    doc = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
    dep = parse_manifest(doc)
    assert (dep.name, dep.namespace) == ("tiny", "default")
    with pytest.raises(SpecError) as info:
        parse_manifest({**doc, "kind": "Deployment", "metadata": {"name": "Bad_Name"}})
    assert info.value.fields[:2] == ["kind", "metadata.name"]
    no_ns = {**doc, "metadata": {"name": "x"}}
    assert parse_manifest(no_ns, default_namespace="llm").namespace == "llm"


def test_spec_module_is_pure() -> None:
    """`moeserve up -f` and the Ray path import the spec without kopf or kubernetes."""
    code = ("import sys; import moeserve.common.spec; "
            "bad = {'kopf', 'kubernetes', 'moeserve.operator'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_env_and_label_contract_is_stable() -> None:
    # The engine and router teams read these exact names.
    assert (s.ENV_RANK, s.ENV_WORLD_SIZE, s.ENV_GROUP, s.ENV_RENDEZVOUS, s.ENV_ROLE,
            s.ENV_MODEL) == ("MOESERVE_RANK", "MOESERVE_WORLD_SIZE", "MOESERVE_GROUP",
                             "MOESERVE_RENDEZVOUS", "MOESERVE_ROLE", "MOESERVE_MODEL")
    assert (s.LABEL_DEPLOYMENT, s.LABEL_ROLE, s.LABEL_GROUP) == (
        "moeserve.io/deployment", "moeserve.io/role", "moeserve.io/group")
    assert (s.PORT_WORKER_GRPC, s.PORT_WORKER_METRICS, s.PORT_WORKER_NIXL) == (8100, 8200, 8300)
    # Local rank i of a pod binds gRPC and metrics on base + i: the blocks never overlap.
    per_pod = 16  # the largest gpusPerPod the schema admits
    blocks = [range(p, p + per_pod) for p in (s.PORT_WORKER_GRPC, s.PORT_WORKER_METRICS)]
    others = {s.PORT_WORKER_NIXL, s.PORT_WORKER_RENDEZVOUS}
    assert not set(blocks[0]) & set(blocks[1]) and not others & (set(blocks[0]) | set(blocks[1]))
    assert (s.PORT_ROUTER_HTTP, s.PORT_ROUTER_GRPC, s.PORT_ROUTER_METRICS) == (8000, 8001, 8002)
