"""Chat messages, tool definitions and tool_choice of /v1/chat/completions (OpenAI's shapes).

Each model is strict: an unknown key inside a tool definition, a function name OpenAI would
refuse, ``parameters`` that are not a JSON Schema, two tools of one name, or a tool_choice that
names no given tool are 400s naming the field. Messages accept what clients echo back from a
previous response (``refusal``, ``reasoning_content``, ...) and ignore it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = ["ChatMessage", "ChatTools", "FunctionDef", "NamedToolChoice", "ToolCallIn", "ToolDef",
           "log_noop_fields"]

logger = logging.getLogger(__name__)

_NAME = r"^[A-Za-z0-9_-]{1,64}$"
# Fields OpenAI defines that change nothing about the output here; accepted and logged once.
NOOP_FIELDS = ("user", "service_tier", "store", "metadata")
_logged: set[str] = set()


def log_noop_fields(fields: set[str]) -> None:
    for name in sorted(fields.intersection(NOOP_FIELDS) - _logged):
        _logged.add(name)
        logger.info("request field %r is accepted and has no effect on this server "
                    "(logged once)", name)  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDef(_Strict):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _is_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(v)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.path)
            raise ValueError(f"not a valid JSON Schema ({where or 'top level'}: "
                             f"{e.message})") from None  # fmt: skip
        return v


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class _ChoiceName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _ChoiceName


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """A call in an assistant message sent back to the model."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: _CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str | None:
        if not isinstance(v, list):
            return v
        parts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatTools(BaseModel):
    """The chat request's tool fields (a mixin of ChatCompletionRequest)."""

    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v: list[ToolDef] | None) -> list[ToolDef] | None:
        names = [t.function.name for t in v or ()]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"two tools are named {dup!r}")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = set(v or ()) & {"messages", "tools", "add_generation_prompt", "bos_token",
                                "eos_token"}  # fmt: skip
        if taken:
            raise ValueError(f"{sorted(taken)} are set by the request itself")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_matches_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or ()
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in tools]
            if choice.function.name not in names:
                raise ValueError(f"names {choice.function.name!r}, which is not among the "
                                 f"tools ({', '.join(names) or 'none given'})")
        elif choice == "required" and not tools:
            raise ValueError("'required' needs tools")
        return choice

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: 'auto' with tools, 'none' without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"
