"""OpenAI-compatible HTTP routes. Routes only convert HTTP <-> typed requests and map errors.

/v1/completions, /v1/chat/completions (SSE with ``stream``), /v1/models, /health, /metrics,
/v1/status (the router's view of every worker) and POST /v1/route (where a prompt would go).
A client that disconnects mid-request cancels it, which aborts it on every worker. Bodies over
``max_body_bytes`` get 413; 429 and 503 carry Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from moeserve.common.errors import UnavailableError
from moeserve.common.metrics import render
from moeserve.router import protocol as P
from moeserve.router.chat import (
    ChatOptions,
    ChatOutput,
    chat_outputs,
    reasoning_total,
    template_inputs,
)
from moeserve.router.choices import run_choices
from moeserve.router.frontend import Delta, Frontend, Usage
from moeserve.router.limits import BodyBudget, HttpLimits, check_stop, read_json_body
from moeserve.router.logprobs_format import LogprobsFormatter
from moeserve.router.status import snapshot
from moeserve.router.token_routes import add_token_routes

__all__ = ["OpenStreams", "create_app"]


_RETRY_AFTER = {"value": "1"}


def _error(exc: Exception) -> JSONResponse:
    status, body = P.error_from_exception(exc)
    headers = {"Retry-After": _RETRY_AFTER["value"]} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_MARK = "\x00text\x00"  # serialized as "\u0000text\u0000": no id or model name holds it


class _TextEvents:
    """SSE events of a stream's plain text chunks (a choice's text, and its token ids when
    the request asked for them; no finish reason or logprobs), most of a stream: the
    protocol's own chunk, built once with markers for the text and the ids, serialized and
    split around them; each token then costs a ``json.dumps`` of its text (~1 us against
    ~7 us for the whole chunk). One ``created`` for the stream's chunks, as OpenAI's streams
    have."""

    def __init__(self, build: Callable[[int, str, Any], dict], with_ids: bool) -> None:
        self._build = build
        self._with_ids = with_ids
        self._parts: dict[int, list[bytes] | None] = {}  # per choice index

    def event(self, index: int, text: str, token_ids: list[int]) -> bytes:
        if index not in self._parts:
            doc = _sse(self._build(index, _MARK, _MARK if self._with_ids else None))
            split = doc.split(json.dumps(_MARK).encode())
            self._parts[index] = split if len(split) == 2 + self._with_ids else None
        parts = self._parts[index]
        if parts is None:
            return _sse(self._build(index, text, token_ids if self._with_ids else None))
        event = parts[0] + json.dumps(text).encode() + parts[1]
        if self._with_ids:
            event += f"[{','.join(map(str, token_ids))}]".encode() + parts[2]
        return event


async def _until_disconnect(request: Request, work: asyncio.Task) -> None:
    """Non-streaming requests: cancel the work when the client goes away."""
    while not work.done():
        if await request.is_disconnected():
            work.cancel()
            return
        await asyncio.sleep(0.1)


def create_app(frontend: Frontend, is_healthy: Callable[[], bool],
               limits: HttpLimits | None = None, chat: ChatOptions | None = None) -> FastAPI:
    """``app.state.streams.close()`` ends every open stream with an in-band error (shutdown).
    ``chat``: the tool-call and reasoning parsers (--tool-call-parser, --reasoning-parser)."""
    app = FastAPI(title="moeserve router", docs_url=None, redoc_url=None)
    limits = limits or HttpLimits()
    chat = chat or ChatOptions()
    size_limit = frontend.router.settings.max_body_bytes
    budget = BodyBudget(limits.max_buffered_bytes)
    app.state.body_budget = budget
    app.state.streams = streams = OpenStreams()
    _RETRY_AFTER["value"] = str(frontend.router.settings.retry_after_s)

    async def body(request: Request) -> Any:
        return await read_json_body(request, size_limit, budget, limits.body_timeout_s)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown routes (404) and wrong methods (405) answer in OpenAI's error shape too."""
        return _route_error(request, exc)

    async def generate(request: Request, model: type[P._GenerationRequest], kind: str) -> Response:
        try:
            req = model.model_validate(await body(request))
            if (bad := _unknown_model(req.model, frontend.model_id)) is not None:
                return bad
            check_stop(req.stop_strings, limits)
            return await _serve(frontend, request, req, kind, streams, chat)
        except (ValidationError, P.MoeServeError) as e:
            return _error(e)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, P.CompletionRequest, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, P.ChatCompletionRequest, "chat")

    _add_info_routes(app, frontend, is_healthy, body)
    add_token_routes(app, frontend, body, chat, _unknown_model)
    return app


def _route_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = {404: f"no route {request.url.path}",
           405: f"{request.method} is not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))  # fmt: skip
    return JSONResponse(P.error_body(msg, "invalid_request_error", None, code), exc.status_code,
                        headers=getattr(exc, "headers", None))  # fmt: skip


def _unknown_model(name: str | None, model_id: str) -> JSONResponse | None:
    if name is not None and name != model_id:
        msg = f"The model `{name}` does not exist; this router serves `{model_id}`."
        return JSONResponse(P.error_body(msg, "NotFoundError", "model", "model_not_found"), 404)
    return None


async def _prompt_ids(frontend: Frontend, req: P._GenerationRequest, chat: ChatOptions
                      ) -> list[int]:  # fmt: skip
    if isinstance(req, P.CompletionRequest):
        return await frontend.prompt_ids_async(req.prompt)
    assert isinstance(req, P.ChatCompletionRequest)
    messages, tools, extra = template_inputs(req, chat)
    return await frontend.chat_ids_async(messages, req.add_generation_prompt, tools, extra)


async def _serve(frontend: Frontend, request: Request, req: P._GenerationRequest,
                 kind: str, streams: OpenStreams, chat: ChatOptions) -> Response:
    """One completion or chat request: streamed (SSE) or collected into one JSON response."""
    model_id = frontend.model_id
    prompt = await _prompt_ids(frontend, req, chat)
    params = req.sampling_params(
        16 if kind == "completion" else frontend.default_max_tokens(prompt)
    )
    # Chat: one output renderer per choice (reasoning, tool calls); tool_choice may constrain.
    params, outs = chat_outputs(req, params, chat, frontend.tokenizer)
    frontend.check_length(prompt, params, "prompt" if kind == "completion" else "messages")
    if req.stop_strings and not frontend.tokenizer.available:
        frontend.tokenizer.detokenizer(req.stop_strings)  # raises the 400 naming "stop"
    rid = P.new_request_id("cmpl" if kind == "completion" else "chatcmpl")
    usage = Usage()
    if req.n > 1:
        deltas = run_choices(frontend, rid, prompt, params, req.n, req.stop_strings, usage,
                             req.timeout)
    else:
        deltas = frontend.run(rid, prompt, params, req.stop_strings, usage, req.timeout)
    ids = req.return_token_ids
    fmt = None
    if params.logprobs is not None:  # one per choice: legacy text offsets run per choice
        fmt = [LogprobsFormatter(frontend.tokenizer, kind == "chat") for _ in range(req.n)]
    if req.stream:
        first = await _first_or_error(deltas)  # errors before the first token stay HTTP
        gen = _stream(rid, model_id, kind, first, _until_closing(deltas, streams), usage, ids,
                      req.include_usage, fmt, req.n, outs)  # fmt: skip
        return StreamingResponse(gen, media_type="text/event-stream")
    work = asyncio.ensure_future(_collect(deltas, req.n))
    watcher = asyncio.ensure_future(_until_disconnect(request, work))
    try:
        choices = await work
    except asyncio.CancelledError:
        return Response(status_code=499)
    finally:
        watcher.cancel()
    # Chat: the messages first (parsing them counts the reasoning tokens).
    chat = [{"message": o.message(c[0], c[1])} for o, c in zip(outs, choices, strict=False)]
    u = P.usage_dict(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                     reasoning_total(outs))  # fmt: skip
    build = P.completion_response if kind == "completion" else P.chat_response
    bodies = [build(rid, model_id, text, outs[i].finish_reason(reason) if outs else reason, u,
                    token_ids if ids else None, index=i,
                    logprobs=fmt[i].render(lps) if fmt else None, **(chat[i] if outs else {}))
              for i, (text, token_ids, reason, lps) in enumerate(choices)]  # fmt: skip
    return JSONResponse(bodies[0] if len(bodies) == 1 else P.merge_choices(bodies))


def _add_info_routes(app: FastAPI, frontend: Frontend, is_healthy: Callable[[], bool],
                     body: Callable[[Request], Awaitable[Any]]) -> None:
    """/v1/models, /health, /v1/status, /v1/route and /metrics."""
    model_id = frontend.model_id
    router = frontend.router

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model_id, "object": "model", "created": int(time.time()),
            "owned_by": "moeserve", "root": model_id, "max_model_len": frontend.max_model_len,
            "vocab_size": frontend.vocab_size,
        }  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        ok = is_healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/v1/status")
    async def status() -> dict:
        return snapshot(router)

    @app.post("/v1/route")
    async def route(request: Request) -> Response:
        """Dry run: which workers the policy picks for ``{"prompt": [token ids]}`` now."""
        try:
            doc = await body(request)
            prompt = doc.get("prompt") if isinstance(doc, dict) else None
            if not isinstance(prompt, str | list):
                raise P.InvalidRequestError("prompt must be text or token ids", param="prompt")
            return JSONResponse(router.explain(await frontend.prompt_ids_async(prompt)))
        except P.MoeServeError as e:
            return _error(e)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render(frontend.metrics.registry)
        return Response(body, media_type=content_type)


async def _first_or_error(deltas: AsyncIterator[Delta]) -> Delta:
    try:
        return await anext(deltas)
    except BaseException:
        await deltas.aclose()
        raise


class OpenStreams:
    """The SSE streams in flight; ``close()`` ends each with an in-band error (shutdown)."""

    def __init__(self) -> None:
        self.closing = False
        self._cuts: set[Callable[[], None]] = set()

    def close(self) -> None:
        self.closing = True
        for cut in list(self._cuts):
            cut()

    def guard(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """``deltas``, ended by ``close()`` with an UnavailableError (the router's gRPC
        Generate streams report it as UNAVAILABLE, as SSE streams report it in-band)."""
        return _until_closing(deltas, self)


_CUT = "the router shut down during this request; retry it"


async def _until_closing(deltas: AsyncIterator[Delta], streams: OpenStreams
                         ) -> AsyncIterator[Delta]:  # fmt: skip
    """``deltas`` until ``streams.close()``; then an UnavailableError that the stream reports
    in-band. A stream waiting for its next token is woken by cancelling its task there (only
    there: a cancel landing in Starlette's send would end the response silently)."""
    task = asyncio.current_task()
    waiting = [False]

    def cut() -> None:
        if waiting[0] and task is not None:
            task.cancel()

    streams._cuts.add(cut)
    try:
        while not streams.closing:
            waiting[0] = True
            try:
                d = await anext(deltas)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not streams.closing or task is None:
                    raise
                task.uncancel()
                break
            finally:
                waiting[0] = False
            yield d
        raise UnavailableError(_CUT)
    finally:
        streams._cuts.discard(cut)


async def _collect(deltas: AsyncIterator[Delta], n: int = 1) -> list[tuple]:
    """Each choice's (text, token ids, finish reason, token logprobs), by index."""
    text: list[list[str]] = [[] for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    lps: list[list] = [[] for _ in range(n)]
    reason: list[str | None] = [None] * n
    async for d in deltas:
        i = d.index
        text[i].append(d.text)
        ids[i].extend(d.token_ids)
        lps[i].extend(d.logprobs or ())
        reason[i] = d.finish_reason or reason[i]
    return [("".join(text[i]), ids[i], reason[i], lps[i]) for i in range(n)]


async def _stream(
    rid: str, model: str, kind: str, first: Delta, deltas: AsyncIterator[Delta], usage: Usage,
    with_ids: bool, include_usage: bool, fmt: list[LogprobsFormatter] | None = None, n: int = 1,
    outs: list[ChatOutput] = (),  # type: ignore[assignment]
) -> AsyncIterator[bytes]:  # fmt: skip
    """SSE body; if the client disconnects Starlette cancels this, which closes ``deltas``."""
    started: set[int] = set()  # choices whose first chat chunk (with the role) went out
    if kind == "completion":
        text_events = _TextEvents(
            lambda i, text, ids: P.completion_chunk(rid, model, text, None, ids, index=i),
            with_ids)
    else:
        text_events = _TextEvents(
            lambda i, text, ids: P.chat_chunk(rid, model, {"content": text}, None, ids, index=i),
            with_ids)

    def event(d: Delta) -> bytes | None:
        ids = d.token_ids if with_ids else None
        lp = fmt[d.index].render(d.logprobs) if fmt and d.logprobs else None
        if kind == "completion":
            if not (d.finish_reason or lp):
                return text_events.event(d.index, d.text, d.token_ids)
            return _sse(P.completion_chunk(rid, model, d.text, d.finish_reason, ids,
                                           index=d.index, logprobs=lp))  # fmt: skip
        role = d.index not in started
        started.add(d.index)
        out = outs[d.index]
        delta = out.delta(d.text, d.token_ids, d.finished)
        if not (delta or role or d.finished or ids or lp):
            return None  # all held back (a tool-call marker may be arriving)
        if not (role or d.finished or lp) and delta.keys() == {"content"}:
            return text_events.event(d.index, delta["content"], d.token_ids)
        delta = {"role": "assistant", **delta} if role else delta
        return _sse(P.chat_chunk(rid, model, delta, out.finish_reason(d.finish_reason), ids,
                                 index=d.index, logprobs=lp))  # fmt: skip

    try:
        yield event(first)  # type: ignore[misc]  # a first chunk is never held
        if not first.finished or n > 1:
            async for d in deltas:
                if (e := event(d)) is not None:
                    yield e
        if include_usage:
            u = P.usage_dict(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                             reasoning_total(outs))  # fmt: skip
            build = P.completion_chunk if kind == "completion" else P.chat_chunk
            yield _sse(build(rid, model, None, usage=u))
    except P.MoeServeError as e:  # after the 200 went out: report in-band, as OpenAI does
        yield _sse(P.error_from_exception(e)[1])
    finally:
        with contextlib.suppress(Exception):
            await deltas.aclose()
    yield b"data: [DONE]\n\n"
