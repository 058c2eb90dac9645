"""OpenAI-compatible request models (validation) and response builders for the router.

Requests are pydantic models: a malformed body or bad parameter becomes an OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` naming the field, returned with status 400.
Sampling bounds are checked once, by ``moeserve.common.sampling.SamplingParams``. Responses are
built as plain dicts: they are written once per token, and the router's overhead budget is tight.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from moeserve.common.errors import InvalidRequestError, MoeServeError
from moeserve.common.sampling import MAX_LOGPROBS, SamplingParams
from moeserve.router.chat_protocol import ChatMessage, ChatTools, log_noop_fields
from moeserve.router.structured_protocol import StructuredFields

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "error_from_exception",
    "error_from_validation",
    "merge_choices",
    "new_request_id",
    "usage_dict",
]

StrictInt = Annotated[int, Field(strict=True)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(StructuredFields, BaseModel):
    """Fields shared by completions and chat completions."""

    # An unknown field is a 400 naming it: ignoring it could silently change what the client
    # asked for. Fields that change nothing here are declared and logged (chat_protocol.py).
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: StrictInt = 0
    # Choices sharing the prompt (router/choices.py); OpenAI's bound.
    n: StrictInt = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    # Seconds the whole request may take (capped by the router's --request-timeout-s).
    timeout: float | None = Field(default=None, gt=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    user: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _log_noops(self) -> _GenerationRequest:
        log_noop_fields(self.model_fields_set)
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Validated sampling parameters; raises InvalidRequestError naming the field."""
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=(1.0 if self.repetition_penalty is None
                                else self.repetition_penalty),
            logit_bias=dict(self.logit_bias or {}),
            min_p=0.0 if self.min_p is None else self.min_p,
            logprobs=self.top_logprobs_k,
            structured=self.structured_output(),
        )

    @property
    def top_logprobs_k(self) -> int | None:
        """How many alternatives each token's logprobs carry; None: no logprobs."""
        return None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. ``prompt`` is a string or a list of token ids (one prompt only)."""

    prompt: str | list[int]
    echo: bool = False
    # The legacy shape: logprobs=k returns the chosen token's and the top k's.
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        # Checked by hand: a union's first-member error ("should be a valid string") would
        # hide the real problem with a token list.
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            # The client's batch form; accepted with exactly one element.
            if len(v) != 1:
                raise ValueError(f"batched prompts are not supported ({len(v)} given; send 1)")
            v = v[0]
        if not isinstance(v, str | list):
            raise ValueError("must be a string or a list of token ids")
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list):
            for i, t in enumerate(v):
                if type(t) is not int or t < 0:
                    raise ValueError(f"token ids must be non-negative integers, got {t!r} at {i}")
        return v

    @property
    def top_logprobs_k(self) -> int | None:
        return self.logprobs

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v not in (None, False):
            raise ValueError("not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _single_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"only best_of=1 is supported, got {v}")
        return v


class ChatCompletionRequest(ChatTools, _GenerationRequest):
    """POST /v1/chat/completions; tools, tool_choice and messages in chat_protocol.py."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: Any) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return v

    @property
    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return self.model_copy(
                update={"max_tokens": self.max_completion_tokens}
            ).sampling_params(default_max_tokens)
        return super().sampling_params(default_max_tokens)


# --------------------------------------------------------------------------- errors


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object; ``code`` is a string (``unknown_parameter``, ...) or null."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
# pydantic's error types, in OpenAI's codes.
_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}


def error_from_validation(exc: ValidationError) -> dict[str, Any]:
    """400 body naming the first invalid field (``messages.0.content``-style path)."""
    err = exc.errors(include_url=False)[0]
    # Union members add their type name to the location; it means nothing to a client.
    loc = [str(p) for p in err["loc"]
           if str(p) not in _UNION_TAGS and "[" not in str(p) and str(p) != "NamedToolChoice"]
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; this server does not support it"
    message = f"{param}: {msg}" if param else msg
    return error_body(message, param=param, code=_CODES.get(err["type"], "invalid_value"))


def error_from_exception(exc: Exception) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for any error reaching the HTTP layer; unknown ones are 500s."""
    if isinstance(exc, ValidationError):
        return 400, error_from_validation(exc)
    if isinstance(exc, MoeServeError):
        param = exc.param if isinstance(exc, InvalidRequestError) else None
        code = "invalid_value" if isinstance(exc, InvalidRequestError) else exc.error_type
        return exc.http_status, error_body(str(exc), exc.error_type, param, code)
    return 500, error_body(f"internal error: {type(exc).__name__}", "internal_error", None,
                           "internal_error")


# --------------------------------------------------------------------------- responses


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
               reasoning_tokens: int | None = None) -> dict:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:  # with --reasoning-parser
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _choice(field: str, content: object, finish_reason: str | None,
            token_ids: list[int] | None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One choice of a response or chunk, its content under ``field`` (text, message or
    delta); ``token_ids`` only when asked for; ``logprobs`` as router/logprobs_format.py
    renders them."""
    choice = {"index": index, field: content, "logprobs": logprobs,
              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def completion_response(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict,
    token_ids: list[int] | None = None,
    *,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    choice = _choice("text", text, finish_reason, token_ids, index, logprobs)
    return _envelope(request_id, "text_completion", model, [choice], usage)


def completion_chunk(
    request_id: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    usage: dict | None = None,
    *,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    """One SSE chunk; ``text`` None gives the usage-only final chunk (empty choices)."""
    choices = [] if text is None else [
        _choice("text", text, finish_reason, token_ids, index, logprobs)]
    return _envelope(request_id, "text_completion", model, choices, usage)


def chat_response(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict,
    token_ids: list[int] | None = None,
    *,
    index: int = 0,
    logprobs: dict | None = None,
    message: dict | None = None,
) -> dict:
    """``message``: the assistant message when parsers shaped it (else ``text`` as content)."""
    message = message or {"role": "assistant", "content": text}
    choice = _choice("message", message, finish_reason, token_ids, index, logprobs)
    return _envelope(request_id, "chat.completion", model, [choice], usage)


def chat_chunk(
    request_id: str,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    usage: dict | None = None,
    *,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    """One SSE chunk; ``delta`` None gives the usage-only final chunk (empty choices)."""
    choices = [] if delta is None else [
        _choice("delta", delta, finish_reason, token_ids, index, logprobs)]
    return _envelope(request_id, "chat.completion.chunk", model, choices, usage)


def merge_choices(bodies: list[dict]) -> dict:
    """One response with the choices of ``bodies`` (one per index, n > 1), in index order."""
    merged = dict(bodies[0])
    merged["choices"] = sorted((c for b in bodies for c in b["choices"]),
                               key=lambda c: c["index"])
    return merged


def _envelope(request_id: str, obj: str, model: str, choices: list[dict],
              usage: dict | None) -> dict:
    """The fields every OpenAI completion object and chunk carries; usage only when given."""
    body = {"id": request_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
