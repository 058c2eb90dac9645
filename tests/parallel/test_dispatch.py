"""Single-process pieces of expert parallelism: backend selection errors, the combine order,
config validation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moeserve.worker.config import EngineConfig
from moeserve.worker.parallel.dbo import split_point
from moeserve.worker.parallel.dispatch import BackendUnavailable, make_dispatcher
from moeserve.worker.parallel.expert_parallel import weighted_combine


@pytest.mark.parametrize("name,package", [("deepep", "deep_ep"), ("nixl_ep", "nixl_ep")])
def test_optional_backend_refuses_by_name(name, package):
    """Absent: the error names the package. Present (nixl ships nixl_ep): the CPU is refused."""
    installed = importlib.util.find_spec(package) is not None
    with pytest.raises(BackendUnavailable, match="CUDA" if installed else package):
        make_dispatcher(name, ctx=None, device=torch.device("cpu"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="a2a_backend"):
        make_dispatcher("mpi", ctx=None, device=torch.device("cpu"))


def test_weighted_combine_matches_single_rank_experts(tiny_v3):
    from moeserve.common.model_config import load_model_config
    from moeserve.worker.model.moe import Experts

    cfg = load_model_config(str(tiny_v3))
    torch.manual_seed(0)
    experts = Experts(cfg)
    experts.w13.data.normal_(std=0.1)
    experts.w2.data.normal_(std=0.1)
    x = torch.randn(7, cfg.hidden_size)
    ids = torch.randint(0, cfg.n_routed_experts, (7, cfg.num_experts_per_tok))
    weights = torch.rand(7, cfg.num_experts_per_tok)
    single = experts(x, weights, ids)
    # what EP ranks return: each copy's unweighted expert output, in (token, choice) order
    copies = torch.stack([
        experts(x[t : t + 1], torch.ones(1, 1), ids[t : t + 1, j : j + 1])[0]
        for t in range(7) for j in range(ids.shape[1])
    ])
    # one-row GEMMs round differently from batched ones; the order and weighting must match
    torch.testing.assert_close(weighted_combine(copies, weights, ids), single,
                               rtol=1e-4, atol=1e-5)


def test_split_point_balances_tokens():
    assert split_point([10, 1, 1, 10]) == 2
    assert split_point([1]) in (0, 1)
    assert split_point([]) == 0


def test_dp_must_equal_ep(tmp_path):
    with pytest.raises(ValueError, match="dp must equal ep"):
        EngineConfig(model=str(tmp_path), dp=2, ep=4)


def test_rank_environment_and_operator_switches():
    from moeserve.common import spec
    from moeserve.worker.env_defaults import env_defaults
    from moeserve.worker.parallel.group import ENV_LOCAL_RANK, RankInfo
    from moeserve.worker.parallel.launch import rank_environments

    envs = rank_environments(4, {spec.ENV_RANK: "1", spec.ENV_RANKS_PER_POD: "2",
                                 spec.ENV_RENDEZVOUS: "w-0.w:8103"})
    assert [e[ENV_LOCAL_RANK] for e in envs] == ["0", "1"]
    info = RankInfo.from_env(4, envs[1])
    assert (info.rank, info.num_nodes, info.rendezvous) == (3, 2, "w-0.w:8103")
    # The pool's switches reach a rank process through the one env parser (flag defaults).
    got = env_defaults({spec.ENV_EPLB_ENABLED: "1", spec.ENV_EPLB_REDUNDANT_EXPERTS: "32",
                        spec.ENV_DBO_ENABLED: "off"})
    switches = (got["enable_eplb"], got["eplb_redundant_experts"], got["enable_dbo"])
    assert switches == (True, 32, False)
