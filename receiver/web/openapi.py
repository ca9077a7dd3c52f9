"""``GET /openapi.json``, generated: the component schemas from the typed models, the
paths from the `Operation` each capability declares beside its routes (its ``docs``).

`tests/web/test_schema.py` runs Schemathesis against it (every route, with and without an API
key): each status code, content type, header and body the service answers with is here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.core.docs import PROTOCOL_ERRORS, RETRY_AFTER, Answer, Operation, error, ok
from receiver.core.schema import Model, ref
from receiver.ingest.docs import OPERATIONS as INGEST
from receiver.live.docs import OPERATIONS as LIVE
from receiver.services.http import JSONResponse
from receiver.tasks.docs import OPERATIONS as TASKS
from receiver.web.admin import OPERATIONS as ADMIN


class _Status(Model):
    status: str


def _status(value: str) -> dict[str, Any]:
    return {"type": "object", "required": ["status"],
            "properties": {"status": {"type": "string", "const": value}}}


_PAGE_HEADERS = {
    name: {"required": True, "schema": {"type": "string", "minLength": 1}}
    for name in ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options",
                 "Referrer-Policy", "Cache-Control")
}

WEB: dict[str, dict[str, Operation]] = {
    "/": {"get": Operation(
        "The live dashboard", tenant=False,
        responses={200: Answer("The page (it signs in with an API key itself)",
                               {"type": "string"}, _PAGE_HEADERS, "text/html")})},
    "/healthz": {"get": Operation(
        "Liveness", tenant=False, responses={200: ok("The process serves", _status("ok"))})},
    "/readyz": {"get": Operation(
        "Readiness: Redis answers", tenant=False,
        responses={200: ok("Ready", _status("ready")),
                   503: error("store_unavailable: Redis does not answer", RETRY_AFTER)})},
    "/metrics": {"get": Operation(
        "Prometheus metrics (callbacks by provider and outcome, transition latency, Redis "
        "errors, SSE clients, admission queues and slots, submissions, reconciler polls)",
        tenant=False,
        responses={
            200: Answer("Prometheus text format", {"type": "string"}, media_type="text/plain"),
            401: error("metrics_token_required: METRICS_TOKEN is set and the request does "
                       "not carry it as a bearer token"),
            503: error("store_unavailable: Redis does not answer (queue depths are read from "
                       "it)", RETRY_AFTER),
        })},
    "/openapi.json": {"get": Operation(
        "This document", tenant=False,
        responses={200: ok("OpenAPI 3.1", {
            "type": "object", "required": ["openapi", "info", "paths"],
            "properties": {"openapi": {"type": "string", "const": "3.1.0"}}})})},
}
OPERATIONS = {**INGEST, **TASKS, **LIVE, **WEB, **ADMIN}


def document(operations: dict[str, dict[str, Operation]]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of these operations, with every model they name."""
    models: set[type[BaseModel]] = set()
    for methods in operations.values():
        for op in methods.values():
            schemas = [op.body, *(answer.body for answer in op.responses.values())]
            models.update(s for s in schemas if isinstance(s, type))
    _, defs = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": __version__,
            "description": "Webhook receiver and job tracker for Midjourney-style image "
                           "APIs. Every error is JSON {error, detail}.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": defs.get("$defs", {}),
        },
        "paths": {path: {method: _operation(op) for method, op in methods.items()}
                  for path, methods in operations.items()},
    }


def _schema(body: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    return ref(body.__name__) if isinstance(body, type) else body


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tenant:
        out["security"] = [{"bearer": []}]
    if op.parameters:
        out["parameters"] = op.parameters
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": {
            "application/json": {"schema": _schema(op.body)}}}
    responses = dict(op.responses)
    for status, what in PROTOCOL_ERRORS.items():  # before any route: every operation's
        known = responses.get(status)
        responses[status] = error(what) if known is None else replace(
            known, description=f"{known.description}; {what}")
    out["responses"] = {str(status): _answer(answer)
                        for status, answer in sorted(responses.items())}
    return out


def _answer(answer: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    if answer.body is not None:
        out["content"] = {answer.media_type: {"schema": _schema(answer.body)}}
    if answer.headers:
        out["headers"] = answer.headers
    return out


SCHEMA = document(OPERATIONS)


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: the document, made once at import."""
    return JSONResponse(SCHEMA)
