"""``GET /tasks/{id}/events`` and ``GET /events``: Server-Sent Events, resumable.

A client is first registered with the hub, so live events queue up while history is read;
history is then replayed after Last-Event-ID, from the task's history (its stream, and the
blob a finished task's is compacted into: `receiver.store.history`) or the tenant's stream,
and live events follow, skipping any id already sent. Event ids grow strictly per tenant, so
"already sent" is one comparison: no gap and no duplicate at the switch. An id older than
what the tenant stream still holds gets the current snapshots first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import ResponseError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from receiver.core.errors import BadRequest, Forbidden
from receiver.core.limits import TooManyRequests
from receiver.core.models import TaskStatus, event_key
from receiver.events.hub import Event
from receiver.services.auth import authenticate
from receiver.services.container import Services, services
from receiver.services.http import task_or_404
from receiver.store import history

_EVENT_ID_RE = re.compile(r"^\d{1,15}-\d{1,15}\Z")
_CHUNK = 500  # stream entries read per round trip when replaying
DETACH = "receiver.detach"  # the scope extension of a server that writes live events itself
# Comment lines with no blank line after them: a blank line after a comment makes some
# clients (httpx-sse) dispatch an empty event carrying the last id.
PING = b": ping\r\n"
CUT = b": cut off: reconnect with Last-Event-ID\r\n"


class WrongTask(Forbidden):
    code = "wrong_task"


async def task_events(request: Request) -> Response:
    """``GET /tasks/{id}/events``: one task's events, from its state now to its end."""
    job_id = request.path_params["job_id"]
    tenant = authenticate_events(request, job_id)
    last = _last_event_id(request)
    svc = services(request)
    _reserve(svc, tenant)
    try:
        task = await task_or_404(svc, tenant, job_id)
        if last and TaskStatus(orjson.loads(task)["status"]).terminal:
            latest = await history.latest(svc.redis, svc.store.keys, tenant, job_id)
            if latest and event_key(last) >= event_key(latest[0]):
                # The client has seen the end (an EventSource reconnects by itself after
                # every close); 204 is the standard way to tell it to stop.
                svc.hub.unreserve(tenant)
                return Response(status_code=204)
    except BaseException:
        svc.hub.unreserve(tenant)
        raise
    return _Asgi(EventStream(svc, tenant, job_id, last))


async def tenant_events(request: Request) -> Response:
    """``GET /events``: every event of the tenant, resumed after Last-Event-ID."""
    tenant = authenticate_events(request, None)
    last = _last_event_id(request)
    svc = services(request)
    _reserve(svc, tenant)
    return _Asgi(EventStream(svc, tenant, None, last))


def _reserve(svc: Services, tenant: str) -> None:
    """A place among the tenant's streams, taken before the first await (see
    `EventHub.reserve`); the `EventStream` takes it over."""
    limit = svc.settings.sse_max_per_tenant
    if not svc.hub.reserve(tenant, limit):
        raise TooManyRequests(f"this tenant has {limit} event streams open here already",
                              svc.settings.sse_retry_ms / 1000)


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


class _Asgi(Response):
    """Lets a Starlette endpoint return a raw ASGI response."""

    def __init__(self, app: EventStream) -> None:
        self.app = app
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class EventStream:
    """The SSE response: one loop per client, plus one small task that waits for the
    disconnect; it hands the place `_reserve` took to its subscription. sse-starlette's
    EventSourceResponse (four tasks and their events per client, a cancel scope per send)
    measured 46 KiB and ~258 tracked objects per idle client, and long garbage-collector
    pauses at 10,000 of them (BENCHMARKS.md); this keeps an idle
    client to its subscription, one future and one timer.

    Served by `receiver.server.streams.StreamProtocol` (``receiver serve``), it does less:
    once history is replayed it hands the subscription to the connection (the
    ``receiver.detach`` scope extension) and returns, and the connection writes the live
    events itself."""

    def __init__(self, svc: Services, tenant: str, task_id: str | None, last: str | None):
        self.svc, self.tenant, self.task_id, self.last = svc, tenant, task_id, last

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.svc.settings
        async with self.svc.hub.subscribe(self.tenant, self.task_id, reserved=True) as sub:

            async def until_gone() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                sub.cut()

            gone = asyncio.get_running_loop().create_task(until_gone())
            detached = False
            try:
                await self._send(send, _HEADERS)
                # No blank line: it would end an event with no data, which some clients
                # (fetch-event-source, httpx-sse) hand over as an empty message.
                await self._send(send, b": receiver\r\nretry: %d\r\n" % settings.sse_retry_ms)
                sent = event_key(self.last) if self.last else (0, 0)
                async for event in _history(self.svc, self.tenant, self.task_id, self.last):
                    if sub.cut_off:
                        return
                    sent, done = await self._deliver(send, [event], sent)
                    if done:
                        return
                detach = scope.get("extensions", {}).get(DETACH)
                if detach is not None and not sub.cut_off:
                    detached = detach(self.svc.hub, sub, sent, settings.sse_send_timeout)
                    if detached:
                        return
                while True:
                    await sub.wait(settings.sse_ping)
                    if sub.cut_off:
                        break
                    events = sub.take()
                    if not events:
                        await self._send(send, PING)
                        continue
                    sent, done = await self._deliver(send, events, sent)
                    if done:
                        return
                if not gone.done():  # fell behind, or shutting down: say so, end the response
                    await self._send(send, CUT)
            except TimeoutError:  # a send waited SSE_SEND_TIMEOUT: the client stopped reading
                if not sub.cut_off:  # (else the hub counted it already)
                    self.svc.hub.dropped += 1
            finally:
                gone.cancel()
                if not detached:
                    with contextlib.suppress(Exception):
                        await self._send(send, b"", more=False)

    async def _deliver(self, send: Send, events: list[Event], sent: tuple[int, int]
                       ) -> tuple[tuple[int, int], bool]:
        """Send what is above ``sent`` (history and live overlap); True once a task's
        stream has sent its terminal event."""
        frames = []
        for event in events:
            if event.key <= sent:
                continue
            frames.append(event.frame)
            sent = event.key
            if self.task_id is not None and event.terminal:
                await self._send(send, b"".join(frames))
                return sent, True
        if frames:
            await self._send(send, b"".join(frames))
        return sent, False

    async def _send(self, send: Send, body: bytes | list[tuple[bytes, bytes]],
                    more: bool = True) -> None:
        """A send that blocks (a client that stopped reading) ends the stream in time."""
        async with asyncio.timeout(self.svc.settings.sse_send_timeout):
            if isinstance(body, list):
                await send({"type": "http.response.start", "status": 200, "headers": body})
            else:
                await send({"type": "http.response.body", "body": body, "more_body": more})


_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]


async def _history(
    svc: Services, tenant: str, task_id: str | None, last: str | None
) -> AsyncIterator[Event]:
    redis, keys = svc.redis, svc.store.keys
    stream = keys.history(tenant, task_id) if task_id else keys.stream(tenant)
    if last is None:
        if task_id is not None:  # a new watcher of one task starts from its current state
            latest = await history.latest(redis, keys, tenant, task_id)
            if latest is not None:
                yield Event.from_json(latest[1][b"data"])
        return
    if task_id is not None:  # both parts of a compacted history: what the task stored
        after = event_key(last)
        for entry_id, fields in await history.read(redis, keys, tenant, task_id):
            if event_key(entry_id) > after:
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
    for job in jobs:  # the stream's last entry, then the compacted part (`history.merge`)
        pipe.xrevrange(keys.history(tenant, job), count=1)
        pipe.hmget(keys.task(tenant, job), ["h", "hl"])
    replies = await pipe.execute()
    newest = [history.newest(blob, held, tail)
              for tail, (blob, held) in zip(replies[::2], replies[1::2], strict=True)]
    latest = [Event.from_json(entry[1][b"data"]) for entry in newest if entry is not None]
    for event in sorted(latest, key=lambda e: e.key):
        yield event
