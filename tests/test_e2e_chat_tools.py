"""Tools and reasoning through `moeserve up`'s processes (router + prefill + decode, the tiny
random model): the router flags reach the router, the official openai client parses whatever
the random weights say, streamed and not, and /tokenize matches what the model was sent."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from moeserve.deploy.local import ClusterSpec, LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}  # fmt: skip
MESSAGES = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint

    model = ensure_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    spec = ClusterSpec(model=str(model), port=0, num_kv_blocks=96, restart=False,
                       router_args=["--tool-call-parser", "deepseek_v3",
                                    "--enable-auto-tool-choice",
                                    "--reasoning-parser", "deepseek_r1"])  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        yield c


def test_tools_and_reasoning_on_real_workers(cluster: LocalCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER],
                                          max_tokens=12, temperature=0)  # fmt: skip
    usage = resp.usage
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert 0 <= usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    stream = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text = ""
    for chunk in stream:
        for ch in chunk.choices:
            extra = ch.delta.model_extra or {}
            text += (extra.get("reasoning_content") or "") + (ch.delta.content or "")
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == usage.completion_tokens  # greedy: same run
    whole = resp.choices[0].message
    assert text == (whole.model_extra.get("reasoning_content") or "") + (whole.content or "") \
        or whole.tool_calls  # a random model may well emit a call
    tok = httpx.post(f"{cluster.url}/tokenize", json={"messages": MESSAGES, "tools": [WEATHER]},
                     timeout=30).json()
    assert tok["count"] == usage.prompt_tokens  # the template the chat request rendered
    assert httpx.get(f"{cluster.url}/version", timeout=10).json()["version"]


UNIT = {"type": "function", "function": {"name": "set_unit", "strict": True, "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["unit"], "additionalProperties": False}}}  # fmt: skip


def test_required_and_named_tool_choice_always_parse(cluster: LocalCluster) -> None:
    """Random weights, sampled: the constraint alone makes every output a valid call."""
    jsonschema = pytest.importorskip("jsonschema")
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    schema = UNIT["function"]["parameters"]
    named = {"type": "function", "function": {"name": "set_unit"}}
    for i, choice in enumerate([named, "required"] * 3):
        resp = client.chat.completions.create(
            model=model, messages=MESSAGES[:1], tools=[UNIT], tool_choice=choice,
            max_tokens=64, temperature=1.0, seed=i, parallel_tool_calls=False)
        calls = resp.choices[0].message.tool_calls
        assert resp.choices[0].finish_reason == "tool_calls", resp
        assert len(calls) == 1 and calls[0].function.name == "set_unit"
        jsonschema.validate(json.loads(calls[0].function.arguments), schema)
