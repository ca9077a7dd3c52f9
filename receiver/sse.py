"""``GET /tasks/{id}/events`` and ``GET /events``: Server-Sent Events, resumable.

A client is first registered with the hub, so live events queue up while history is read;
history is then replayed from the task's history stream or the tenant's stream after
Last-Event-ID, and live events follow, skipping any id already sent. Event ids grow strictly
per tenant, so "already sent" is one comparison: no gap and no duplicate at the switch.
An id older than what the stream still holds gets the current snapshots first.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import ResponseError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from receiver.api import TaskNotFound
from receiver.auth import authenticate
from receiver.constants import JOB_ID_RE
from receiver.errors import BadRequest, Forbidden
from receiver.events import Event, Subscription, event_key
from receiver.models import TaskStatus
from receiver.services import Services, services

_EVENT_ID_RE = re.compile(r"^\d{1,15}-\d{1,15}\Z")
_CHUNK = 500  # stream entries read per round trip when replaying


class WrongTask(Forbidden):
    code = "wrong_task"


async def task_events(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    tenant = authenticate_events(request, job_id)
    svc = services(request)
    task = await svc.store.get(tenant, job_id) if JOB_ID_RE.match(job_id) else None
    if task is None:
        raise TaskNotFound(f"no task {job_id[:40]!r} for this tenant")
    last = _last_event_id(request)
    if last and TaskStatus(orjson.loads(task)["status"]).terminal:
        latest = await svc.redis.xrevrange(svc.store.keys.history(tenant, job_id), count=1)
        if latest and event_key(last) >= event_key(latest[0][0].decode()):
            # The client has seen the end (an EventSource reconnects by itself after every
            # close); 204 is the standard way to tell it to stop.
            return Response(status_code=204)
    return _response(svc, _stream(svc, tenant, job_id, last))


async def tenant_events(request: Request) -> EventSourceResponse:
    tenant = authenticate_events(request, None)
    svc = services(request)
    return _response(svc, _stream(svc, tenant, None, _last_event_id(request)))


def authenticate_events(request: Request, task_id: str | None) -> str:
    """An API key, or (for an EventSource, which cannot send headers) ``?token=``."""
    token = request.query_params.get("token")
    if not token:
        return authenticate(request)
    claims = services(request).signer.verify_subscribe(token)
    if claims.task_id is not None and claims.task_id != task_id:
        raise WrongTask("this subscribe token is for one other task")
    return claims.tenant


def _last_event_id(request: Request) -> str | None:
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not value:
        return None
    if not _EVENT_ID_RE.match(value):
        raise BadRequest("Last-Event-ID must be an event id this service gave out")
    return value


def _response(svc: Services, events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    return EventSourceResponse(
        events, ping=svc.settings.sse_ping, send_timeout=svc.settings.sse_send_timeout,
        headers={"Cache-Control": "no-store"},
    )


def _sse(event: Event) -> ServerSentEvent:
    return ServerSentEvent(data=event.data.decode(), event=event.kind, id=event.id)


async def _stream(
    svc: Services, tenant: str, task_id: str | None, last: str | None
) -> AsyncIterator[ServerSentEvent]:
    async with svc.hub.subscribe(tenant, task_id) as sub:
        yield ServerSentEvent(comment="receiver", retry=svc.settings.sse_retry_ms)
        sent = event_key(last) if last else (0, 0)
        async for event in _chain(_history(svc, tenant, task_id, last), _live(sub)):
            if event.key <= sent:  # the overlap of history and live
                continue
            yield _sse(event)
            sent = event.key
            if task_id is not None and event.terminal:
                return
        # Cut off (fell behind, or the live subscription dropped): the client's EventSource
        # reconnects with Last-Event-ID and replays what it missed.
        yield ServerSentEvent(comment="cut off: reconnect with Last-Event-ID")


async def _live(sub: Subscription) -> AsyncIterator[Event]:
    while (event := await sub.get()) is not None:
        yield event


async def _chain(*sources: AsyncIterator[Event]) -> AsyncIterator[Event]:
    for source in sources:
        async for event in source:
            yield event


async def _history(
    svc: Services, tenant: str, task_id: str | None, last: str | None
) -> AsyncIterator[Event]:
    redis, keys = svc.redis, svc.store.keys
    stream = keys.history(tenant, task_id) if task_id else keys.stream(tenant)
    if last is None:
        if task_id is not None:  # a new watcher of one task starts from its current state
            for _, fields in await redis.xrevrange(stream, count=1):
                yield Event.from_json(fields[b"data"])
        return
    if await _older_than_retained(svc, stream, last):
        async for event in _snapshots(svc, tenant, task_id):
            yield event
        return
    lower = f"({last}"
    while entries := await redis.xrange(stream, min=lower, count=_CHUNK):
        for _, fields in entries:
            yield Event.from_json(fields[b"data"])
        lower = f"({entries[-1][0].decode()}"


async def _older_than_retained(svc: Services, stream: str, last: str) -> bool:
    """Whether events after ``last`` may have been trimmed away. (MAXLEN trimming leaves
    max-deleted-entry-id alone, so: were entries removed, and is ``last`` before the first
    one kept?)"""
    try:
        info = await svc.redis.xinfo_stream(stream)
    except ResponseError:  # no such stream: nothing was ever trimmed from it
        return False
    if int(info.get("entries-added", 0)) <= int(info["length"]):
        return False
    first = info.get("first-entry")
    first_id = first[0].decode() if first else info["last-generated-id"].decode()
    return event_key(last) < event_key(first_id)


async def _snapshots(svc: Services, tenant: str, task_id: str | None) -> AsyncIterator[Event]:
    """Each task's latest event (the task as it is now), oldest first."""
    keys, redis = svc.store.keys, svc.redis
    if task_id is not None:
        jobs = [task_id]
    else:
        jobs = [j.decode() for j in await redis.zrevrange(
            keys.index(tenant), 0, svc.settings.sse_snapshot_limit - 1)]
    pipe = redis.pipeline(transaction=False)
    for job in jobs:
        pipe.xrevrange(keys.history(tenant, job), count=1)
    latest = [Event.from_json(entries[0][1][b"data"])
              for entries in await pipe.execute() if entries]
    for event in sorted(latest, key=lambda e: e.key):
        yield event
