"""Structured outputs: what a request's output must match, and its grammar for llguidance.

A ``StructuredOutput`` travels from the router to the workers inside ``SamplingParams``; the
router checks it here before dispatch (llguidance needs no tokenizer and no torch for that),
and the workers compile it against their tokenizer (``moeserve.worker.grammar``). Why
llguidance and not xgrammar: docs/structured-outputs.md.

No torch here: the router imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from moeserve.common.errors import InvalidRequestError

__all__ = ["KINDS", "StructuredOutput", "check_structured", "grammar_text", "is_engine_error",
           "structured_from_json_schema", "with_replay"]

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
# Longest constraint text accepted; a schema is a request body field, already bounded by the
# router's body limit, but the workers cache compiled grammars by this text.
MAX_SPEC_CHARS = 1 << 20
# JSON is written as json.dumps writes it ({"a": 1, "b": [2, 3]}): one fixed layout, so an
# output can always end (free whitespace lets a weak model emit blanks until max_tokens).
_JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """The output must match ``spec``, read as ``kind``.

    kind: "json_schema" (spec: the schema as JSON text), "json_object" (any JSON object; spec
    unused), "regex", "choice" (spec: a JSON list of strings), "grammar" (Lark or GBNF).
    strict: a json_schema keyword the engine does not implement is an error (True) or ignored.
    replay: the last ``replay`` prompt tokens were already generated under this constraint
    (a migrated request resumes with them in its prompt); the matcher consumes them first.
    """

    kind: Kind
    spec: str = ""
    strict: bool = True
    replay: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {KINDS}, got "
                                      f"{self.kind!r}", param="structured_outputs")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                f"structured output {self.kind} must be text of at most {MAX_SPEC_CHARS} "
                "characters", param="structured_outputs")
        if not isinstance(self.replay, int) or self.replay < 0:
            raise InvalidRequestError(f"replay must be >= 0, got {self.replay!r}",
                                      param="structured_outputs")

    @property
    def cache_key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on (``replay`` does not)."""
        return (self.kind, self.spec, self.strict)


def with_replay(s: StructuredOutput | None, replay: int) -> StructuredOutput | None:
    """``s`` for an attempt whose prompt ends with ``replay`` tokens generated under it."""
    return None if s is None else replace(s, replay=replay)


def grammar_text(s: StructuredOutput) -> str:
    """The llguidance grammar (its JSON form) for ``s``; raises InvalidRequestError when the
    spec is not even well-formed (bad JSON, a choice list that is not strings)."""
    from llguidance import LLMatcher, grammar_from

    options = dict(_JSON_LAYOUT, lenient=not s.strict)
    if s.kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=options)
    if s.kind == "json_schema":
        try:
            return LLMatcher.grammar_from_json_schema(s.spec, overrides=options)
        except ValueError as e:
            raise InvalidRequestError(f"json schema is not valid JSON: {e}",
                                      param="response_format") from None
    if s.kind == "regex":
        return LLMatcher.grammar_from_regex(s.spec)
    if s.kind == "choice":
        choices = _choices(s.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    try:
        return grammar_from("grammar", s.spec)
    except ValueError as e:
        raise InvalidRequestError(f"grammar: {e}", param="structured_outputs") from None


def _choices(spec: str) -> list[str]:
    try:
        choices = json.loads(spec)
    except ValueError:
        choices = None
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise InvalidRequestError("choice must be a non-empty list of non-empty strings",
                                  param="structured_outputs")
    return choices


def check_structured(s: StructuredOutput, param: str = "structured_outputs") -> None:
    """Raise InvalidRequestError naming the problem when llguidance cannot compile ``s``
    (checked without a tokenizer: milliseconds, and the same parser the workers run)."""
    from llguidance import LLMatcher

    try:
        error = LLMatcher.validate_grammar(grammar_text(s))
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e), param=param) from None
    except BaseException as e:  # a Rust panic is a BaseException (pyo3's PanicException)
        if not is_engine_error(e):
            raise
        error = f"{type(e).__name__}: {e}"
    if error:
        what = {"json_schema": "json schema", "json_object": "json object"}.get(s.kind, s.kind)
        raise InvalidRequestError(f"{what} cannot be compiled: {error}", param=param)


def is_engine_error(e: BaseException) -> bool:
    """True for what llguidance may raise on bad input, a Rust panic included (seen: a schema
    whose error message is cut inside a UTF-8 character); never for a Python exit."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def structured_from_json_schema(
    schema: dict[str, Any] | str, *, strict: bool = True, param: str = "response_format"
) -> StructuredOutput:
    """A checked JSON-schema constraint (e.g. a tool call's arguments for tool_choice
    "required" or a named function). Raises InvalidRequestError(param=param) naming what the
    engine cannot compile."""
    if isinstance(schema, dict):
        spec = json.dumps(schema, separators=(",", ":"))
    elif isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(f"json schema is not valid JSON: {e}", param=param) from None
        if not isinstance(parsed, dict):
            raise InvalidRequestError("json schema must be a JSON object", param=param)
        spec = json.dumps(parsed, separators=(",", ":"))
    else:
        raise InvalidRequestError(f"json schema must be an object, got {type(schema).__name__}",
                                  param=param)
    out = StructuredOutput("json_schema", spec, strict=strict)
    check_structured(out, param)
    return out
