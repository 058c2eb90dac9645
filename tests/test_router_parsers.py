"""Tool-call and reasoning parsers on text split at every awkward place: inside the markers,
inside the closing fence, one character at a time; both give what the whole text gives."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from moeserve.router.chat import ChatOptions, ChatOutput, tool_call_schema
from moeserve.router.chat_protocol import ChatTools
from moeserve.router.reasoning_parser import ReasoningStream, parse_reasoning
from moeserve.router.tool_parser import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCallStream,
    parse_tool_calls,
)


def _call(name: str, args: str) -> str:
    return CALL_BEGIN + "function" + SEP + name + "\n```json\n" + args + "\n```" + CALL_END


ARGS = '{"q": "a ``` fence, a \\n newline and <｜tool▁call-like text: <｜"}'
TEXT = "Let me look. " + CALLS_BEGIN + _call("search", ARGS) + "\n" + _call("f", "{}") + CALLS_END


def _splits(text: str) -> list[list[str]]:
    """Every two-piece split, one character at a time, and random many-piece splits."""
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    out.append(list(text))
    for seed in range(50):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(rng.randint(2, 40), len(text) - 1)))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def _run_tools(pieces: list[str]) -> tuple[str, dict[int, dict[str, str]]]:
    stream, content, calls = ToolCallStream(), "", {}
    for piece in [*pieces, None]:
        c, deltas = stream.push(piece) if piece is not None else stream.finish()
        content += c
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls, "each call opens once"
                calls[d["index"]] = {"name": d["function"]["name"], "args": ""}
            calls[d["index"]]["args"] += d["function"]["arguments"]
    return content, calls


def test_tool_calls_parse_the_same_however_the_text_is_split() -> None:
    content, calls = parse_tool_calls(TEXT)
    assert content == "Let me look. "
    assert [(c.name, c.arguments) for c in calls] == [("search", ARGS), ("f", "{}")]
    assert json.loads(calls[0].arguments)["q"].startswith("a ``` fence")
    for pieces in _splits(TEXT):
        got = _run_tools(pieces)
        assert got == ("Let me look. ", {0: {"name": "search", "args": ARGS},
                                         1: {"name": "f", "args": "{}"}}), pieces


@pytest.mark.parametrize(("text", "content", "n"), [
    ("plain text, no calls", "plain text, no calls", 0),
    ("almost <｜tool▁calls▁beg", "almost <｜tool▁calls▁beg", 0),  # a marker that never completes
    (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f\n```json\n{\"a\": 1", "", 1),  # cut short
    (CALLS_BEGIN + "not a call", "not a call", 0),
])  # fmt: skip
def test_tool_parser_edges(text: str, content: str, n: int) -> None:
    got_content, calls = parse_tool_calls(text)
    assert (got_content, len(calls)) == (content, n)
    if n:
        assert calls[0].arguments == '{"a": 1'  # what arrived, for the client to see


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    _, calls = parse_tool_calls(TEXT, max_calls=1)
    assert [c.name for c in calls] == ["search"]


@pytest.mark.parametrize(("text", "want"), [
    ("<think>\nweigh it</think>\n\nAnswer.", ("\nweigh it", "\n\nAnswer.")),
    ("weigh it</think>Answer.", ("weigh it", "Answer.")),  # <think> was in the prompt
    ("still thinking when max_tokens hit", ("still thinking when max_tokens hit", "")),
    ("a </thin without end", ("a </thin without end", "")),
])  # fmt: skip
def test_reasoning_splits_the_same_however_the_text_is_split(text: str,
                                                             want: tuple[str, str]) -> None:
    assert parse_reasoning(text) == want
    for pieces in _splits(text):
        stream, r, c = ReasoningStream(), "", ""
        for piece in pieces:
            dr, dc = stream.push(piece)
            r, c = r + dr, c + dc
        dr, dc = stream.finish()
        assert (r + dr, c + dc) == want, pieces


def test_reasoning_tokens_count_up_to_the_end_token() -> None:
    stream = ReasoningStream(end_token_id=9)
    for ids in ([1, 2], [3, 9, 4], [5]):
        stream.count(ids)
    assert stream.reasoning_tokens == 4  # 1, 2, 3 and </think> itself


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def _req(**kw: object) -> ChatTools:
    return ChatTools.model_validate({"tools": [WEATHER, CLOCK], **kw})


def test_required_and_named_schemas_accept_only_calls_of_the_tools() -> None:
    req = _req(tool_choice="required")
    schema = tool_call_schema(req.tools, "required")
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}},
                         {"name": "clock", "parameters": {}}], schema)  # fmt: skip
    for bad in ([], [{"name": "nope", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = tool_call_schema(req.tools, "required", parallel=False)
    assert one["maxItems"] == 1
    named = _req(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tool_call_schema(named.tools, named.effective_tool_choice) == \
        WEATHER["function"]["parameters"]
    assert tool_call_schema(req.tools, "auto") is None


class _Req(ChatTools):
    n: int = 1


def test_constrained_outputs_render_as_tool_calls() -> None:
    named = _Req.model_validate({"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    out = ChatOutput(named, ChatOptions())
    first = out.delta('{"city"', [1], False)
    assert first["tool_calls"][0]["function"]["name"] == "get_weather"
    out.delta(': "Paris"}', [2], True)
    assert out.calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    assert out.finish_reason("stop") == "tool_calls"
    required = _Req.model_validate({"tools": [WEATHER, CLOCK], "tool_choice": "required"})
    msg = ChatOutput(required, ChatOptions()).message(
        '[{"name": "clock", "parameters": {}}]', [1])
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["clock"]


def test_auto_tool_choice_needs_a_parser() -> None:
    import argparse

    from moeserve.common.errors import ConfigError
    from moeserve.router.chat import chat_options

    with pytest.raises(ConfigError, match="--tool-call-parser"):
        chat_options(argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser=None))
    opts = chat_options(argparse.Namespace(enable_auto_tool_choice=True,
                                           tool_call_parser="deepseek_v3",
                                           reasoning_parser="deepseek_r1"))  # fmt: skip
    assert opts == ChatOptions("deepseek_v3", True, "deepseek_r1")
