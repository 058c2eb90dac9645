"""Issue 23 items 1, 2, 5, 6 over the router's HTTP app with a scripted model: the official
openai client parses tool_calls (whole and streamed), reasoning_content and usage; tool results
round-trip through the chat template; bad tools, unknown fields and unknown routes are 400/404
in OpenAI's shape; /tokenize, /detokenize, /version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from moeserve.router.chat import ChatOptions
from moeserve.router.frontend import Frontend
from moeserve.router.http_app import create_app
from moeserve.router.metrics import RouterMetrics
from moeserve.router.settings import RouterSettings
from moeserve.router.tokenizer import ModelTokenizer, load_tokenizer
from moeserve.router.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from moeserve.worker.tokenizer_files import write_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
ARGS = '{"city": "Paris", "note": "a ``` fence"}'
CALLS = (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n" + ARGS + "\n```"
         + CALL_END + "\n" + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n"
         + '{"city": "Lyon"}\n```' + CALL_END + CALLS_END)
USER = [{"role": "user", "content": "Weather in Paris and Lyon?"}]


class ScriptedRouter:
    """Router.generate's interface: streams the ids of ``text``, one token per chunk."""

    def __init__(self, tok: ModelTokenizer) -> None:
        self.settings = RouterSettings()
        self.tok = tok
        self.text = "Hello"
        self.prompts: list[list[int]] = []
        self.params: list = []

    async def generate(self, rid, prompt, params, timeout_s=None):  # noqa: ANN001, ANN201
        self.prompts.append(prompt)
        self.params.append(params)
        ids = self.tok.encode(self.text, add_special_tokens=False)
        for i, t in enumerate(ids):
            last = i == len(ids) - 1
            yield SimpleNamespace(token_ids=[t], num_cached_tokens=0, finished=last,
                                  finish_reason="stop" if last else None)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    path: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, vocab_size=512, bos_id=0, eos_id=1)
    return load_tokenizer(path)


def _app(tok: ModelTokenizer, opts: ChatOptions) -> tuple[ScriptedRouter, TestClient]:
    router = ScriptedRouter(tok)
    frontend = Frontend(router, tok, "m", 4096, 512, RouterMetrics())  # type: ignore[arg-type]
    return router, TestClient(create_app(frontend, lambda: True, chat=opts))


@pytest.fixture(scope="module")
def tools_app(tok: ModelTokenizer) -> Iterator[SimpleNamespace]:
    router, http = _app(tok, ChatOptions("deepseek_v3", True, None))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
    yield SimpleNamespace(router=router, http=http, client=client)


@pytest.fixture(scope="module")
def r1_app(tok: ModelTokenizer) -> Iterator[SimpleNamespace]:
    router, http = _app(tok, ChatOptions("deepseek_v3", True, "deepseek_r1"))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
    yield SimpleNamespace(router=router, http=http, client=client)


def test_tool_calls_parse_with_the_openai_client(tools_app: SimpleNamespace) -> None:
    tools_app.router.text = "Checking." + CALLS
    resp = tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(ARGS)
    assert json.loads(calls[1].function.arguments) == {"city": "Lyon"}
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    one = tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                   parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_tool_calls_stream_as_openai_deltas(tools_app: SimpleNamespace) -> None:
    tools_app.router.text = "Checking." + CALLS
    stream = tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                      stream=True)
    content, calls, reasons = "", {}, []
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            reasons.append(ch.finish_reason)
            for d in ch.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": None, "name": "", "args": ""})
                if d.id:
                    assert entry["id"] is None, "a call opens once"
                    entry["id"], entry["name"] = d.id, d.function.name
                entry["args"] += d.function.arguments or ""
    assert content == "Checking."
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_weather"]
    assert json.loads(calls[0]["args"]) == json.loads(ARGS)
    assert reasons[-1] == "tool_calls" and reasons.count("tool_calls") == 1


def test_tool_results_round_trip_through_the_template(tools_app: SimpleNamespace,
                                                      tok: ModelTokenizer) -> None:
    tools_app.router.text = "It is sunny."
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sun"}]
    resp = tools_app.client.chat.completions.create(model="m", messages=messages,
                                                    tools=[WEATHER])  # fmt: skip
    assert resp.choices[0].message.content == "It is sunny."
    assert resp.choices[0].finish_reason == "stop"
    prompt = tok.decode(tools_app.router.prompts[-1], skip_special_tokens=False)
    assert "### get_weather" in prompt  # the tool definitions reach the model
    assert (CALL_BEGIN + "function" + SEP + 'get_weather\n```json\n{"city": "Paris"}\n```'
            + CALL_END) in prompt
    assert prompt.endswith("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>21 C, sun"
                           "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_reasoning_content_whole_and_streamed(r1_app: SimpleNamespace,
                                              tok: ModelTokenizer) -> None:
    r1_app.router.text = "<think>\nCheck the sky.</think>It is sunny."
    resp = r1_app.client.chat.completions.create(model="m", messages=USER)
    msg = resp.choices[0].message
    assert msg.content == "It is sunny."
    assert msg.model_extra["reasoning_content"] == "\nCheck the sky."
    ids = tok.encode(r1_app.router.text, add_special_tokens=False)
    want = ids.index(tok.token_id("</think>")) + 1
    assert resp.usage.completion_tokens_details.reasoning_tokens == want
    stream = r1_app.client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True})
    reasoning = content = ""
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == ("\nCheck the sky.", "It is sunny.")
    assert usage.completion_tokens_details.reasoning_tokens == want


def test_reasoning_then_a_tool_call(r1_app: SimpleNamespace) -> None:
    r1_app.router.text = "I need the weather.</think>" + CALLS
    resp = r1_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER])
    msg = resp.choices[0].message
    assert msg.model_extra["reasoning_content"] == "I need the weather."
    assert len(msg.tool_calls) == 2 and not msg.content


@pytest.mark.parametrize(("tools", "param", "words"), [
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools.0.function.name", "match"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
     "tools.0.function.parameters", "JSON Schema"),
    ([{"type": "retrieval"}], "tools.0.type", "function"),
    ([{"type": "function", "function": {"name": "f", "extra": 1}}], "tools.0.function.extra",
     "unknown field"),
    ([WEATHER, WEATHER], "tools", "two tools"),
])  # fmt: skip
def test_invalid_tools_are_400s_naming_the_problem(tools_app: SimpleNamespace, tools: list,
                                                   param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        tools_app.client.chat.completions.create(model="m", messages=USER, tools=tools)
    err = info.value.body
    assert err["param"] == param and words in err["message"], err
    assert isinstance(err["code"], str)


def test_tool_choice_checks(tools_app: SimpleNamespace, tok: ModelTokenizer) -> None:
    named = {"type": "function", "function": {"name": "other"}}
    with pytest.raises(openai.BadRequestError) as info:
        tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                 tool_choice=named)  # fmt: skip
    assert info.value.body["param"] == "tool_choice" and "other" in info.value.body["message"]
    # Without --enable-auto-tool-choice, 'auto' (the default with tools) is refused by name.
    _, http = _app(tok, ChatOptions())
    resp = http.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"
    # 'none' keeps the tools out of the prompt and the output as text.
    tools_app.router.text = "No tools." + CALLS
    resp = tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                    tool_choice="none")  # fmt: skip
    assert resp.choices[0].message.content == "No tools." + CALLS
    assert "### get_weather" not in tok.decode(tools_app.router.prompts[-1])


def test_unknown_fields_routes_and_methods_in_openai_shape(tools_app: SimpleNamespace) -> None:
    http = tools_app.http
    resp = http.post("/v1/chat/completions", json={"messages": USER, "frobnicate": 1})
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "frobnicate"
    assert err["code"] == "unknown_parameter" and "frobnicate" in err["message"]
    resp = http.post("/v1/completions", json={"prompt": "x", "user": "u", "store": False,
                                              "metadata": {"k": "v"}})  # fmt: skip
    assert resp.status_code == 200, resp.text  # documented no-ops
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        resp = http.request(method, path)
        err = resp.json()["error"]
        assert resp.status_code == status and set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["code"], str)
    resp = http.post("/v1/chat/completions", json={"messages": USER, "model": "nope"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_tokenize_detokenize_version(tools_app: SimpleNamespace, tok: ModelTokenizer) -> None:
    http = tools_app.http
    text = "Hello, world! héllo"
    resp = http.post("/tokenize", json={"prompt": text}).json()
    assert resp["tokens"] == tok.encode(text) and resp["count"] == len(resp["tokens"])
    assert resp["max_model_len"] == 4096
    back = http.post("/detokenize", json={"tokens": resp["tokens"]}).json()
    assert back == {"prompt": text}
    chat = http.post("/tokenize", json={"messages": USER, "tools": [WEATHER],
                                        "return_token_strs": True}).json()  # fmt: skip
    assert "### get_weather" in tok.decode(chat["tokens"])
    assert len(chat["token_strs"]) == chat["count"]
    bad = http.post("/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert http.get("/version").json()["version"]
    assert http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": "x", "extra": 1}).json()["error"]["param"] \
        == "extra"


def test_request_metrics_carry_the_model_name(tools_app: SimpleNamespace) -> None:
    tools_app.router.text = "Hi"
    assert tools_app.http.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    text = tools_app.http.get("/metrics").text
    assert 'moeserve:request_success_total{finished_reason="stop",model_name="m"}' in text
    assert 'moeserve:generation_tokens_total{model_name="m"}' in text
    assert 'moeserve:e2e_request_latency_seconds_count{model_name="m"}' in text


def test_required_and_named_tool_choice_decode_under_the_call_schema(
        tools_app: SimpleNamespace) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    tools_app.router.text = '{"city": "Paris"}'
    resp = tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                    tool_choice=named)  # fmt: skip
    call = resp.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert resp.choices[0].finish_reason == "tool_calls"
    structured = tools_app.router.params[-1].structured
    assert structured.kind == "json_schema"
    assert json.loads(structured.spec) == WEATHER["function"]["parameters"]
    tools_app.router.text = '[{"name": "get_weather", "parameters": {"city": "Lyon"}}]'
    stream = tools_app.client.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                      tool_choice="required", stream=True)
    calls = [d for chunk in stream for ch in chunk.choices for d in ch.delta.tool_calls or ()]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Lyon"})]
    schema = json.loads(tools_app.router.params[-1].structured.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    bad = tools_app.http.post("/v1/chat/completions", json={
        "messages": USER, "tools": [WEATHER], "tool_choice": named,
        "response_format": {"type": "json_object"}})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_noop_fields_are_logged_once(tools_app: SimpleNamespace, caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from moeserve.router import chat_protocol

    monkeypatch.setattr(chat_protocol, "_logged", set())
    tools_app.router.text = "Hi"
    with caplog.at_level("INFO", logger="moeserve.router.chat_protocol"):
        for _ in range(3):
            body = {"messages": USER, "service_tier": "auto", "store": True}
            assert tools_app.http.post("/v1/chat/completions", json=body).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(lines) == 2 and any("'service_tier'" in m for m in lines), lines


def test_a_tool_schema_the_grammar_engine_cannot_compile_is_a_400(
        tools_app: SimpleNamespace) -> None:
    lookbehind = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        resp = tools_app.http.post("/v1/chat/completions", json={
            "messages": USER, "tools": [WEATHER, lookbehind], "tool_choice": choice})
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "tools.1.function.parameters", err
        assert "look-around" in err["message"]
