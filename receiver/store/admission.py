"""Admission: never more unfinished tasks at a provider account than its limit.

Two sorted sets per account, under the account's hash tag: the queue (tasks waiting, NOT_START,
scored by creation so the oldest goes first) and the slots (tasks sent, scored by when, or by
when a poll last found the task still queued at the provider). Taking
a slot and popping the oldest task is one script, so any number of dispatchers can run: a task
is popped once, and the slots never outnumber the limit.

A slot is released by the task's own final transition, not by whoever sent it: the holders are
pruned by reading each one's status (a final or vanished task frees its slot). So a worker that
dies mid-task leaks nothing; the transition script publishes the account on the admission
channel when such a task ends, to wake the dispatchers at once.
"""

from __future__ import annotations

from typing import NamedTuple

from redis.asyncio import Redis

from receiver.core.constants import Keys
from receiver.core.models import RANK_INFERRED_FAILURE, TaskStatus, now_ms

ACQUIRE = """
-- KEYS[1] queue, KEYS[2] slots; ARGV[1] limit, ARGV[2] now in ms
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return false end
local oldest = redis.call('ZPOPMIN', KEYS[1])
if #oldest == 0 then return false end
redis.call('ZADD', KEYS[2], ARGV[2], oldest[1])
return oldest[1]
"""

_FINAL = {s.value.encode() for s in TaskStatus if s.terminal}


class Member(NamedTuple):
    """A task in a queue or a slot: ``tenant/job``."""

    tenant: str
    job_id: str

    @classmethod
    def parse(cls, raw: bytes | str) -> Member:
        text = raw.decode() if isinstance(raw, bytes) else raw
        tenant, _, job_id = text.rpartition("/")
        return cls(tenant, job_id)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.job_id}"

    @property
    def created_ms(self) -> int:
        """Job ids start with their creation time: the queue's order."""
        return int(self.job_id[:12], 16)


class Admission:
    def __init__(self, redis: Redis, keys: Keys, publisher: Redis | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # PUBLISH goes through one node (the async cluster client has no PUBLISH)
        self.publisher = publisher or redis
        self._acquire = redis.register_script(ACQUIRE)

    async def enqueue(self, account: str, member: Member) -> None:
        await self.redis.zadd(self.keys.queue(account), {str(member): member.created_ms},
                              nx=True)
        await self.publisher.publish(self.keys.admission_channel(), account)

    async def acquire(self, account: str, limit: int, now_ms: int) -> Member | None:
        """The oldest waiting task, now holding a slot; None when the queue is empty or every
        slot is taken."""
        popped = await self._acquire(
            keys=[self.keys.queue(account), self.keys.slots(account)], args=[limit, now_ms])
        return Member.parse(popped) if popped else None

    async def requeue(self, account: str, member: Member) -> None:
        """Back to its place in the queue (the provider could not take it yet)."""
        async with self.redis.pipeline(transaction=True) as pipe:  # one slot: atomic
            pipe.zrem(self.keys.slots(account), str(member))
            pipe.zadd(self.keys.queue(account), {str(member): member.created_ms})
            await pipe.execute()

    async def withdraw(self, account: str, member: Member) -> bool:
        """Take a task out of the queue before any dispatcher pops it; False when it is no
        longer there (being sent, or sent)."""
        return bool(await self.redis.zrem(self.keys.queue(account), str(member)))

    async def release(self, account: str, member: Member) -> None:
        """Free the slot of a task the provider refused (it never reached its queue)."""
        await self.redis.zrem(self.keys.slots(account), str(member))

    async def holders(self, account: str) -> list[tuple[Member, int]]:
        """Tasks holding a slot, with when they were sent or last found queued (ms)."""
        pairs = await self.redis.zrange(self.keys.slots(account), 0, -1, withscores=True)
        return [(Member.parse(m), int(score)) for m, score in pairs]

    async def prune(self, account: str) -> int:
        """Free the slots of tasks that are final (or gone); the ones we failed ourselves go
        to the inferred set, polled a while longer. Returns the slots still in use."""
        held = await self.holders(account)
        if not held:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for member, _ in held:
                pipe.hmget(self.keys.task(member.tenant, member.job_id), ["r", "s"])
            states = await pipe.execute()
        done, inferred = [], {}
        for (member, _), (rank, status) in zip(held, states, strict=True):
            if status is None or status in _FINAL:
                done.append(str(member))
                if rank is not None and int(rank) == RANK_INFERRED_FAILURE:
                    inferred[str(member)] = now_ms()  # when it left the slots
        if done:
            async with self.redis.pipeline(transaction=True) as pipe:
                if inferred:
                    pipe.zadd(self.keys.inferred(account), inferred)
                pipe.zrem(self.keys.slots(account), *done)
                await pipe.execute()
        return len(held) - len(done)

    async def depth(self, account: str) -> tuple[int, int]:
        """(tasks waiting, slots in use)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.queue(account))
            pipe.zcard(self.keys.slots(account))
            waiting, held = await pipe.execute()
        return int(waiting), int(held)
