"""Live fan-out: one Redis subscription per process feeds every SSE client of the process.

The hub PSUBSCRIBEs once to every tenant's channel and hands each event to the subscriptions
of its tenant (and task) through bounded queues. A client that falls a queue behind is cut
off rather than allowed to grow memory or slow the others; so is every client when the
subscription itself drops, since pub/sub would silently skip what was published meanwhile.
Either way the client reconnects with Last-Event-ID and replays from the stream, which
keeps every event (see `sse`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from receiver.constants import Keys
from receiver.models import EVENT_OF_STATUS, TaskStatus

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset(EVENT_OF_STATUS[s].value for s in TaskStatus if s.terminal)


def event_key(event_id: str) -> tuple[int, int]:
    """Event ids (``ms-seq``) in their order."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True)
class Event:
    id: str
    kind: str
    task_id: str
    data: bytes

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        doc = orjson.loads(data)
        return cls(doc["event_id"], doc["event"], doc["id"], data)

    @property
    def key(self) -> tuple[int, int]:
        return event_key(self.id)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_EVENTS


class Subscription:
    """One client's bounded queue of live events."""

    def __init__(self, tenant: str, task_id: str | None, limit: int) -> None:
        self.tenant = tenant
        self.task_id = task_id
        self.limit = limit
        self.cut_off = False  # fell behind, or the hub lost its subscription
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()

    def push(self, event: Event) -> None:
        if self.task_id is not None and event.task_id != self.task_id:
            return
        if len(self._items) >= self.limit:
            self.cut_off = True
        else:
            self._items.append(event)
        self._ready.set()

    def cut(self) -> None:
        self.cut_off = True
        self._ready.set()

    async def get(self) -> Event | None:
        """The next event, or None once this client is cut off."""
        while not self._items and not self.cut_off:
            self._ready.clear()
            await self._ready.wait()
        return None if self.cut_off else self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class EventHub:
    def __init__(self, redis: Redis, keys: Keys, queue_limit: int = 1000) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_limit = queue_limit
        self.subscriptions: dict[str, set[Subscription]] = {}
        self.dropped = 0  # clients cut off for falling behind
        self._runner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="event-hub")

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for subs in self.subscriptions.values():
            for sub in subs:
                sub.cut()

    @asynccontextmanager
    async def subscribe(self, tenant: str, task_id: str | None = None
                        ) -> AsyncIterator[Subscription]:
        sub = Subscription(tenant, task_id, self.queue_limit)
        self.subscriptions.setdefault(tenant, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self.subscriptions.get(tenant)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.subscriptions[tenant]

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

    async def _run(self) -> None:
        pattern = self.keys.channel("*")  # receiver:events:{*}; braces are literal in globs
        head = len(self.keys.channel("")) - 1  # the tenant sits between "…:{" and "}"
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=None)
                    if message is None or message["type"] != "pmessage":
                        continue
                    channel: bytes = message["channel"]
                    self.deliver(channel[head:-1].decode(), message["data"])
            except asyncio.CancelledError:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except Exception as exc:  # the subscription is gone: events may have been missed
                log.warning("event subscription lost (%r); cutting off live clients", exc)
                for subs in self.subscriptions.values():
                    for sub in subs:
                        sub.cut()
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
