"""How a route describes itself for ``/openapi.json``: an `Operation` beside the route, with
its typed request and response models; `receiver.web.openapi` assembles the document.

Responses are ``{status: Answer}``; the answers every tenant route shares (authentication,
Redis, bodies, rate limits, quotas) are here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from receiver.core.constants import JOB_ID_RE
from receiver.core.schema import Error, ecma

Schema = type[BaseModel] | dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """One documented response: its description, its JSON body's model or schema (an
    `Error` unless said), its headers, or another content type."""

    description: str
    body: Schema | None = Error
    headers: dict[str, Any] = field(default_factory=dict)
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: dict[int, Answer]
    description: str | None = None
    body: Schema | None = None  # the request body's model
    body_required: bool = True
    parameters: list[dict[str, Any]] = field(default_factory=list)
    tenant: bool = True  # a bearer API key (or loopback, in open mode)


def ok(description: str, body: Schema | None) -> Answer:
    """A success: its description and its body's model or schema."""
    return Answer(description, body)


def error(description: str, headers: dict[str, Any] | None = None) -> Answer:
    """An error answer: an `Error` body, and the headers it always carries."""
    return Answer(description, Error, headers or {})


RETRY_AFTER = {"Retry-After": {
    "description": "seconds to wait before trying again", "required": True,
    "schema": {"type": "integer", "minimum": 1}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {
    "description": "the scheme to authenticate with", "required": True,
    "schema": {"type": "string", "const": "Bearer"}}}

AUTH_ERRORS = {
    401: error("missing_api_key, invalid_api_key: no or an unknown API key", WWW_AUTHENTICATE),
    403: error("loopback_only: open mode (no API keys) and a non-loopback client"),
}
UNAVAILABLE = {503: error("store_unavailable: Redis could not store or read it; retry "
                          "(nothing was acknowledged)", RETRY_AFTER)}
TENANT_ERRORS = {**AUTH_ERRORS, **UNAVAILABLE}
QUOTA = {507: error("storage_quota: the tenant wrote TENANT_MAX_BYTES in the last TASK_TTL "
                    "(Retry-After: when the oldest writes leave the count)", RETRY_AFTER)}
TASK_QUOTA = ("task_quota: the tenant created TENANT_MAX_TASKS tasks in the last TASK_TTL "
              "(Retry-After: when the oldest of them leave the count)")
CLAIMED = "provider_task_claimed: another task holds that provider task id"
# What the HTTP protocol answers before any route (`receiver.server.guard`), so any
# operation may get it; `receiver.web.openapi` adds it to each (the connection then closes).
PROTOCOL_ERRORS = {
    400: "invalid_http: not a request HTTP/1.1 can parse",
    408: "head_timeout: the request line and headers did not arrive within HEAD_TIMEOUT",
    431: "head_too_large: the request line and headers are over MAX_HEAD_BYTES",
}
BODY_ERRORS = {
    400: error("bad_request: the body is not a JSON object, or a field is not valid"),
    408: error("body_timeout: the body did not arrive in time"),
    413: error("payload_too_large: the body is over MAX_BODY_BYTES (inflated, if gzip or "
               "deflate); json_too_deep: nested deeper than MAX_JSON_DEPTH; "
               "json_too_complex: more objects and arrays than MAX_JSON_CONTAINERS"),
    415: error("unsupported_encoding: a Content-Encoding other than gzip, deflate or "
               "identity"),
}
JOB_ID_PARAMETER = {"name": "job_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": ecma(JOB_ID_RE),
                               "description": "a job id of this service (20 hex digits)"}}
