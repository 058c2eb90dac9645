"""The router's /openapi.json, made accurate for the OpenAI routes.

The routes read the body themselves (to bound its size before parsing), so FastAPI cannot see
the request models; this fills in what it would have: the request bodies from the pydantic
models the routes validate with, the OpenAI error body for every status the routes answer, and
the bearer scheme when API keys are on. Clients and fuzzers (tests/test_e2e_security.py runs
schemathesis on it) then exercise the real contract.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from moeserve.router import protocol as P
from moeserve.router import token_routes as T

__all__ = ["install_openapi"]

_REF = "#/components/schemas/{model}"
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}  # fmt: skip
_GENERATION_ERRORS = {
    "400": "invalid request (the message and `param` name the field)",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "body over --max-body-bytes",
    "429": "over the admission bounds (Retry-After)",
    "503": "no worker can serve now (Retry-After)",
    "504": "the request's timeout passed",
}
_BODY_MODELS = {"/v1/completions": P.CompletionRequest,
                "/v1/chat/completions": P.ChatCompletionRequest}  # fmt: skip
# /tokenize takes a prompt or chat messages (token_routes.py); /detokenize token ids.
_TOKEN_MODELS = {"/tokenize": (T.TokenizeCompletion, T.TokenizeChat),
                 "/detokenize": (T.DetokenizeRequest,)}  # fmt: skip
_TOKEN_ERRORS = {"400": "invalid request (the message and `param` name the field)",
                 "404": "unknown model", "413": "body over --max-body-bytes"}  # fmt: skip
_OPEN = {"/health", "/metrics", "/openapi.json"}


def _error_responses(codes: dict[str, str]) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {c: {"description": d, "content": {"application/json": {"schema": ref}}}
            for c, d in codes.items()}  # fmt: skip


def build_schema(app: FastAPI, auth: bool) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = _ERROR
    for path, model in _BODY_MODELS.items():
        body = model.model_json_schema(ref_template=_REF, mode="validation")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        op = schema["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": _REF.format(model=model.__name__)}}}}  # fmt: skip
        op["responses"].pop("422", None)  # FastAPI's default; the routes answer 400
        op["responses"].update(_error_responses(_GENERATION_ERRORS))
        op["responses"]["200"]["description"] = "the completion, or an SSE stream with `stream`"
    for path, models in _TOKEN_MODELS.items():
        refs = []
        for model in models:
            body = model.model_json_schema(ref_template=_REF, mode="validation")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            refs.append({"$ref": _REF.format(model=model.__name__)})
        op = schema["paths"][path]["post"]
        body_schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body_schema}}}
        op["responses"].pop("422", None)
        op["responses"].update(_error_responses(_TOKEN_ERRORS))
    if auth:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema["paths"].items():
            for op in ops.values():
                if path not in _OPEN:
                    op["security"] = [{"bearer": []}]
                    op["responses"].update(_error_responses({"401": "missing or wrong API key"}))
    return schema


def install_openapi(app: FastAPI, auth: bool) -> None:
    cache: dict[str, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        if "schema" not in cache:
            cache["schema"] = build_schema(app, auth)
        return cache["schema"]

    app.openapi = openapi  # type: ignore[method-assign]
