"""``POST /callbacks/{provider}`` as ``/openapi.json`` shows it (see `receiver.core.docs`).

The providers' bodies are described here for readers and schema tools only: the hot path
reads them with `receiver.providers.dialects`, without a model (measured in BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, RootModel

from receiver.core.docs import (
    BODY_ERRORS,
    CLAIMED,
    QUOTA,
    RETRY_AFTER,
    TASK_QUOTA,
    WWW_AUTHENTICATE,
    Operation,
    error,
    ok,
)
from receiver.core.models import TaskStatus
from receiver.core.schema import JobId, Model, extra
from receiver.core.settings import PROVIDERS


class CallbackResult(Model):
    result: Literal["stored", "duplicate", "stale"]
    job_id: JobId
    version: int = Field(ge=1, description="the task's version now")


class CallbackVerifying(Model):
    result: Literal["verifying"]
    job_id: JobId
    version: None = Field(description="nothing was stored")


_STATUS = {"enum": [s.value for s in TaskStatus],
           "description": "the provider's status (case-insensitive)"}
_PROGRESS = {"type": ["string", "integer", "number"],
             "description": '"45%", "45" or 45; anything else ("" on failure) keeps the '
                            "stored progress"}
_ID = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "\\S", "maxLength": 128}],
       "description": "the provider's task id; an integer of any size is kept exact"}
Status = Annotated[str, Field(json_schema_extra=extra(**_STATUS))]
Progress = Annotated[Any, Field(json_schema_extra=extra(**_PROGRESS))]
ProviderId = Annotated[Any, Field(json_schema_extra=extra(**_ID))]


class _Dialect(Model):
    """Any field not listed is kept, in the stored transition's ``raw``. Fields may be null:
    midjourney-proxy writes every field, nulls included (PROVIDERS.md, its NotifyService)."""

    model_config = ConfigDict(title=None, extra="allow")


class ProviderButton(_Dialect):
    customId: str
    label: str | None = Field(None)
    emoji: str | None = Field(None)


class ImageUrl(_Dialect):
    url: str | None = Field(None)


class MjproxyProperties(_Dialect):
    finalPrompt: str | None = Field(None)


class MjproxyTask(_Dialect):
    """midjourney-proxy and its relays (POST /callbacks/mjproxy)."""

    id: ProviderId
    status: Status
    progress: Progress = Field(None)
    action: str | None = Field(None)
    prompt: str | None = Field(None)
    promptEn: str | None = Field(None)
    imageUrl: str | None = Field(None)
    imageUrls: list[str | ImageUrl] | None = Field(None)
    failReason: str | None = Field(None)
    buttons: list[ProviderButton] | None = Field(None)
    properties: MjproxyProperties | None = Field(None)
    submitTime: int | None = Field(None, description="epoch milliseconds")
    startTime: int | None = Field(None, description="epoch milliseconds")
    finishTime: int | None = Field(None, description="epoch milliseconds")


class OhmygptTask(_Dialect):
    """OhMyGPT (POST /callbacks/ohmygpt): the task bare, or wrapped in ``data``."""

    taskId: ProviderId
    status: Status
    progress: Progress = Field(None)
    action: str | None = Field(None)
    taskType: str | None = Field(None, description="FAST or NORMAL")
    prompt: str | None = Field(None)
    finalPrompt: str | None = Field(None)
    imageDcUrl: str | None = Field(None)
    imageS3Url: str | None = Field(None)
    failReason: str | None = Field(None)
    actions: list[ProviderButton] | None = Field(None)
    submitTime: str | None = Field(None, description="ISO 8601")
    startTime: str | None = Field(None, description="ISO 8601")
    finishTime: str | None = Field(None, description="ISO 8601")


class OhmygptWrapped(_Dialect):
    """OhMyGPT, wrapped like a query answer."""

    data: OhmygptTask


class Aigc2dTask(_Dialect):
    """AIGC2D (POST /callbacks/aigc2d)."""

    task_id: ProviderId
    status: Status
    progress: Progress = Field(None)
    action: str | None = Field(None)
    prompt: str | None = Field(None)
    image_url: str | None = Field(None)
    fail_reason: str | None = Field(None)
    message: str | None = Field(None)
    point: float | None = Field(None, description="the task's price in points")
    submit_time: str | None = Field(None, description="YYYY-MM-DD HH:MM:SS, UTC+8")
    start_time: str | None = Field(None, description="YYYY-MM-DD HH:MM:SS, UTC+8")
    finish_time: str | None = Field(None, description="YYYY-MM-DD HH:MM:SS, UTC+8")


class CallbackBody(RootModel[MjproxyTask | OhmygptTask | OhmygptWrapped | Aigc2dTask]):
    """The task in the provider's dialect (the one named in the path); fields not listed
    are kept as received."""


OPERATIONS: dict[str, dict[str, Operation]] = {
    "/callbacks/{provider}": {"post": Operation(
        "Accept a provider's task callback",
        description="Answered once Redis has stored the transition (or recognised it as a "
                    "duplicate or stale). No API key: the token in the URL is the authority.",
        tenant=False,
        parameters=[
            {"name": "provider", "in": "path", "required": True,
             "schema": {"type": "string", "enum": sorted(PROVIDERS)}},
            {"name": "token", "in": "query", "required": True, "schema": {"type": "string"},
             "description": "the signed token of the minted callback URL"},
        ],
        body=CallbackBody,
        responses={
            200: ok("Stored, or recognised as a duplicate or stale", CallbackResult),
            202: ok("VERIFY_FINAL: a SUCCESS the provider could not be asked to confirm "
                    "now; nothing stored, polling settles it", CallbackVerifying),
            400: error("invalid_payload: the body is not a task of that dialect"),
            401: error("missing_token, invalid_token, expired_token: no token, or a bad or "
                       "expired one", WWW_AUTHENTICATE),
            403: error("wrong_provider: the token is for another provider; wrong_job: the "
                       "job is bound to another provider task"),
            404: error("unknown_provider: no such provider"),
            408: BODY_ERRORS[408],
            409: error(f"{CLAIMED}: nothing stored"),
            413: BODY_ERRORS[413],
            415: BODY_ERRORS[415],
            429: error("rate_limited: too many callbacks for this task; retry after "
                       f"Retry-After; {TASK_QUOTA}", RETRY_AFTER),
            **QUOTA,
            503: error("store_unavailable: Redis could not store it; retry (nothing was "
                       "acknowledged)", RETRY_AFTER),
        })},
}
