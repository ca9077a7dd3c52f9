"""A prototype for ``bench.sse`` only: the receiver's live ``GET /events`` without sse-starlette.

Not part of the service. It shows what an SSE connection could cost in one uvicorn worker if
the receiver served its live stream with a bare ASGI loop instead of sse-starlette's
``EventSourceResponse`` (a task group of four anyio tasks per connection, each with its own
Event, a cancel scope around every send, and every event re-encoded per subscriber):

- dispatched before Starlette's middleware and routing, as the callback fast path is;
- one loop per connection, plus one small task that waits for the disconnect;
- the subscription's queue is a list made on demand, its wake-up a bare future, and the
  ping a timer armed only while the connection is idle;
- each event's SSE bytes are built once and shared by every subscriber;
- a send that blocks is bounded by ``asyncio.timeout`` (a timer) instead of anyio's scope.

It uses the receiver's own `EventHub` (one PSUBSCRIBE per process) and handles only the
live tenant stream in open mode: a request with ``Last-Event-ID`` or ``?token=``, or any
other route, goes to the receiver's app unchanged.

Run with ``uvicorn bench.lean_sse:create_app --factory`` (the receiver's environment).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from receiver.app import create_app as create_receiver_app
from receiver.events import Event
from receiver.services import Services
from receiver.settings import DEFAULT_TENANT, is_loopback

_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
_PING = b": ping\r\n\r\n"
_CUT_OFF = b": cut off: reconnect with Last-Event-ID\r\n\r\n"


class LeanSubscription:
    """What `EventHub.deliver` and `EventHub.close` call (``push``, ``cut``, ``cut_off``),
    with nothing allocated while idle but the object itself."""

    __slots__ = ("cut_off", "items", "limit", "task_id", "tenant", "waiter")

    def __init__(self, tenant: str, limit: int) -> None:
        self.tenant = tenant
        self.task_id: str | None = None
        self.limit = limit
        self.cut_off = False
        self.items: list[Event] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: Event) -> None:
        if self.items is None:
            self.items = [event]
        elif len(self.items) >= self.limit:
            self.cut_off = True
        else:
            self.items.append(event)
        self.wake()

    def cut(self) -> None:
        self.cut_off = True
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


@lru_cache(maxsize=256)
def frame(event_id: str, kind: str, data: bytes) -> bytes:
    """One event's SSE bytes, built once for all its subscribers (data is one JSON line)."""
    return b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (event_id.encode(), kind.encode(), data)


class LeanEvents:
    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc: Services | None = getattr(self.app.state, "services", None)
        if (scope["type"] != "http" or scope["path"] != "/events" or scope["method"] != "GET"
                or svc is None or not svc.settings.open_mode
                or not is_loopback((scope.get("client") or ("", 0))[0])
                or b"token=" in scope["query_string"] or b"last_event_id" in scope["query_string"]
                or any(name == b"last-event-id" for name, _ in scope["headers"])):
            await self.app(scope, receive, send)
            return
        await self.stream(svc, receive, send)

    async def stream(self, svc: Services, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        hub, settings = svc.hub, svc.settings
        sub = LeanSubscription(DEFAULT_TENANT, settings.sse_queue_limit)
        subs = hub.subscriptions.setdefault(DEFAULT_TENANT, set())
        subs.add(sub)  # type: ignore[arg-type]  # duck-typed: push, cut, cut_off

        async def until_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = loop.create_task(until_gone())
        gone.add_done_callback(lambda _: sub.cut())
        try:
            async with asyncio.timeout(settings.sse_send_timeout):
                await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                await send({"type": "http.response.body", "more_body": True,
                            "body": b": receiver\r\nretry: %d\r\n\r\n" % settings.sse_retry_ms})
            while True:
                if not sub.items and not sub.cut_off:
                    sub.waiter = loop.create_future()
                    timer = loop.call_later(settings.sse_ping, sub.wake)
                    try:
                        await sub.waiter
                    finally:
                        timer.cancel()
                        sub.waiter = None
                if sub.cut_off:
                    break
                items, sub.items = sub.items, None
                body = b"".join(frame(e.id, e.kind, e.data) for e in items) if items else _PING
                async with asyncio.timeout(settings.sse_send_timeout):
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            if not gone.done():  # fell behind: say so, and end the response
                async with asyncio.timeout(settings.sse_send_timeout):
                    await send({"type": "http.response.body", "body": _CUT_OFF})
        finally:
            gone.cancel()
            subs.discard(sub)
            if not subs:
                hub.subscriptions.pop(DEFAULT_TENANT, None)


def create_app() -> LeanEvents:
    return LeanEvents(create_receiver_app())
