"""Admission: never more unfinished tasks at a provider account than its limit, and the
account's tenants served in turn.

Each tenant has its queue per account (tasks waiting, NOT_START, scored by creation so its
oldest goes first); the account's turns hold the tenants with tasks waiting, scored by turn;
the slots hold the tasks sent (scored by when, or by when a poll last found the task still
queued at the provider). All are under the account's hash tag. Taking a slot pops the oldest
task of the tenant whose turn it is, and sends that tenant behind the others: round robin,
so a tenant that queues 1,000 tasks delays another's next task by one turn, not by 1,000. A
tenant with nothing waiting joins at the current turn; with ``TENANT_MAX_IN_FLIGHT``, a
tenant holding that many of the account's slots waits, keeping its turn. One script does it
all, so any number of dispatchers can run: a task is popped once, and the slots never
outnumber the limit.

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
from receiver.store.history import HistoryCompactor

# The tenants' queues are named from the turns (the prefix in ARGV): under the account's hash
# tag, on the account's slot of a cluster.
ACQUIRE = """
-- KEYS[1] turns, KEYS[2] slots, KEYS[3] turn, KEYS[4] legacy queue, KEYS[5] in flight
-- ARGV[1] limit, ARGV[2] now in ms, ARGV[3] a tenant's queue key less the tenant,
-- ARGV[4] the slots one tenant may hold (0: no cap)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return false end
local function take(member)
  redis.call('ZADD', KEYS[2], ARGV[2], member)
  redis.call('HINCRBY', KEYS[5], string.match(member, '^(.*)/'), 1)
  return member
end
local taken = redis.call('ZPOPMIN', KEYS[4])
if #taken > 0 then return take(taken[1]) end
local cap, i = tonumber(ARGV[4]), 0
while true do
  local first = redis.call('ZRANGE', KEYS[1], i, i)
  if #first == 0 then return false end
  local tenant = first[1]
  if cap > 0 and (tonumber(redis.call('HGET', KEYS[5], tenant)) or 0) >= cap then
    i = i + 1  -- at its cap: it keeps its turn for when a slot of its own frees
  else
    local queue = ARGV[3] .. tenant
    taken = redis.call('ZPOPMIN', queue)
    if #taken > 0 then
      local turn = redis.call('INCR', KEYS[3])
      if redis.call('ZCARD', queue) > 0 then
        redis.call('ZADD', KEYS[1], turn, tenant)
      else
        redis.call('ZREM', KEYS[1], tenant)
      end
      return take(taken[1])
    end
    redis.call('ZREM', KEYS[1], tenant)  -- its queue emptied by a cancel
  end
end
"""
# Slots freed; then each tenant's count is taken again from the slots themselves (a few dozen
# at most), so a count can never drift: not after a crash, nor after a process of an older
# version freed a slot without counting.
RECOUNT = """
local held = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local tenant = string.match(member, '^(.*)/')
  held[tenant] = (held[tenant] or 0) + 1
end
redis.call('DEL', KEYS[2])
for tenant, n in pairs(held) do redis.call('HSET', KEYS[2], tenant, n) end
"""
FREE = """
-- KEYS[1] slots, KEYS[2] in flight; ARGV: members
if #ARGV > 0 then redis.call('ZREM', KEYS[1], unpack(ARGV)) end
""" + RECOUNT
ENQUEUE = """
-- KEYS[1] slots, KEYS[2] in flight, KEYS[3] the tenant's queue, KEYS[4] turns, KEYS[5] turn
-- ARGV[1] member, ARGV[2] its creation ms, ARGV[3] tenant, ARGV[4] '1': back from the slots
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], 'NX', tonumber(redis.call('GET', KEYS[5]) or '0'), ARGV[3])
if ARGV[4] ~= '1' or redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return end
""" + RECOUNT

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
    def __init__(self, redis: Redis, keys: Keys, publisher: Redis | None = None,
                 tenant_cap: int = 0, history: HistoryCompactor | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # A final task's slot is freed here: its history is compacted again, in case the
        # process that stored the final state died before it could (a no-op otherwise).
        self.history = history
        self.tenant_cap = tenant_cap  # the slots of an account one tenant may hold (0: any)
        # PUBLISH goes through one node (the async cluster client has no PUBLISH)
        self.publisher = publisher or redis
        self._acquire = redis.register_script(ACQUIRE)
        self._enqueue_script = redis.register_script(ENQUEUE)
        self._free = redis.register_script(FREE)

    async def enqueue(self, account: str, member: Member) -> None:
        """Queue the task; its tenant takes a turn if it had none."""
        await self._enqueue(account, member, from_slots=False)
        await self.publisher.publish(self.keys.admission_channel(), account)

    async def acquire(self, account: str, limit: int, now_ms: int) -> Member | None:
        """The oldest waiting task of the tenant whose turn it is (and not at its cap), now
        holding a slot; None when nothing waits or every slot is taken."""
        keys = self.keys
        popped = await self._acquire(
            keys=[keys.turns(account), keys.slots(account), keys.turn(account),
                  keys.legacy_queue(account), keys.in_flight(account)],
            args=[limit, now_ms, keys.queue(account, ""), self.tenant_cap])
        return Member.parse(popped) if popped else None

    async def requeue(self, account: str, member: Member) -> None:
        """Back to its place in its tenant's queue (the provider could not take it yet)."""
        await self._enqueue(account, member, from_slots=True)

    async def _enqueue(self, account: str, member: Member, from_slots: bool) -> None:
        keys = self.keys
        await self._enqueue_script(
            keys=[keys.slots(account), keys.in_flight(account),
                  keys.queue(account, member.tenant), keys.turns(account), keys.turn(account)],
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
        await self._free_slots(account, [str(member)])

    async def _free_slots(self, account: str, members: list[str]) -> None:
        await self._free(keys=[self.keys.slots(account), self.keys.in_flight(account)],
                         args=members)

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
                if status is not None and self.history is not None:
                    self.history.soon(member.tenant, member.job_id)
                if rank is not None and int(rank) == RANK_INFERRED_FAILURE:
                    inferred[str(member)] = now_ms()  # when it left the slots
        if done:
            if inferred:  # watched first: a crash between the two leaves the slot held
                await self.redis.zadd(self.keys.inferred(account), inferred)
            await self._free_slots(account, done)
        return len(held) - len(done)

    async def depth(self, account: str) -> tuple[int, int]:
        """(tasks waiting, slots in use)."""
        by_tenant = await self.waiting(account)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.legacy_queue(account))
            pipe.zcard(self.keys.slots(account))
            legacy, held = await pipe.execute()
        return sum(by_tenant.values()) + int(legacy), int(held)

    async def waiting(self, account: str) -> dict[str, int]:
        """Tasks waiting for the account, by tenant, in the order of their turns."""
        keys = self.keys
        tenants = [t.decode() for t in await self.redis.zrange(keys.turns(account), 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(keys.queue(account, tenant))
            counts = await pipe.execute()
        return {t: int(n) for t, n in zip(tenants, counts, strict=True) if n}
