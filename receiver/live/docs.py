"""The event routes as ``/openapi.json`` shows them (see `receiver.core.docs`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from receiver.core.docs import (
    JOB_ID_PARAMETER,
    RETRY_AFTER,
    UNAVAILABLE,
    WWW_AUTHENTICATE,
    Answer,
    Operation,
    error,
)
from receiver.core.models import EventKind
from receiver.core.schema import EventId, Model, extra, ref


class ServerSentEvent(Model):
    """One event of an event stream."""

    id: EventId
    event: EventKind
    data: str = Field(json_schema_extra=extra(contentMediaType="application/json",
                                              contentSchema=ref("TaskEvent")))
    retry: int | SkipJsonSchema[None] = Field(None, ge=0)


_EVENT_ID = {"type": "string", "pattern": "^[0-9]{1,15}-[0-9]{1,15}$"}
_PARAMETERS: list[dict[str, Any]] = [
    {"name": "token", "in": "query", "schema": {"type": "string"},
     "description": "a subscribe token (POST /subscribe-tokens), instead of the "
                    "Authorization header; when given, it decides the tenant"},
    {"name": "last_event_id", "in": "query", "schema": _EVENT_ID,
     "description": "resume after this event (or send the Last-Event-ID header)"},
    {"name": "Last-Event-ID", "in": "header", "schema": _EVENT_ID,
     "description": "resume after this event: what an EventSource sends when it reconnects"},
]
_STREAM = Answer(
    "An event stream. Each event is one stored transition: `id` the event id, `event` its "
    "kind, `data` the task JSON (TaskEvent). Comments (`: ping`) keep the connection open; "
    "the first block sets `retry`. (The schema describes one event, as OpenAPI 3.2's "
    "itemSchema does.)",
    ServerSentEvent, media_type="text/event-stream",
    headers={
        "Cache-Control": {"required": True, "schema": {"type": "string", "const": "no-store"}},
        "X-Accel-Buffering": {"required": True, "schema": {"type": "string", "const": "no"},
                              "description": "tells nginx not to buffer the stream"},
    })
_ERRORS = {
    400: error("bad_request: Last-Event-ID is not an event id this service gave out"),
    401: error("missing_api_key, invalid_api_key: no or an unknown API key (and no token); "
               "invalid_token, expired_token: a bad or expired subscribe token",
               WWW_AUTHENTICATE),
    403: error("wrong_task: the subscribe token is for another task; loopback_only: open "
               "mode and a non-loopback client"),
    429: error("rate_limited: too many requests; retry after Retry-After", RETRY_AFTER),
    **UNAVAILABLE,
}

OPERATIONS: dict[str, dict[str, Operation]] = {
    "/tasks/{job_id}/events": {"get": Operation(
        "Server-Sent Events of one task, from its current state; ends after its terminal "
        "event",
        parameters=[JOB_ID_PARAMETER, *_PARAMETERS],
        responses={
            200: _STREAM,
            204: Answer("The task has ended and Last-Event-ID is its end: nothing more will "
                        "come (EventSource stops)", None),
            404: error("task_not_found: no such task for this tenant"),
            **_ERRORS,
        })},
    "/events": {"get": Operation(
        "Server-Sent Events of every task of the tenant", parameters=_PARAMETERS,
        responses={200: _STREAM, **_ERRORS})},
}
