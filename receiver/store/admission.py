"""Admission: never more unfinished tasks at a provider account than its limit, and the
account's tenants served in turn.

Each tenant has its queue per account (tasks waiting, NOT_START, scored by creation so its
oldest goes first); the account's turns hold the tenants with tasks waiting, scored by turn;
the slots hold the tasks sent (scored by when, or by when a poll last found the task still
queued at the provider). All are under the account's hash tag. Taking a slot pops the oldest
task of the tenant whose turn it is, and sends that tenant behind the others: round robin,
so a tenant that queues 1,000 tasks delays another's next task by one turn, not by 1,000. A
tenant with nothing waiting joins at the current turn. One script does it all, so any
number of dispatchers can run: a task is popped once, and the slots never outnumber the
limit.

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

# The tenants' queues are named from the turns (the prefix in ARGV): under the account's hash
# tag, on the account's slot of a cluster.
ACQUIRE = """
-- KEYS[1] turns, KEYS[2] slots, KEYS[3] turn, KEYS[4] legacy queue
-- ARGV[1] limit, ARGV[2] now in ms, ARGV[3] a tenant's queue key, less the tenant
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return false end
local taken = redis.call('ZPOPMIN', KEYS[4])
if #taken > 0 then
  redis.call('ZADD', KEYS[2], ARGV[2], taken[1])
  return taken[1]
end
while true do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then return false end
  local queue = ARGV[3] .. first[1]
  taken = redis.call('ZPOPMIN', queue)
  if #taken > 0 then
    local turn = redis.call('INCR', KEYS[3])
    if redis.call('ZCARD', queue) > 0 then
      redis.call('ZADD', KEYS[1], turn, first[1])
    else
      redis.call('ZREM', KEYS[1], first[1])
    end
    redis.call('ZADD', KEYS[2], ARGV[2], taken[1])
    return taken[1]
  end
  redis.call('ZREM', KEYS[1], first[1])  -- its queue emptied by a cancel
end
"""
ENQUEUE = """
-- KEYS[1] the tenant's queue, KEYS[2] turns, KEYS[3] turn, KEYS[4] slots
-- ARGV[1] member, ARGV[2] its creation ms, ARGV[3] tenant, ARGV[4] '1': from the slots
if ARGV[4] == '1' then redis.call('ZREM', KEYS[4], ARGV[1]) end
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], 'NX', tonumber(redis.call('GET', KEYS[3]) or '0'), ARGV[3])
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
        self._enqueue_script = redis.register_script(ENQUEUE)

    async def enqueue(self, account: str, member: Member) -> None:
        """Queue the task; its tenant takes a turn if it had none."""
        await self._enqueue(account, member, from_slots=False)
        await self.publisher.publish(self.keys.admission_channel(), account)

    async def acquire(self, account: str, limit: int, now_ms: int) -> Member | None:
        """The oldest waiting task of the tenant whose turn it is, now holding a slot; None
        when nothing waits or every slot is taken."""
        keys = self.keys
        popped = await self._acquire(
            keys=[keys.turns(account), keys.slots(account), keys.turn(account),
                  keys.legacy_queue(account)],
            args=[limit, now_ms, keys.queue(account, "")])
        return Member.parse(popped) if popped else None

    async def requeue(self, account: str, member: Member) -> None:
        """Back to its place in its tenant's queue (the provider could not take it yet)."""
        await self._enqueue(account, member, from_slots=True)

    async def _enqueue(self, account: str, member: Member, from_slots: bool) -> None:
        keys = self.keys
        await self._enqueue_script(
            keys=[keys.queue(account, member.tenant), keys.turns(account), keys.turn(account),
                  keys.slots(account)],
            args=[str(member), member.created_ms, member.tenant, "1" if from_slots else "0"])

    async def withdraw(self, account: str, member: Member) -> bool:
        """Take a task out of the queue before any dispatcher pops it; False when it is no
        longer there (being sent, or sent). (A tenant left with nothing waiting loses its
        turn at the next `acquire`.)"""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.queue(account, member.tenant), str(member))
            pipe.zrem(self.keys.legacy_queue(account), str(member))
            removed = await pipe.execute()
        return any(removed)

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
        keys = self.keys
        tenants = await self.redis.zrange(keys.turns(account), 0, -1)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.slots(account))
            pipe.zcard(keys.legacy_queue(account))
            for tenant in tenants:
                pipe.zcard(keys.queue(account, tenant.decode()))
            held, *waiting = await pipe.execute()
        return sum(int(n) for n in waiting), int(held)

    async def waiting(self, account: str) -> dict[str, int]:
        """Tasks waiting for the account, by tenant, in the order of their turns."""
        keys = self.keys
        tenants = [t.decode() for t in await self.redis.zrange(keys.turns(account), 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(keys.queue(account, tenant))
            counts = await pipe.execute()
        return {t: int(n) for t, n in zip(tenants, counts, strict=True) if n}
