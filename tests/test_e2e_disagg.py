"""End to end on CPU: `moeserve up` (router + prefill + decode processes, NIXL over UCX) driven
through the real `openai` client. Compares against the engine run offline (`moeserve generate`).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import httpx
import openai
import pytest

from moeserve.deploy.local import ClusterSpec, LocalCluster
from tests.reliability_helpers import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KV_BLOCKS = 96


@pytest.fixture(scope="module")
def cluster(model_dir: Path):
    spec = ClusterSpec(model=str(model_dir), port=0, num_kv_blocks=KV_BLOCKS, metrics=True)
    with LocalCluster(spec, log=None) as c:
        yield c


def _client(c: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def _prompt(seed: int, n: int = 100) -> list[int]:
    return [(seed * 7919 + i * 104729) % 500 + 2 for i in range(n)]


def test_greedy_matches_generate_stream_and_not(cluster, reference) -> None:
    client = _client(cluster)
    prompt = _prompt(1)
    want = reference([prompt], 12)[0]
    extra = {"return_token_ids": True, "ignore_eos": True}
    resp = client.completions.create(
        model="tiny-deepseek-v3", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
    )
    assert _ids(resp.choices[0]) == want
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 12
    stream = client.completions.create(
        model="tiny-deepseek-v3", prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    )  # fmt: skip
    got, usage = [], None
    for chunk in stream:
        for choice in chunk.choices:
            got += _ids(choice)
        usage = chunk.usage or usage
    assert got == want and usage.completion_tokens == 12
    text = client.completions.create(model="tiny-deepseek-v3", prompt="Hello, MoE world",
                                     max_tokens=4, temperature=0)  # fmt: skip
    assert text.choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(
        model="tiny-deepseek-v3", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0,
    )  # fmt: skip
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 3


def test_16_concurrent_streams(cluster, reference) -> None:
    prompts = [_prompt(100 + i, 40 + i) for i in range(16)]
    want = reference(prompts, 8)
    client = _client(cluster)

    def one(p: list[int]) -> list[int]:
        out = []
        for chunk in client.completions.create(
            model="tiny-deepseek-v3", prompt=p, max_tokens=8, temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        ):  # fmt: skip
            for choice in chunk.choices:
                out += _ids(choice)
        return out

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == want


def test_kv_really_crossed_nixl(cluster) -> None:
    decode = cluster.worker("decode-0").metrics
    before_bytes = metric(f"{cluster.url}/metrics", "moeserve:kv_transfer_bytes_total")
    before_computed = metric(decode, "moeserve:prompt_tokens_computed")
    resp = _client(cluster).completions.create(
        model="tiny-deepseek-v3", prompt=_prompt(7, 200), max_tokens=2, temperature=0
    )
    assert resp.usage.completion_tokens == 2
    time.sleep(0.2)  # gauges refresh on the worker's housekeeping tick
    assert metric(f"{cluster.url}/metrics", "moeserve:kv_transfer_bytes_total") > before_bytes
    assert metric(decode, "moeserve:kv_transfer_bytes_total") > 0
    # The decode worker ran no prompt token through the model for it: the KV came over NIXL.
    assert metric(decode, "moeserve:prompt_tokens_computed") == before_computed


def _settled(c: LocalCluster, timeout_s: float = 10) -> tuple[float, float]:
    decode, prefill = c.worker("decode-0").metrics, c.worker("prefill-0").metrics
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = metric(decode, "moeserve:num_requests_running")
        leases = metric(prefill, "moeserve:kv_pinned_leases")
        if running == 0 and leases == 0:
            break
        time.sleep(0.1)
    return running, leases


def test_client_disconnect_aborts_everywhere(cluster) -> None:
    decode = cluster.worker("decode-0").metrics
    _settled(cluster)
    usage_before = metric(decode, "moeserve:kv_cache_usage_perc")
    body = {"prompt": _prompt(9, 150), "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        time.sleep(0.3)
        assert metric(decode, "moeserve:num_requests_running") == 1
    assert _settled(cluster) == (0, 0)
    assert metric(decode, "moeserve:kv_cache_usage_perc") <= usage_before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": [1, 2], "logit_bias": {"99999": 5}}, "logit_bias"),
        ({"prompt": [1, 2], "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": [1, 2], "max_tokens": 10**6}, "max_tokens"),
        ({"prompt": [1, 2], "temperature": -1}, "temperature"),
        ({"prompt": [1, 2], "top_p": 2}, "top_p"),
        ({"messages": [{"role": "user"}], "max_tokens": "x"}, "max_tokens"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(cluster, body: dict, param: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    resp = httpx.post(f"{cluster.url}{path}", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param in err["message"]


def test_malformed_json_is_400(cluster) -> None:
    resp = httpx.post(f"{cluster.url}/v1/completions", content=b"{not json", timeout=10)
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]


def _prompt_computed(c: LocalCluster) -> float:
    return sum(metric(c.worker(name).metrics, "moeserve:prompt_tokens_computed")
               for name in ("prefill-0", "decode-0"))


def test_pd_logprobs_include_the_prefill_workers_first_token(cluster, model_dir) -> None:
    """The first token is sampled on the prefill worker: its logprobs travel in
    PrefillResponse and through the decode worker; all equal the engine's run alone."""
    from moeserve.common.sampling import SamplingParams
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    prompt = _prompt(11, 120)
    client = _client(cluster)
    before = metric(f"{cluster.url}/metrics", "moeserve:kv_transfer_bytes_total")
    resp = client.completions.create(model="tiny-deepseek-v3", prompt=prompt, max_tokens=5,
                                     temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    assert metric(f"{cluster.url}/metrics", "moeserve:kv_transfer_bytes_total") > before
    lp = resp.choices[0].logprobs
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=96))
    engine.add_request("r", prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=3,
                                                   ignore_eos=True))
    want = []
    while engine.has_unfinished_requests():
        want += [lp for o in engine.step() for lp in o.new_logprobs]
    assert lp.token_logprobs == pytest.approx([w.logprob for w in want], abs=1e-4)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy: chosen is top
    chat = client.chat.completions.create(
        model="tiny-deepseek-v3", messages=[{"role": "user", "content": "hi " * 40}],
        max_tokens=3, temperature=0, logprobs=True, top_logprobs=2, stream=True,
    )  # fmt: skip
    content = [t for chunk in chat for c in chunk.choices if c.logprobs
               for t in c.logprobs.content]
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_n4_computes_the_prompt_once(cluster) -> None:
    """n=4 shares the prompt's KV: the other choices start once the first has its first token,
    and find the prompt in the prefix cache. (Four separate requests share it too when they
    happen to arrive a step apart, as on this CPU; in the same step each would prefill it.)"""
    client = _client(cluster)
    extra = {"ignore_eos": True, "return_token_ids": True}
    before = _prompt_computed(cluster)
    start = time.perf_counter()
    resp = client.completions.create(model="tiny-deepseek-v3", prompt=_prompt(21, 160), n=4,
                                     max_tokens=8, temperature=1.0, seed=5, extra_body=extra)
    n4_s = time.perf_counter() - start
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert resp.usage.completion_tokens == 32 and resp.usage.prompt_tokens == 160
    time.sleep(0.3)  # gauges refresh on the worker's housekeeping tick
    shared = _prompt_computed(cluster) - before

    def one(i: int) -> None:
        client.completions.create(model="tiny-deepseek-v3", prompt=_prompt(22, 160),
                                  max_tokens=8, temperature=1.0, seed=5 + i, extra_body=extra)

    before = _prompt_computed(cluster)
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    separate_s = time.perf_counter() - start
    time.sleep(0.3)
    separate = _prompt_computed(cluster) - before
    print(f"n=4: {shared:.0f} prompt tokens computed, {n4_s:.2f} s; 4 separate requests: "
          f"{separate:.0f}, {separate_s:.2f} s")
    assert shared < 2 * 160  # not 4 * 160: the prompt is computed about once


def test_killing_prefill_still_serves(cluster, reference) -> None:
    """Last in the module: it kills the cluster's prefill worker."""
    prefill = cluster.worker("prefill-0")
    prefill.proc.kill()
    prefill.proc.wait(10)
    prompt = _prompt(11, 90)
    want = reference([prompt], 6)[0]
    for _ in range(3):
        resp = _client(cluster).completions.create(
            model="tiny-deepseek-v3", prompt=prompt, max_tokens=6, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        assert _ids(resp.choices[0]) == want
    assert metric(f"{cluster.url}/metrics", "moeserve:router_disaggregated_requests_total",
                   'mode="local"') >= 1  # fmt: skip
