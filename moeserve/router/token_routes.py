"""/tokenize, /detokenize and /version, in vLLM's request and response shapes.

POST /tokenize ``{"prompt": text, "add_special_tokens": true}`` or ``{"messages": [...],
"add_generation_prompt": true, "tools": [...]}`` (the chat template, as a chat request renders
it) -> ``{"count", "max_model_len", "tokens"}`` (+ ``token_strs`` with ``return_token_strs``).
POST /detokenize ``{"tokens": [ids]}`` -> ``{"prompt": text}``. GET /version -> ``{"version"}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import moeserve
from moeserve.common.errors import InvalidRequestError, MoeServeError
from moeserve.router import protocol as P
from moeserve.router.chat import ChatOptions, template_inputs
from moeserve.router.chat_protocol import ChatMessage, ChatTools
from moeserve.router.frontend import Frontend

__all__ = ["add_token_routes"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class TokenizeCompletion(_Strict):
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(ChatTools, _Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[Annotated[int, Field(strict=True, ge=0)]]


def add_token_routes(app: FastAPI, frontend: Frontend, body: Callable[[Request], Awaitable[Any]],
                     chat: ChatOptions,
                     unknown_model: Callable[[str | None, str], JSONResponse | None]
                     ) -> None:  # fmt: skip
    """``unknown_model``: the generation routes' 404 for a model this router does not serve."""
    tok = frontend.tokenizer

    def fail(e: Exception) -> JSONResponse:
        status, err = P.error_from_exception(e)
        return JSONResponse(err, status)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            doc = await body(request)
            if isinstance(doc, dict) and "messages" in doc:
                req: Any = TokenizeChat.model_validate(doc)
                if (bad := unknown_model(req.model, frontend.model_id)) is not None:
                    return bad
                messages, tools, extra = template_inputs(req, chat, check_choice=False)
                ids = await frontend.chat_ids_async(messages, req.add_generation_prompt, tools,
                                                    extra)  # fmt: skip
            else:
                req = TokenizeCompletion.model_validate(doc)
                if (bad := unknown_model(req.model, frontend.model_id)) is not None:
                    return bad
                ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            out: dict[str, Any] = {"count": len(ids), "max_model_len": frontend.max_model_len,
                                   "tokens": ids}  # fmt: skip
            if req.return_token_strs:
                out["token_strs"] = tok.token_strs(ids)
            return JSONResponse(out)
        except (ValidationError, MoeServeError) as e:
            return fail(e)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        try:
            req = DetokenizeRequest.model_validate(await body(request))
            if (missing := unknown_model(req.model, frontend.model_id)) is not None:
                return missing
            bad = next((t for t in req.tokens if not 0 <= t < frontend.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"token id {bad} is outside the vocabulary "
                                          f"[0, {frontend.vocab_size})", param="tokens")
            tok.require("tokens")
            return JSONResponse({"prompt": tok.decode(req.tokens)})
        except (ValidationError, MoeServeError) as e:
            return fail(e)

    @app.get("/version")
    async def version() -> dict:
        return {"version": moeserve.__version__}
