"""The archive's bookkeeping in Redis: which tasks' images are still to be kept, and until
when each kept image is needed.

Any number of workers share both. A task is taken with a lease (its score pushed ahead), so a
worker that dies mid-archive leaves it to another once the lease runs out; a task archived
twice is one transition (the script compares). An image is stored and deleted under one lock
per image, so a sweep that finds it expired cannot delete it while an archive (of another
task with the same bytes) is extending it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from redis.asyncio import Redis

from receiver.core.constants import Keys
from receiver.core.models import now_ms

# One more attempt at a task, counted in its hash while it exists (0 once it has expired:
# a count alone would make a hash that never expires).
_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'ia', 1)
"""
# Take a tenant's due tasks, up to ARGV[3]: each pushed a lease ahead (ARGV[2]), atomically.
_TAKE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, job in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], job) end
return due
"""


class Pending(NamedTuple):
    tenant: str
    job_id: str


class ArchiveQueue:
    """The tenants' succeeded tasks whose images are still to be archived (`Keys.archive`,
    filled by the transition script)."""

    def __init__(self, redis: Redis, keys: Keys, lease: float = 120.0) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ms = int(lease * 1000)
        self._take = redis.register_script(_TAKE)
        self._attempt = redis.register_script(_ATTEMPT)
        self._first = 0  # which tenant is looked at first: each in turn

    async def take(self, tenants: Iterable[str], limit: int = 16) -> list[Pending]:
        """Up to ``limit`` due tasks of ``tenants``, each now this worker's for a lease; the
        tenants are looked at from a different one each time, so none waits behind
        another's backlog."""
        tenants = list(tenants)
        if not tenants:
            return []
        self._first = (self._first + 1) % len(tenants)
        tenants = tenants[self._first:] + tenants[:self._first]
        now = now_ms()
        taken: list[Pending] = []
        for tenant in tenants:
            jobs = await self._take(keys=[self.keys.archive(tenant)],
                                    args=[now, now + self.lease_ms, limit - len(taken)])
            taken += (Pending(tenant, job.decode()) for job in jobs)
            if len(taken) >= limit:
                break
        return taken

    async def attempt(self, item: Pending) -> int:
        """Count one more attempt at the task (kept in its hash, gone with it); 0 if the
        task has expired."""
        return int(await self._attempt(keys=[self.keys.task(item.tenant, item.job_id)]))

    async def retry(self, item: Pending, delay: float) -> None:
        """Due again in ``delay`` seconds."""
        await self.redis.zadd(self.keys.archive(item.tenant),
                              {item.job_id: now_ms() + int(delay * 1000)}, xx=True)

    async def done(self, item: Pending) -> None:
        """Archived, or given up: off the queue."""
        await self.redis.zrem(self.keys.archive(item.tenant), item.job_id)


class ImageLedger:
    """Until when each kept image is needed (`Keys.images`), and the lock of each image."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def keep(self, name: str, seconds: float,
                   store: Callable[[], Awaitable[object]]) -> None:
        """Need ``name`` for ``seconds`` more (at least), and ``store`` it, under its lock:
        the extension is written before the object, so a sweep never deletes it after."""
        async with self.redis.lock(self.keys.image_lock(name), timeout=120,
                                   blocking_timeout=30):
            await self.redis.zadd(self.keys.images(), {name: now_ms() + int(seconds * 1000)},
                                  gt=True)
            await store()

    async def expired(self, limit: int = 100) -> list[str]:
        """Images no task needs any more, oldest first."""
        names = await self.redis.zrangebyscore(self.keys.images(), "-inf", now_ms(),
                                               start=0, num=limit)
        return [name.decode() for name in names]

    async def forget(self, name: str, delete: Callable[[str], Awaitable[None]]) -> bool:
        """``delete`` the image and its entry if it is still expired (an archive may have
        extended it meanwhile); False if it was not (or another worker holds its lock)."""
        lock = self.redis.lock(self.keys.image_lock(name), timeout=120)
        if not await lock.acquire(blocking=False):
            return False
        try:
            until = await self.redis.zscore(self.keys.images(), name)
            if until is None or until > now_ms():
                return False
            await delete(name)
            await self.redis.zrem(self.keys.images(), name)
            return True
        finally:
            await lock.release()
