"""Task state in Redis: one atomic, idempotent, monotonic transition per callback.

`TRANSITION` runs inside Redis, so the read, the decision and every write happen in one
round trip with nothing interleaved: read the stored rank, refuse what ranks at or below it,
bump ``version``, assemble the snapshot, append it to the tenant's stream and the task's
history, write the task, update the indexes and publish. See ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson
from redis.asyncio import Redis

from receiver.batcher import ScriptBatcher
from receiver.constants import FIELD_DEFAULTS, TASK_FIELDS, Keys
from receiver.models import EVENT_OF_STATUS, TaskStatus, Update, now_iso, rank
from receiver.settings import Settings
from receiver.tokens import CallbackClaims

STATUSES = tuple(s.value for s in TaskStatus)

_LUA = """
local FIELDS = {%(fields)s}
local STATUSES = {%(statuses)s}
local DEFAULTS = {%(defaults)s}
local op, new_rank, status, kind, ptid = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]

local cur = redis.call('HMGET', KEYS[1], '_rank', '_status', '_ptid', unpack(FIELDS))
local exists = cur[1] ~= false
if exists then
  if op == 'create' then return {'exists'} end
  if ptid ~= '' and cur[3] and cur[3] ~= ptid then return {'conflict'} end
  local cur_rank, cur_version = tonumber(cur[1]), cur[3 + #FIELDS]
  if new_rank == cur_rank then return {'duplicate', cur_version} end
  if new_rank < cur_rank then return {'stale', cur_version} end
end

local vals, pos = {}, {}
for i, f in ipairs(FIELDS) do vals[i] = cur[i + 3]; pos[f] = i end
for i = 13, #ARGV, 2 do vals[pos[ARGV[i]]] = ARGV[i + 1] end
local version = 1
if exists then version = tonumber(vals[pos['version']]) + 1 end
vals[pos['version']] = tostring(version)
vals[pos['updated_at']] = ARGV[7]
if not vals[pos['created_at']] then vals[pos['created_at']] = ARGV[7] end

-- Event ids are ours (time-ms, then a sequence) so the JSON can carry its own id; the same
-- id goes into the tenant stream and the task history.
local t = redis.call('TIME')
local ms, seq = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 0
local last = redis.call('GET', KEYS[4])
if last then
  local lms, lseq = string.match(last, '^(%%d+)-(%%d+)$')
  if ms <= tonumber(lms) then ms, seq = tonumber(lms), tonumber(lseq) + 1 end
end
local id = string.format('%%d-%%d', ms, seq)

local parts = {}
for i, f in ipairs(FIELDS) do parts[i] = '"' .. f .. '":' .. (vals[i] or DEFAULTS[f] or 'null') end
local data = '{' .. table.concat(parts, ',')
  .. ',"event":"' .. kind .. '","event_id":"' .. id .. '"}'

-- The XADDs go first: they are the only writes that could refuse, and a script that fails
-- part way keeps what it already wrote.
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], id, 'event', kind, 'data', data)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[11], id,
  'event', kind, 'data', data, 'raw', ARGV[6])
redis.call('SET', KEYS[4], id)

local hset = {'_rank', ARGV[2], '_status', status}
if ptid ~= '' then hset[5], hset[6] = '_ptid', ptid end
for i, f in ipairs(FIELDS) do
  if vals[i] then hset[#hset + 1] = f; hset[#hset + 1] = vals[i] end
end
redis.call('HSET', KEYS[1], unpack(hset))
redis.call('EXPIRE', KEYS[1], ARGV[12])
redis.call('EXPIRE', KEYS[2], ARGV[12])

redis.call('ZADD', KEYS[5], 0, ARGV[8])
for i, s in ipairs(STATUSES) do
  if s == status then redis.call('ZADD', KEYS[5 + i], 0, ARGV[8])
  elseif exists and s == cur[2] then redis.call('ZREM', KEYS[5 + i], ARGV[8]) end
end
redis.call('PUBLISH', ARGV[9], data)
return {'stored', version, id, data}
"""

TRANSITION = _LUA % {
    "fields": ", ".join(f"'{f}'" for f in TASK_FIELDS),
    "statuses": ", ".join(f"'{s}'" for s in STATUSES),
    "defaults": ", ".join(f"{k} = '{v}'" for k, v in FIELD_DEFAULTS.items()),
}

_FIELD_NAMES = [f.encode() for f in TASK_FIELDS]
_DEFAULTS = {f.encode(): v.encode() for f, v in FIELD_DEFAULTS.items()}


class Outcome(NamedTuple):
    # stored | duplicate | stale | exists | conflict
    result: str
    version: int | None = None
    event_id: str | None = None
    # The snapshot JSON (with event and event_id) when stored.
    data: bytes | None = None

    @property
    def stored(self) -> bool:
        return self.result == "stored"


class TaskStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.keys = Keys(settings.redis_prefix)
        self.settings = settings
        self.batcher = ScriptBatcher(redis, TRANSITION)

    async def close(self) -> None:
        await self.batcher.close()

    async def create(
        self, claims: CallbackClaims, status: TaskStatus = TaskStatus.NOT_START,
        **fields: Any,
    ) -> Outcome:
        """Create a task's record (refused with ``exists`` if it has one)."""
        fields.update(status=status.value)
        return await self._transition(
            "create", claims, rank(status, None), status, b"", fields,
            ptid=fields.get("provider_task_id") or "",
        )

    async def apply(self, claims: CallbackClaims, update: Update) -> Outcome:
        """Store what a provider (or our own inference) says, if it moves the task forward."""
        return await self._transition(
            "apply", claims, update.rank, update.status, update.raw, update.fields(),
            ptid=update.provider_task_id or "",
        )

    async def _transition(
        self, op: str, claims: CallbackClaims, rank_: int, status: TaskStatus, raw: bytes,
        fields: dict[str, Any], ptid: str = "",
    ) -> Outcome:
        job, tenant, keys = claims.job_id, claims.tenant, self.keys
        fields.update(id=job, tenant=tenant, provider=claims.provider)
        args: list[str | bytes | int] = [
            op, rank_, status.value, EVENT_OF_STATUS[status].value, ptid, raw,
            orjson.dumps(now_iso()), job, keys.channel(tenant),
            self.settings.tenant_stream_maxlen, self.settings.task_history_maxlen,
            self.settings.task_ttl,
        ]
        for name, value in fields.items():
            args += (name, orjson.dumps(value))
        reply = await self.batcher.call(
            [
                keys.task(tenant, job), keys.history(tenant, job), keys.stream(tenant),
                keys.last_event_id(tenant), keys.index(tenant),
                *(keys.index(tenant, s) for s in STATUSES),
            ],
            args,
        )
        if reply[0] != b"stored":
            return Outcome(reply[0].decode(), int(reply[1]) if len(reply) > 1 else None)
        return Outcome("stored", int(reply[1]), reply[2].decode(), reply[3])

    async def get(self, tenant: str, job_id: str) -> bytes | None:
        """The task's snapshot JSON, or None."""
        values = await self.redis.hmget(  # type: ignore[misc]
            self.keys.task(tenant, job_id), _FIELD_NAMES
        )
        return _snapshot(values)

    async def list(
        self, tenant: str, status: TaskStatus | None, limit: int, cursor: str | None,
    ) -> tuple[list[bytes], str | None]:
        """Newest first; the cursor is the last job id of the previous page."""
        index = self.keys.index(tenant, status.value if status else None)
        found: list[bytes] = []
        upper = f"({cursor}" if cursor else "+"
        while len(found) <= limit:
            ids = await self.redis.zrevrangebylex(
                index, upper, "-", start=0, num=limit + 1 - len(found)
            )
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job in ids:
                pipe.hmget(self.keys.task(tenant, job.decode()), _FIELD_NAMES)
            expired = []
            for job, values in zip(ids, await pipe.execute(), strict=True):
                snapshot = _snapshot(values)
                if snapshot is None:
                    expired.append(job)
                else:
                    found.append(snapshot)
            if expired:  # the task's TTL ran out; the index entry goes too
                await self.redis.zrem(index, *expired)
            upper = f"({ids[-1].decode()}"
        if len(found) > limit:
            return found[:limit], orjson.loads(found[limit - 1])["id"]
        return found, None

    async def ping(self) -> bool:
        return bool(await self.redis.ping())


def _snapshot(values: list[bytes | None]) -> bytes | None:
    if values[0] is None:  # no id: no task
        return None
    return b"{" + b",".join(
        b'"%s":%s' % (name, value if value is not None else _DEFAULTS.get(name, b"null"))
        for name, value in zip(_FIELD_NAMES, values, strict=True)
    ) + b"}"
