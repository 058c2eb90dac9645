"""Chat output: reasoning and tool calls parsed out of the generated text, as OpenAI shapes them.

Selected like vLLM: ``--reasoning-parser deepseek_r1`` splits ``reasoning_content`` off,
``--tool-call-parser deepseek_v3`` with ``--enable-auto-tool-choice`` turns DeepSeek's
tool-call tokens into ``tool_calls`` (tool_choice ``auto``). ``tool_choice`` ``required`` or a
named function are decoded under a JSON Schema (``tool_call_schema``): the output is the named
function's arguments, or a list of ``{name, parameters}``, so it always parses. ``none`` leaves
the tools out of the prompt and the output as text. One ``ChatOutput`` per request renders
both the streamed deltas and the whole message, through the same parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeserve.common.errors import ConfigError, InvalidRequestError
from moeserve.common.sampling import SamplingParams
from moeserve.common.structured import structured_from_json_schema
from moeserve.router.chat_protocol import ChatTools, NamedToolChoice, ToolDef
from moeserve.router.reasoning_parser import END_THINK, REASONING_PARSERS, ReasoningStream
from moeserve.router.tool_parser import TOOL_PARSERS, ToolCallStream

__all__ = ["ChatOptions", "ChatOutput", "add_chat_arguments", "chat_options", "chat_outputs",
           "constrain", "end_think_id", "prepare_tokenizer", "reasoning_total", "template_inputs",
           "tool_call_schema"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatOptions:
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default=None,
                   help="parse the model's tool calls into tool_calls (DeepSeek-V3/R1 tokens)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide to call tools (tool_choice auto, the default "
                        "with tools); needs --tool-call-parser")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="return R1-style <think>...</think> text as reasoning_content")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file used instead of the checkpoint's (e.g. one "
                        "that renders tools: DeepSeek-V3's released template does not)")


def prepare_tokenizer(tokenizer: Any, args: argparse.Namespace, opts: ChatOptions) -> None:
    """Apply --chat-template; warn when tool calls are on but the template never renders the
    tools (the model would be asked to call functions it was not shown)."""
    path = getattr(args, "chat_template", None)
    if path:
        try:
            source = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--chat-template {path}: {e.strerror}") from None
        tokenizer.set_chat_template(source, path)
    if opts.tool_call_parser and tokenizer.chat_template \
            and "tools" not in tokenizer.chat_template:  # fmt: skip
        logger.warning("--tool-call-parser is on but the chat template never reads `tools`: "
                       "requests' tool definitions will not reach the model; pass "
                       "--chat-template with a template that renders them")


def chat_options(args: argparse.Namespace) -> ChatOptions:
    opts = ChatOptions(getattr(args, "tool_call_parser", None),
                       bool(getattr(args, "enable_auto_tool_choice", False)),
                       getattr(args, "reasoning_parser", None))  # fmt: skip
    if opts.enable_auto_tool_choice and opts.tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (deepseek_v3)")
    return opts


def tool_call_schema(tools: list[ToolDef], choice: str | NamedToolChoice,
                     parallel: bool | None = None) -> dict[str, Any] | None:
    """The JSON Schema the output must follow for ``required`` or a named tool (else None)."""
    def params(t: ToolDef) -> dict[str, Any]:
        return t.function.parameters or {"type": "object"}

    if isinstance(choice, NamedToolChoice):
        return params(next(t for t in tools if t.function.name == choice.function.name))
    if choice != "required":
        return None
    one = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
            "properties": {"name": {"const": t.function.name}, "parameters": params(t)}}
           for t in tools]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def template_inputs(req: Any, opts: ChatOptions, check_choice: bool = True
                    ) -> tuple[list[dict], list[dict] | None, dict]:  # fmt: skip
    """(messages, tools, extra template variables) for the chat template; a tool_choice this
    router cannot honour is a 400 naming it (``check_choice``: /tokenize only renders)."""
    choice = req.effective_tool_choice
    if check_choice and req.tools and choice == "auto" and not (opts.enable_auto_tool_choice
                                               and opts.tool_call_parser):  # fmt: skip
        raise InvalidRequestError(
            "tool_choice 'auto' (the default with tools) needs the router started with "
            "--enable-auto-tool-choice --tool-call-parser deepseek_v3", param="tool_choice")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = None if choice == "none" or not req.tools else [t.model_dump(exclude_none=True)
                                                              for t in req.tools]  # fmt: skip
    return messages, tools, dict(req.chat_template_kwargs or {})


class ChatOutput:
    """One request's output: ``delta`` per streamed piece, ``message`` for the whole."""

    def __init__(self, req: Any, opts: ChatOptions, end_think_id: int | None = None) -> None:
        choice = req.effective_tool_choice
        self._named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        self._required = choice == "required"
        constrained = self._named is not None or self._required
        self._tools = (ToolCallStream(1 if req.parallel_tool_calls is False else None)
                       if choice == "auto" and req.tools and opts.tool_call_parser else None)
        # Constrained output is JSON from its first token: there is no reasoning to split.
        self._reasoning = (ReasoningStream(end_think_id)
                           if opts.reasoning_parser and not constrained else None)
        self._plain = self._tools is None and self._reasoning is None and not constrained
        self._json = ""  # constrained output so far
        self._call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.calls: list[dict[str, Any]] = []

    @property
    def reasoning_tokens(self) -> int | None:
        return self._reasoning.reasoning_tokens if self._reasoning is not None else None

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict[str, Any]:
        """The delta of one streamed chunk (possibly empty: everything held back)."""
        if self._plain:
            return {"content": text}
        out: dict[str, Any] = {}
        if self._named is not None or self._required:
            return self._constrained(text, finished)
        content = text
        if self._reasoning is not None:
            self._reasoning.count(token_ids)
            reasoning, content = self._reasoning.push(text)
            if finished:
                r, c = self._reasoning.finish()
                reasoning, content = reasoning + r, content + c
            if reasoning:
                out["reasoning_content"] = reasoning
        calls: list[dict[str, Any]] = []
        if self._tools is not None:
            content, calls = self._tools.push(content)
            if finished:
                c, more = self._tools.finish()
                content, calls = content + c, calls + more
            self.calls = self._tools.message_calls()
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out

    def _constrained(self, text: str, finished: bool) -> dict[str, Any]:
        """Named: the text is the arguments, streamed as they come. Required: a JSON list of
        calls, sent whole at the end (a partial list is not worth parsing)."""
        self._json += text
        if self._named is not None:
            first = not self.calls
            if first:
                self.calls = [{"id": self._call_id, "type": "function",
                               "function": {"name": self._named, "arguments": ""}}]
            self.calls[0]["function"]["arguments"] = self._json
            delta = {"index": 0, "function": {"arguments": text}}
            if first:
                delta.update(id=self._call_id, type="function")
                delta["function"]["name"] = self._named
            return {"tool_calls": [delta]} if text or first else {}
        if not finished:
            return {}
        try:
            self.calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                           "function": {"name": it["name"],
                                        "arguments": json.dumps(it["parameters"])}}
                          for it in json.loads(self._json)]  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return {"content": self._json}  # cut short (length): the text as it is
        return {"tool_calls": [{"index": i, **c} for i, c in enumerate(self.calls)]}

    def message(self, text: str, token_ids: list[int]) -> dict[str, Any]:
        """The whole assistant message of a non-streamed response."""
        d = self.delta(text, token_ids, finished=True)
        msg: dict[str, Any] = {"role": "assistant", "content": d.get("content")}
        if self._plain:
            return msg
        if self._reasoning is not None:
            msg["reasoning_content"] = d.get("reasoning_content")
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg


def constrain(params: SamplingParams, schema: dict[str, Any] | None, strict: bool = False
              ) -> SamplingParams:  # fmt: skip
    """``params`` decoding under ``schema`` (None: unconstrained), through the structured
    outputs engine (common/structured.py): a schema it cannot compile is a 400 naming
    tool_choice. ``strict``: a keyword the engine does not implement is an error, not ignored
    (the functions' own ``strict``)."""
    if schema is None:
        return params
    if params.structured is not None:
        raise InvalidRequestError("tool_choice 'required' or a named function constrains the "
                                  "output already; drop response_format / structured_outputs",
                                  param="tool_choice")  # fmt: skip
    s = structured_from_json_schema(schema, strict=strict, param="tool_choice")
    try:
        return dataclasses.replace(params, structured=s)
    except InvalidRequestError as e:  # ignore_eos / min_tokens would outlast the grammar
        raise InvalidRequestError(f"with tool_choice 'required' or a named function: {e}",
                                  param=e.param) from None


def chat_outputs(req: Any, params: Any, opts: ChatOptions, tokenizer: Any
                 ) -> tuple[Any, list[ChatOutput]]:  # fmt: skip
    """(sampling params, one ChatOutput per choice) of a chat request; ([] for completions).
    ``required`` and named tool_choice put the output under the tool-call schema."""
    if not isinstance(req, ChatTools):
        return params, []
    end_id = end_think_id(tokenizer)
    outs = [ChatOutput(req, opts, end_id) for _ in range(req.n)]
    if req.tools:
        choice = req.effective_tool_choice
        schema = tool_call_schema(req.tools, choice, req.parallel_tool_calls)
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        used = [(i, t) for i, t in enumerate(req.tools) if named in (None, t.function.name)]
        strict = all(t.function.strict for _, t in used)
        if schema is not None:  # one tool at a time first: the 400 names the one that fails
            for i, t in used:
                structured_from_json_schema(t.function.parameters or {"type": "object"},
                                            strict=strict, param=f"tools.{i}.function.parameters")
        params = constrain(params, schema, strict)
    return params, outs


def reasoning_total(outs: list[ChatOutput]) -> int | None:
    """usage's reasoning_tokens over the choices (None: no reasoning parser)."""
    counts = [o.reasoning_tokens for o in outs]
    return None if not counts or counts[0] is None else sum(counts)  # type: ignore[arg-type]


def end_think_id(tokenizer: Any) -> int | None:
    """``</think>``'s id when it is one token of the vocabulary (reasoning tokens by id)."""
    return tokenizer.token_id(END_THINK) if tokenizer.available else None
