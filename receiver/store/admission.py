"""Admission: never more unfinished tasks at a provider account than its limit, the pool's
tenants served in turn, each task sent by the account that suits it best.

A pool is a provider's accounts. Each tenant has its queue per pool (tasks waiting,
NOT_START, scored by creation so its oldest goes first); the pool's turns hold the tenants
with tasks waiting, scored by turn; each account's slots hold the tasks it sent (scored by
when, or by when a poll last found the task still queued at the provider). All are under the
pool's hash tag. Taking a slot looks at the oldest task of the tenant whose turn it is and
picks, among the accounts not paused (`Keys.health`) with a free slot that serve its mode
(only its parent's account for an action: the provider knows the parent there alone), the
least loaded for its limit and weight; the tenant goes behind the others: round robin,
so a tenant that queues 1,000 tasks delays another's next task by one turn, not by 1,000. A
tenant with nothing waiting joins at the current turn. A tenant whose oldest task no account
can take now (its parent's account full, its mode's accounts full, or ``TENANT_MAX_IN_FLIGHT``
of an account's slots held) waits, keeping its turn. One script does it all, so any number of
dispatchers can run: a task is popped once, and no account's slots outnumber its limit.

A slot is released by the task's own final transition, not by whoever sent it: the holders are
pruned by reading each one's status (a final or vanished task frees its slot). So a worker that
dies mid-task leaks nothing; the transition script publishes the account on the admission
channel when such a task ends, to wake the dispatchers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from redis.asyncio import Redis

from receiver.core.constants import Keys
from receiver.core.models import RANK_INFERRED_FAILURE, TaskStatus, now_ms
from receiver.store.history import HistoryCompactor

# The tenants' queues are named from the turns (the prefix in ARGV): under the pool's hash
# tag, on the pool's slot of a cluster, as are its accounts' slots, counts and health.
ACQUIRE = """
-- KEYS[1] turns, KEYS[2] turn, KEYS[3] legacy queue, KEYS[4] routes; then per account
-- (ARGV[4] of them) its slots, in flight and health: KEYS[4 + 3(i-1) + 1..3]
-- ARGV[1] now in ms, ARGV[2] a tenant's queue key less the tenant, ARGV[3] the slots one
-- tenant may hold at one account (0: no cap), ARGV[4] accounts; then per account its name,
-- limit, weight and modes (',FAST,RELAX,'; ',,': none, only a task with no mode; '': any)
local now, cap, n = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local LOOK_AHEAD = 8
local names, limits, weights, modes, used, open = {}, {}, {}, {}, {}, {}
local any_open = false
for i = 1, n do
  local a = 4 + 4 * (i - 1)
  names[i], limits[i], weights[i], modes[i] =
    ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  used[i] = redis.call('ZCARD', KEYS[4 + 3 * (i - 1) + 1])
  local paused = tonumber(redis.call('HGET', KEYS[4 + 3 * (i - 1) + 3], 'paused_until'))
  open[i] = used[i] < limits[i] and not (paused and paused > now)
  any_open = any_open or open[i]
end
if not any_open then return false end
-- The account for a task of `tenant` with route 'mode\taffinity': among the open ones that
-- serve its mode (only its affinity, if it has one), the least loaded for its limit and
-- weight; nil if none is free now; 0 if no account of the pool could ever take it (its
-- affinity's account is gone, or no account serves its mode).
local function choose(tenant, route)
  local tab = string.find(route, '\t', 1, true)
  local mode, affinity = '', ''
  if tab then mode, affinity = string.sub(route, 1, tab - 1), string.sub(route, tab + 1) end
  local best, best_load, possible = nil, nil, false
  for i = 1, n do
    if (affinity == '' or names[i] == affinity)
        and (modes[i] == '' or mode == '' or string.find(modes[i], ',' .. mode .. ',', 1, true))
    then
      possible = true
      if open[i] and (cap == 0 or (tonumber(redis.call('HGET', KEYS[4 + 3 * (i - 1) + 2],
                                                         tenant)) or 0) < cap) then
        local load = (used[i] + 1) / (limits[i] * weights[i])
        if best == nil or load < best_load then best, best_load = i, load end
      end
    end
  end
  if not possible then return 0 end
  return best
end
local function take(member, i, route)  -- and whether it was bound to its account ('1')
  redis.call('ZADD', KEYS[4 + 3 * (i - 1) + 1], now, member)
  redis.call('HINCRBY', KEYS[4 + 3 * (i - 1) + 2], string.match(member, '^(.*)/'), 1)
  return {member, names[i], string.find(route, '\t.') and '1' or ''}
end
local legacy = redis.call('ZRANGE', KEYS[3], 0, 0)
if #legacy > 0 then
  local i = choose(string.match(legacy[1], '^(.*)/'), '')
  if i then
    redis.call('ZREM', KEYS[3], legacy[1])
    return take(legacy[1], i, '')
  end
end
local k = 0
while true do
  local first = redis.call('ZRANGE', KEYS[1], k, k)
  if #first == 0 then return false end
  local tenant = first[1]
  local queue = ARGV[2] .. tenant
  -- its oldest task an account may take now, among its first few (a RELAX task waiting
  -- for the RELAX account holds up none of its FAST ones behind it)
  local heads = redis.call('ZRANGE', queue, 0, LOOK_AHEAD - 1)
  if #heads == 0 then
    redis.call('ZREM', KEYS[1], tenant)  -- its queue emptied by a cancel
  else
    local member, i, route
    for _, m in ipairs(heads) do
      route = redis.call('HGET', KEYS[4], m) or ''
      i = choose(tenant, route)
      if i == 0 then return {m, ''} end  -- none ever could: left queued, the caller fails it
      if i then member = m; break end
    end
    if member == nil then
      k = k + 1  -- nothing it may use is free: it keeps its turn
    else
      redis.call('ZREM', queue, member)
      local turn = redis.call('INCR', KEYS[2])
      if redis.call('ZCARD', queue) > 0 then
        redis.call('ZADD', KEYS[1], turn, tenant)
      else
        redis.call('ZREM', KEYS[1], tenant)
      end
      return take(member, i, route)
    end
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
-- KEYS[1] slots, KEYS[2] in flight, KEYS[3] routes; ARGV: members (their routes go too)
if #ARGV > 0 then
  redis.call('ZREM', KEYS[1], unpack(ARGV))
  redis.call('HDEL', KEYS[3], unpack(ARGV))
end
""" + RECOUNT
ENQUEUE = """
-- KEYS[1] slots, KEYS[2] in flight, KEYS[3] the tenant's queue, KEYS[4] turns, KEYS[5] turn,
-- KEYS[6] routes; ARGV[1] member, ARGV[2] its creation ms, ARGV[3] tenant, ARGV[4] '1': back
-- from the slots, ARGV[5] its route ('mode\\taffinity'; '': any account, and kept if set)
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], 'NX', tonumber(redis.call('GET', KEYS[5]) or '0'), ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[6], ARGV[1], ARGV[5]) end
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


class Account(NamedTuple):
    """An account as admission sees it: its name, its limit of unfinished tasks, its weight
    (its share, for its limit, of what the pool sends) and the modes it serves (None: any;
    none: only tasks that name no mode)."""

    name: str
    limit: int
    weight: float = 1.0
    modes: tuple[str, ...] | None = None


class Taken(NamedTuple):
    """A task `acquire` took: the account whose slot it holds; or None if no account of the
    pool could ever take it (its parent's account is gone, no account serves its mode): it
    is still queued, and the caller fails it, then `withdraw`s it. ``bound``: it was
    queued for that account only (an action, with its parent's account)."""

    member: Member
    account: str | None
    bound: bool = False


class Admission:
    """Queues and slots by pool: a pool is a provider's accounts (`core.settings`), named
    by the provider; an account named as its pool is the one of the ``<PROVIDER>_*``
    variables, whose keys are the names they had before pools."""

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

    async def enqueue(self, pool: str, member: Member, mode: str | None = None,
                      affinity: str | None = None) -> None:
        """Queue the task; its tenant takes a turn if it had none. ``mode``: only accounts
        that serve it take it; ``affinity``: only that account (a parent's, for an action)."""
        await self._enqueue(pool, pool, member, route(mode, affinity), from_slots=False)
        await self.publisher.publish(self.keys.admission_channel(), pool)

    async def acquire(self, pool: str, accounts: Sequence[Account], now_ms: int
                      ) -> Taken | None:
        """The oldest waiting task of the tenant whose turn it is that an account may take
        now (its mode served, its affinity's account, the tenant below its cap there), now
        holding a slot of the least loaded such account; None when none can go."""
        keys = self.keys
        account_keys: list[str] = []
        account_args: list[str | int | float] = []
        for account in accounts:
            account_keys += [keys.slots(account.name, pool), keys.in_flight(account.name, pool),
                             keys.health(account.name, pool)]
            account_args += [account.name, account.limit, account.weight,
                             "" if account.modes is None else f",{','.join(account.modes)},"]
        taken = await self._acquire(
            keys=[keys.turns(pool), keys.turn(pool), keys.legacy_queue(pool),
                  keys.routes(pool), *account_keys],
            args=[now_ms, keys.queue(pool, ""), self.tenant_cap, len(accounts), *account_args])
        if not taken:
            return None
        member, account_name, *bound = (x.decode() for x in taken)
        return Taken(Member.parse(member), account_name or None, bound == ["1"])

    async def requeue(self, pool: str, account: str, member: Member,
                      affinity: str | None = None) -> None:
        """Back to its place in its tenant's queue (the provider could not take it yet); its
        route kept, or bound to ``affinity``'s account if given."""
        await self._enqueue(pool, account, member, route(None, affinity), from_slots=True)

    async def _enqueue(self, pool: str, account: str, member: Member, route_: str,
                       from_slots: bool) -> None:
        keys = self.keys
        await self._enqueue_script(
            keys=[keys.slots(account, pool), keys.in_flight(account, pool),
                  keys.queue(pool, member.tenant), keys.turns(pool), keys.turn(pool),
                  keys.routes(pool)],
            args=[str(member), member.created_ms, member.tenant, "1" if from_slots else "0",
                  route_])

    async def withdraw(self, pool: str, member: Member) -> bool:
        """Take a task out of the queue before any dispatcher pops it; False when it is no
        longer there (being sent, or sent). (A tenant left with nothing waiting loses its
        turn at the next `acquire`.)"""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.queue(pool, member.tenant), str(member))
            pipe.zrem(self.keys.legacy_queue(pool), str(member))
            pipe.hdel(self.keys.routes(pool), str(member))
            removed = await pipe.execute()
        return any(removed[:2])

    async def release(self, pool: str, account: str, member: Member) -> None:
        """Free the slot of a task the provider refused (it never reached its queue)."""
        await self._free_slots(pool, account, [str(member)])

    async def _free_slots(self, pool: str, account: str, members: list[str]) -> None:
        await self._free(keys=[self.keys.slots(account, pool), self.keys.in_flight(account, pool),
                               self.keys.routes(pool)], args=members)

    async def holders(self, pool: str, account: str) -> list[tuple[Member, int]]:
        """Tasks holding a slot, with when they were sent or last found queued (ms)."""
        pairs = await self.redis.zrange(self.keys.slots(account, pool), 0, -1, withscores=True)
        return [(Member.parse(m), int(score)) for m, score in pairs]

    async def prune(self, pool: str, account: str) -> int:
        """Free the slots of tasks that are final (or gone); the ones we failed ourselves go
        to the inferred set, polled a while longer. Returns the slots still in use."""
        held = await self.holders(pool, account)
        if not held:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for member, _ in held:
                pipe.hmget(self.keys.task(member.tenant, member.job_id), ["r", "s"])
                pipe.exists(self.keys.history(member.tenant, member.job_id))
            replies = await pipe.execute()
        done, inferred = [], {}
        for (member, _), (rank, status), streamed in zip(held, replies[::2], replies[1::2],
                                                         strict=True):
            if status is None or status in _FINAL:
                done.append(str(member))
                if streamed and status is not None and self.history is not None:
                    # not compacted yet: the process that stored the final state may have
                    # died first (a compacted history has no stream left)
                    self.history.soon(member.tenant, member.job_id)
                if rank is not None and int(rank) == RANK_INFERRED_FAILURE:
                    inferred[str(member)] = now_ms()  # when it left the slots
        if done:
            if inferred:  # watched first: a crash between the two leaves the slot held
                await self.redis.zadd(self.keys.inferred(account), inferred)
            await self._free_slots(pool, account, done)
        return len(held) - len(done)

    async def in_use(self, pool: str, account: str) -> int:
        """The account's slots in use."""
        return int(await self.redis.zcard(self.keys.slots(account, pool)))

    async def depth(self, pool: str) -> int:
        """Tasks waiting for the pool's accounts."""
        by_tenant = await self.waiting(pool)
        return sum(by_tenant.values()) + int(await self.redis.zcard(self.keys.legacy_queue(pool)))

    async def waiting(self, pool: str) -> dict[str, int]:
        """Tasks waiting for the pool, by tenant, in the order of their turns."""
        keys = self.keys
        tenants = [t.decode() for t in await self.redis.zrange(keys.turns(pool), 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(keys.queue(pool, tenant))
            counts = await pipe.execute()
        return {t: int(n) for t, n in zip(tenants, counts, strict=True) if n}


def route(mode: str | None, affinity: str | None) -> str:
    """A queued task's constraints as the script reads them: ``mode\taffinity``."""
    return f"{mode or ''}\t{affinity or ''}" if mode or affinity else ""
