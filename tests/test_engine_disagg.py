"""Prefill on one engine, decode on another: the hand-off hooks the serving path uses.

The KV bytes are copied block by block between the engines' caches here; in serving, NIXL
READs the same blocks between processes.
"""

from __future__ import annotations

import pytest

from moeserve.common.errors import InvalidRequestError
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine

PROMPT = list(range(20, 47))  # 27 tokens: 6 full blocks of 4 and a partial one


def _engine(path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), block_size=4, num_kv_blocks=64))


def _prefill(p: LLMEngine, rid: str, params: SamplingParams) -> tuple[int, list[int]]:
    p.add_request(rid, PROMPT, params, prefill_only=True)
    outs = [o for _ in range(10) for o in p.step()]
    assert len(outs) == 1 and outs[0].finished
    blocks = p.pinned_blocks(rid)
    assert len(blocks) == 7
    return outs[0].new_token_ids[0], blocks


def _drain(d: LLMEngine, first: list[int]) -> list[int]:
    tokens = list(first)
    while d.has_unfinished_requests():
        tokens += [t for o in d.step() for t in o.new_token_ids]
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_prefill_then_remote_decode_equals_one_engine(tiny_v3, params):
    ref = _engine(tiny_v3).generate([PROMPT], params)[0]
    p, d = _engine(tiny_v3), _engine(tiny_v3)
    first, src = _prefill(p, "r", params)
    res = d.add_remote_kv_request("r", PROMPT, params)
    assert res is not None and res.num_cached_blocks == 0
    d.kv_cache[res.block_ids] = p.kv_cache[src]
    p.release_pinned("r")
    assert p.stats().kv_usage == 0.0
    before = d.stats().prompt_tokens_computed
    out = d.finish_remote_kv("r", first)
    assert _drain(d, out[0].new_token_ids) == ref
    assert d.stats().prompt_tokens_computed == before  # the decode side computed no prompt


def test_failed_transfer_recomputes_to_same_tokens(tiny_v3):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = _engine(tiny_v3).generate([PROMPT], params)[0]
    d = _engine(tiny_v3)
    assert d.add_remote_kv_request("r", PROMPT, params) is not None
    assert d.finish_remote_kv("r", None) == []
    assert _drain(d, []) == ref
    assert d.stats().prompt_tokens_computed == len(PROMPT)


def test_decode_side_prefix_cache_skips_blocks(tiny_v3):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    d = _engine(tiny_v3)
    d.generate([PROMPT[:20] + [3, 3, 3]], params)  # leaves 5 full blocks of PROMPT cached
    res = d.add_remote_kv_request("r", PROMPT, params)
    assert res.num_cached_blocks == 5


def test_abort_releases_reserved_and_pinned_blocks(tiny_v3):
    params = SamplingParams(max_tokens=4, temperature=0)
    p, d = _engine(tiny_v3), _engine(tiny_v3)
    _prefill(p, "r", params)
    p.abort_request("r")
    assert p.pinned_blocks("r") == [] and p.stats().kv_usage == 0.0
    d.add_remote_kv_request("x", PROMPT, params)
    assert d.stats().kv_usage > 0
    (out,) = d.abort_request("x")
    assert out.finish_reason == "abort"
    assert d.stats().kv_usage > 0  # the READ may still write into them: held until it ends
    assert d.finish_remote_kv("x", 5) == []
    assert d.stats().kv_usage == 0.0
    with pytest.raises(InvalidRequestError, match="no KV reservation"):
        d.finish_remote_kv("x", 5)
