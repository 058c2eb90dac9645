"""SamplingParams validation: every bad value raises InvalidRequestError naming the field."""

import math

import pytest

from moeserve.common.errors import InvalidRequestError
from moeserve.common.sampling import SamplingParams

BAD = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -5}),
    ("max_tokens", {"max_tokens": 2.5}),
    ("max_tokens", {"max_tokens": 2**40}),  # past the wire format (the 500 schemathesis found)
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": -0.1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": math.nan}),
    ("top_p", {"top_p": -1.0}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 1.5}),
    ("top_k", {"top_k": 2**31}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": "7"}),
    ("stop_token_ids", {"stop_token_ids": (1, "2")}),
    ("stop_token_ids", {"stop_token_ids": [1.0]}),
    ("stop_token_ids", {"stop_token_ids": [-3]}),
    ("stop_token_ids", {"stop_token_ids": [2**32]}),
    ("stop_token_ids", {"stop_token_ids": 5}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"max_tokens": 4, "min_tokens": 5}),
    ("ignore_eos", {"ignore_eos": "yes"}),
]


@pytest.mark.parametrize(("param", "kwargs"), BAD, ids=[f"{p}={kw}" for p, kw in BAD])
def test_bad_values_name_the_param(param, kwargs):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)
    assert info.value.http_status == 400


def test_defaults_and_edges_are_valid():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, -1, None)
    SamplingParams(temperature=0.0, top_p=1e-9, top_k=0, seed=0, min_tokens=16)
    SamplingParams(seed=2**63 - 1)


def test_stop_token_ids_normalised_to_tuple():
    p = SamplingParams(stop_token_ids=[3, 4])
    assert p.stop_token_ids == (3, 4)
    hash(p)  # frozen and hashable


def test_greedy():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams(top_k=2).greedy


def test_no_torch_import():
    import subprocess
    import sys

    code = "import sys, moeserve.common.sampling; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
