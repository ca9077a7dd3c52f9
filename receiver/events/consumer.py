"""Read a tenant's events through a Redis consumer group, for services that must not miss one.

    consumer = EventConsumer(redis, tenant="acme", group="billing", name="billing-1")
    async for event in consumer:
        await handle(event.task)        # your work
        await consumer.ack(event)       # or it is delivered again

Each event goes to one consumer of the group and stays pending until acknowledged. A
consumer that restarts under the same name first gets what it had not acknowledged; events
left pending by a consumer that died are claimed by a live one after ``claim_idle_ms``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from receiver.core.constants import DEFAULT_PREFIX, Keys


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: str  # the event id (= the stream entry id)
    kind: str  # task.created, task.progress, ...
    task: dict[str, Any]  # the task snapshot after the transition

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEvent:
        entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return cls(entry, fields[b"event"].decode(), orjson.loads(fields[b"data"]))


class EventConsumer:
    def __init__(
        self, redis: Redis, tenant: str, group: str, name: str, *,
        prefix: str = DEFAULT_PREFIX, start: str = "$", block_ms: int = 5000,
        claim_idle_ms: int = 60_000, count: int = 100,
    ) -> None:
        self.redis = redis
        self.stream = Keys(prefix).stream(tenant)
        self.group, self.name = group, name
        self.start = start  # where a new group starts: "$" new events only, "0" everything
        self.block_ms, self.claim_idle_ms, self.count = block_ms, claim_idle_ms, count
        self._ready = False
        self._own_pending = True  # first, what this name left unacknowledged

    async def read(self) -> list[StreamEvent]:
        """The next batch: own pending, then abandoned ones, then new ones (blocking)."""
        if not self._ready:
            await self._create_group()
        if self._own_pending:
            entries = await self._read_group("0", block=None)
            if entries:
                return entries
            self._own_pending = False
        _, claimed, *_ = await self.redis.xautoclaim(
            self.stream, self.group, self.name, self.claim_idle_ms, "0-0", count=self.count
        )
        if claimed:
            return [StreamEvent.from_entry(i, f) for i, f in claimed if f]
        return await self._read_group(">", block=self.block_ms)

    async def ack(self, *events: StreamEvent) -> None:
        if events:
            await self.redis.xack(self.stream, self.group, *(e.id for e in events))

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        while True:
            for event in await self.read():
                yield event

    async def _read_group(self, position: str, block: int | None) -> list[StreamEvent]:
        reply = await self.redis.xreadgroup(
            self.group, self.name, {self.stream: position}, count=self.count, block=block
        )
        return [StreamEvent.from_entry(i, f) for _, entries in reply or [] for i, f in entries
                if f]

    async def _create_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, self.start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True
