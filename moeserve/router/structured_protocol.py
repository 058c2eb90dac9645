"""Request fields that constrain the output: OpenAI's ``response_format`` and vLLM's
``structured_outputs`` (and the older ``guided_*`` fields), read into one
``StructuredOutput`` and checked by the grammar engine before dispatch (400 naming the field).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moeserve.common.errors import InvalidRequestError
from moeserve.common.structured import (
    StructuredOutput,
    check_structured,
    structured_from_json_schema,
)

__all__ = ["JsonSchemaFormat", "ResponseFormat", "StructuredFields", "StructuredOutputsParams"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The constraint fields of completions and chat completions."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_output(self) -> StructuredOutput | None:
        """The request's constraint, checked; None when unconstrained. Raises
        InvalidRequestError naming the field (two constraints, an uncompilable schema)."""
        found = [c for c in (self._from_response_format(), *self._from_vllm()) if c is not None]
        if len(found) > 1:
            names = ", ".join(param for param, _ in found)
            raise InvalidRequestError(f"give one output constraint, not several ({names})",
                                      param=found[1][0])
        if not found:
            return None
        param, out = found[0]
        check_structured(out, param)
        return out

    def _from_response_format(self) -> tuple[str, StructuredOutput] | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return "response_format", StructuredOutput("json_object")
        if rf.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema",
                                      param="response_format.json_schema")
        js = rf.json_schema
        # OpenAI: no schema means any JSON object.
        schema = js.schema_ if js.schema_ is not None else {"type": "object"}
        param = "response_format.json_schema.schema"
        return param, structured_from_json_schema(schema, strict=bool(js.strict), param=param)

    def _from_vllm(self) -> list[tuple[str, StructuredOutput] | None]:
        so = self.structured_outputs
        found: list[tuple[str, StructuredOutput] | None] = []
        if so is not None:
            given = [k for k in ("json_", "regex", "choice", "grammar", "json_object")
                     if getattr(so, k) not in (None, False)]
            if len(given) != 1:
                raise InvalidRequestError(
                    "structured_outputs needs exactly one of json, regex, choice, grammar, "
                    f"json_object (got {len(given)})", param="structured_outputs")
            key = given[0]
            found.append(_vllm_field(f"structured_outputs.{key.rstrip('_')}", key,
                                     getattr(so, key)))
        for key in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{key}")
            if value is not None:
                found.append(_vllm_field(f"guided_{key}", key, value))
        return found


def _vllm_field(param: str, key: str, value: Any) -> tuple[str, StructuredOutput]:
    if key in ("json_", "json"):
        return param, structured_from_json_schema(value, param=param)
    if key == "json_object":
        return param, StructuredOutput("json_object")
    if key == "choice":
        return param, StructuredOutput("choice", json.dumps(value))
    return param, StructuredOutput(key, value)  # regex, grammar: checked by the caller
