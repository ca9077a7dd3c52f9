"""Live fan-out: one Redis subscription per process feeds every SSE client of the process.

The hub subscribes (on one connection) to the channels of the tenants it has clients of,
and hands each event to the subscriptions of its tenant (and task) through bounded queues.
A client that falls a queue behind is cut off rather than allowed to grow memory or slow
the others; so is every client when the subscription itself drops, since pub/sub would
silently skip what was published meanwhile. Either way the client reconnects with
Last-Event-ID and replays from the stream, which keeps every event (see `receiver.live.sse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from receiver.core.constants import Keys
from receiver.core.models import TERMINAL_EVENTS, event_key

log = logging.getLogger(__name__)

@dataclass(slots=True)
class Event:
    id: str
    kind: str
    task_id: str
    data: bytes
    # Worked out once per event, not once per subscriber (1,000 of them in a fan-out):
    frame: bytes  # the SSE bytes every subscriber is sent (data is one JSON line)
    chunk: bytes  # the frame as one HTTP/1.1 chunk (``receiver serve``'s streams are chunked)
    key: tuple[int, int]  # the id, in order
    terminal: bool  # a final state's event

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        doc = orjson.loads(data)
        event_id, kind = doc["event_id"], doc["event"]
        frame = b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (
            event_id.encode(), kind.encode(), data)
        return cls(event_id, kind, doc["id"], data, frame, chunked(frame),
                   event_key(event_id), kind in TERMINAL_EVENTS)


def chunked(data: bytes) -> bytes:
    """``data`` as one chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Sink(Protocol):
    """A connection that writes a subscription's events itself, with no task waiting on
    the subscription (`receiver.server.streams.StreamProtocol`)."""

    def deliver(self, event: Event) -> None: ...
    def cut(self) -> None: ...
    def ping(self) -> None: ...


class Subscription:
    """One client's bounded queue of live events, or, once a connection has taken it
    over, the hand-off of each event to that connection's `Sink`.

    Idle, it holds no list and no future: with thousands of idle SSE clients per process,
    every object per connection is memory and garbage-collector work (BENCHMARKS.md).
    """

    __slots__ = ("cut_off", "items", "limit", "sink", "task_id", "tenant", "waiter")

    def __init__(self, tenant: str, task_id: str | None, limit: int) -> None:
        self.tenant = tenant
        self.task_id = task_id
        self.limit = limit
        self.cut_off = False  # fell behind, the hub lost its subscription, or shutdown
        self.items: list[Event] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: Sink | None = None

    def push(self, event: Event) -> None:
        if self.task_id is not None and event.task_id != self.task_id:
            return
        if self.sink is not None:
            self.sink.deliver(event)
        elif self.items is None:
            self.items = [event]
        elif len(self.items) >= self.limit:
            self.cut_off = True
        else:
            self.items.append(event)
        self.wake()

    def cut(self) -> None:
        if self.cut_off:
            return
        self.cut_off = True
        if self.sink is not None:
            self.sink.cut()
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until there are events, this client is cut off, or ``timeout`` passes."""
        if self.items or self.cut_off:
            return
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout, self.wake)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> list[Event]:
        items, self.items = self.items or [], None
        return items


class EventHub:
    """Subscribes to a tenant's channel while this process has clients of that tenant, so a
    process without SSE clients receives no events at all (every event costs the reader
    a parse: with a subscription to every tenant, callback intake slowed by a fifth)."""

    def __init__(self, redis: Redis, keys: Keys, queue_limit: int = 1000,
                 ping_interval: float = 15.0) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_limit = queue_limit
        self.ping_interval = ping_interval  # for the clients whose connection is their Sink
        self.subscriptions: dict[str, set[Subscription]] = {}
        # tenant -> places taken by requests not yet subscribed (see `reserve`)
        self.reserved: dict[str, int] = {}
        self.dropped = 0  # clients cut off for falling behind
        self.closing = False  # shutting down: new streams end at once
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()
        # tenant -> confirmation of its channel's latest SUBSCRIBE
        self._listening: dict[str, asyncio.Future[None]] = {}
        # channel -> confirmations awaited, oldest first (Redis confirms in order)
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name="event-hub-tick")

    async def close(self) -> None:
        for task in (self._reader, self._ticker, *self._unsubscribing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.cut_all()
        await self._drop_pubsub(ConnectionError("the hub closed"))

    def cut_all(self) -> None:
        for subs in self.subscriptions.values():
            for sub in subs:
                sub.cut()

    async def _tick(self) -> None:
        """Pings the clients that have no task of their own to do it, until the process
        stops streaming (`stop_streams`)."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self.ping_interval
        while not self.closing:
            await asyncio.sleep(0.5)
            if loop.time() >= next_ping:
                next_ping = loop.time() + self.ping_interval
                for subs in list(self.subscriptions.values()):
                    for sub in list(subs):
                        if sub.sink is not None:
                            sub.sink.ping()

    def stop_streams(self) -> None:
        """The server is stopping: every stream is cut off now (its client reconnects to
        another process with Last-Event-ID), and a new one ends at once. Streams never end
        by themselves, and uvicorn waits for every response before it stops: its protocols
        call this (`receiver.core.lifespan`), each connection once: only the first call
        cuts (10,000 connections, each walking every stream, took seconds)."""
        if self.closing:
            return
        self.closing = True
        self.cut_all()

    def reserve(self, tenant: str, limit: int) -> bool:
        """Takes one of the tenant's ``limit`` places (0: no limit) before the request awaits
        anything, or False if all are taken. Counting subscriptions alone raced: thousands of
        requests passed the check while each awaited its task's lookup. The place is handed
        to the subscription (``subscribe(..., reserved=True)``) or given back (`unreserve`)."""
        held = self.reserved.get(tenant, 0)
        if limit and held + len(self.subscriptions.get(tenant, ())) >= limit:
            return False
        self.reserved[tenant] = held + 1
        return True

    def unreserve(self, tenant: str) -> None:
        held = self.reserved.get(tenant, 0) - 1
        if held > 0:
            self.reserved[tenant] = held
        else:
            self.reserved.pop(tenant, None)

    @asynccontextmanager
    async def subscribe(self, tenant: str, task_id: str | None = None, reserved: bool = False
                        ) -> AsyncIterator[Subscription]:
        """A client's subscription, live once this returns: what is published later reaches
        it; what was published before is in the stream, which the caller reads next.
        ``reserved``: the caller holds a place from `reserve`, which this takes over."""
        sub = Subscription(tenant, task_id, self.queue_limit)
        if self.closing:
            sub.cut()
        self.subscriptions.setdefault(tenant, set()).add(sub)
        if reserved:
            self.unreserve(tenant)
        try:
            await self._listen(tenant)
            yield sub
        finally:
            if sub.sink is None and self._forget(sub):  # a Sink releases it when it closes
                await self._unlisten(tenant)

    def release(self, sub: Subscription) -> None:
        """Ends a subscription that a `Sink` took over (from its connection_lost)."""
        if self._forget(sub):
            task = asyncio.get_running_loop().create_task(self._unlisten(sub.tenant))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    def _forget(self, sub: Subscription) -> bool:
        """Whether that was the tenant's last client here (its channel is left next)."""
        subs = self.subscriptions.get(sub.tenant)
        if subs is None:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self.subscriptions[sub.tenant]
        self._listening.pop(sub.tenant, None)
        return True

    def client_count(self) -> int:
        return sum(map(len, self.subscriptions.values()))

    def deliver(self, tenant: str, data: bytes) -> None:
        subs = self.subscriptions.get(tenant)
        if not subs:
            return
        event = Event.from_json(data)
        for sub in subs:
            was_cut = sub.cut_off
            sub.push(event)
            if sub.cut_off and not was_cut:
                self.dropped += 1

    async def _listen(self, tenant: str) -> None:
        confirmed = self._listening.get(tenant)
        if confirmed is None:
            if self._pubsub is None:
                self._pubsub = self.redis.pubsub()
            channel = self.keys.channel(tenant).encode()
            confirmed = asyncio.get_running_loop().create_future()
            self._listening[tenant] = confirmed
            self._confirms.setdefault(channel, deque()).append(confirmed)
            try:
                await self._pubsub.subscribe(channel)
            except Exception:
                self._listening.pop(tenant, None)
                raise
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(self._pubsub), name="event-hub")
        await asyncio.wait_for(asyncio.shield(confirmed), 10)

    async def _unlisten(self, tenant: str) -> None:
        if tenant in self.subscriptions:  # a new client came first and listens again
            return
        if self._pubsub is not None:
            with contextlib.suppress(Exception):  # a lost connection unsubscribed it anyway
                await self._pubsub.unsubscribe(self.keys.channel(tenant))

    async def _read(self, pubsub: PubSub) -> None:
        head = len(self.keys.channel("")) - 1  # the tenant sits between "…:{" and "}"
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind == "message":
                    self.deliver(channel[head:-1].decode(), message["data"])
                elif kind == "subscribe":
                    waiting = self._confirms.get(channel)
                    if waiting:
                        future = waiting.popleft()
                        if not future.done():
                            future.set_result(None)
                        if not waiting:
                            del self._confirms[channel]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the subscription is gone: events may have been missed
            log.warning("event subscription lost (%r); cutting off live clients", exc)
            self.cut_all()  # they reconnect (to a new subscription) and replay the stream
            await self._drop_pubsub(exc)

    async def _drop_pubsub(self, error: Exception) -> None:
        pubsub, self._pubsub = self._pubsub, None
        for waiting in self._confirms.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(error)
        self._confirms.clear()
        self._listening.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
