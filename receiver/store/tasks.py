"""Task state in Redis: one atomic, idempotent, monotonic transition per callback.

`TRANSITION` runs inside Redis, so the read, the decision and every write happen in one
round trip with nothing interleaved: read the stored rank, refuse what ranks at or below it,
bump ``version``, assemble the snapshot, append it to the tenant's stream and the task's
history, write the task, update the indexes and publish. See ARCHITECTURE.md.
"""

from __future__ import annotations

import re
import time
from importlib.resources import files
from typing import Any, NamedTuple

import orjson
from redis.asyncio import Redis

from receiver.core.constants import ADDED_FIELDS, FIELD_DEFAULTS, TASK_FIELDS, Keys
from receiver.core.errors import ReceiverError
from receiver.core.models import (
    EVENT_OF_STATUS,
    RANK_INFERRED_FAILURE,
    EventKind,
    TaskStatus,
    Update,
    now_iso,
    now_ms,
    rank,
)
from receiver.core.settings import Settings
from receiver.core.tokens import CallbackClaims
from receiver.store.batcher import ClusterBatcher, ScriptBatcher
from receiver.store.claims import ProviderTaskClaimed, claim_key, claim_ttl
from receiver.store.history import HistoryCompactor

# The script finds the version at the end of the stored values.
assert TASK_FIELDS[-1] == "version"
# The fields in `v`; the ADDED_FIELDS are in `x` (see transition.lua).
CORE_FIELDS = tuple(f for f in TASK_FIELDS if f not in ADDED_FIELDS)

# The transition script is transition.lua; this header gives it the field layout, and
# writes the per-field work as straight-line code (table constructors of known size, one
# concat each) where loops over tables of indexes were: with the rest of the script's
# rewrite, 466,385 -> 360,697 instructions in redis-server per transition (bench.transition
# --callgrind; see transition.lua).
_INDEX = {name: i for i, name in enumerate(TASK_FIELDS, start=1)}


def _lua_list(items: list[str]) -> str:
    return "{" + ", ".join(items) + "}"


_HEADER = "\n".join([
    "local call, find, sub, byte, concat = "
    "redis.call, string.find, string.sub, string.byte, table.concat",
    f"local N = {len(TASK_FIELDS)}",
    "local CORE = " + _lua_list([str(_INDEX[k]) for k in CORE_FIELDS]),
    "local EXTRA = " + _lua_list([str(_INDEX[k]) for k in ADDED_FIELDS]),
    f"local CREATED_AT, UPDATED_AT = {_INDEX['created_at']}, {_INDEX['updated_at']}",
    f"local IMAGE_URL, IMAGE_URLS = {_INDEX['image_url']}, {_INDEX['image_urls']}",
    f"local INFERRED = {RANK_INFERRED_FAILURE}",
    # every field's default, in order: the values a task starts from
    "local function defaults() return "
    + _lua_list([f"'{FIELD_DEFAULTS.get(name, 'null')}'" for name in TASK_FIELDS]) + " end",
    # the snapshot: '{"id":', v[1], ',"tenant":', v[2], ..., then the event's own fields
    "local function render(v, kind, id) return concat("
    + _lua_list([f"""'{"{" if i == 1 else ","}"{name}":', v[{i}]""" for name, i in _INDEX.items()]
                + ["',\"event\":\"', kind, '\",\"event_id\":\"', id, '\"}'"]) + ") end",
    # `v` and `x`: the CORE and the EXTRA values joined by NUL
    "local function join_core(v) return concat("
    + _lua_list([f"v[{_INDEX[k]}]" for k in CORE_FIELDS]) + ", '\\0') end",
    "local function join_extra(v) return concat("
    + _lua_list([f"v[{_INDEX[k]}]" for k in ADDED_FIELDS]) + ", '\\0') end",
])


class TransitionKeys(NamedTuple):
    """The script's KEYS, in order (transition.lua's table)."""

    task: bytes
    history: bytes
    stream: bytes
    last_event_id: bytes
    task_index: bytes
    usage: bytes
    quota: bytes
    # one index per status, in TaskStatus order
    index_not_start: bytes
    index_submitted: bytes
    index_in_progress: bytes
    index_modal: bytes
    index_success: bytes
    index_failure: bytes
    index_cancel: bytes
    archive: bytes


class TransitionArgs(NamedTuple):
    """The script's ARGV, in order (transition.lua's table); ``control`` follows them."""

    op: bytes
    rank: int
    status: str
    kind: str
    ptid: str
    raw: bytes
    now: bytes
    job: str
    channel: bytes
    stream_maxlen: bytes
    history_maxlen: bytes
    ttl: bytes
    patch: bytes
    ms: int
    tenant: str
    provider: str
    admission: bytes
    claimed: bytes
    bucket: int
    max_tasks: bytes
    max_bytes: bytes
    quota_ttl: bytes
    claim_ttl: bytes
    archive: bytes
    budget: bytes


# Where each status's index and the claim are in KEYS, for the script's header.
_STATUS_INDEX = {s: TransitionKeys._fields.index(f"index_{s.value.lower()}") + 1
                 for s in TaskStatus}
TRANSITION = "\n".join([
    _HEADER,
    "local STATUS_INDEX = {" + ", ".join(f"{s.value} = {i}" for s, i in _STATUS_INDEX.items())
    + "}",
    f"local ARCHIVE = {TransitionKeys._fields.index('archive') + 1}",
    f"local CLAIM = {len(TransitionKeys._fields) + 1}",
    (files("receiver.store") / "transition.lua").read_text(),
])

# A tenant's keys, made once: stream, last id, index, channel, usage, quota, and the KEYS
# after quota (the status indexes and the archive queue)
_TenantKeys = tuple[bytes, bytes, bytes, bytes, bytes, bytes, tuple[bytes, ...]]
_FIELD_NAMES = [f.encode() for f in TASK_FIELDS]
# a patch names a field by its index, in one byte (the script reads it with string.byte)
_INDEX_BYTES = {name: bytes([i]) for name, i in _INDEX.items()}


class Outcome(NamedTuple):
    # stored | duplicate | stale | exists | conflict | unclaimed (see `apply`)
    result: str
    version: int | None = None
    event_id: str | None = None
    # The snapshot JSON (with event and event_id), returned for a create only.
    data: bytes | None = None

    @property
    def stored(self) -> bool:
        return self.result == "stored"


class QuotaExceeded(ReceiverError):
    """The tenant's quota is spent until its oldest bucket leaves the window."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class BudgetExceeded(ReceiverError):
    """A submission the tenant's budget (TENANT_BUDGETS) does not cover; nothing stored."""

    status_code = 402
    code = "budget_exceeded"


class TaskQuotaExceeded(QuotaExceeded):
    status_code = 429
    code = "task_quota"


class StorageQuotaExceeded(QuotaExceeded):
    status_code = 507
    code = "storage_quota"


class TaskStore:
    def __init__(self, redis: Redis, batcher: ScriptBatcher | ClusterBatcher,
                 settings: Settings) -> None:
        self.redis = redis  # reads
        self.batcher = batcher  # the transition script
        self.keys = Keys(settings.redis_prefix)
        self.settings = settings
        self.history = HistoryCompactor(batcher, self.keys)  # a final state's history shrinks
        self._limits = [
            str(settings.tenant_stream_maxlen).encode(),
            str(settings.task_history_maxlen).encode(),
            str(settings.task_ttl).encode(),
        ]
        self._tenant_keys: dict[str, _TenantKeys] = {}
        self._admission = self.keys.admission_channel().encode()
        # Quotas count in buckets of a seventh of TASK_TTL, eight to a window (the last
        # TASK_TTL and the bucket under way); none at all when both quotas are off.
        self._quotas = (b"%d" % settings.tenant_max_tasks, b"%d" % settings.tenant_max_bytes)
        self._bucket_seconds = max(60, -(-settings.task_ttl // 7))
        self._counting = bool(settings.tenant_max_tasks or settings.tenant_max_bytes)
        self._quota_ttl = b"%d" % (8 * self._bucket_seconds)
        self._claim_ttl = b"%d" % claim_ttl(settings)
        self._archive = b"1" if settings.image_store else b"0"

    async def close(self) -> None:
        await self.history.close()
        await self.batcher.close()

    async def create(
        self, claims: CallbackClaims, status: TaskStatus = TaskStatus.NOT_START,
        control: dict[str, bytes] | None = None, claimed: bool = False,
        budget: int | None = None, **fields: Any,
    ) -> Outcome:
        """Create a task's record (refused with ``exists`` if it has one), within the
        tenant's quotas. ``control``: the submitter's fields (``a``, ``b``, ``q``; see the
        script); ``claimed``: the caller holds the claim on ``provider_task_id``;
        ``budget``: the most the tenant may have committed in the unit of the price in
        ``b``, this task's included (`BudgetExceeded` past it)."""
        fields.update(status=status.value)
        extra = [x for pair in (control or {}).items() for x in pair]
        return await self._transition(
            b"create", claims, rank(status, None), status, b"", fields,
            ptid=fields.get("provider_task_id") or "", extra=extra, claimed=claimed,
            enforce=True, budget=b"" if budget is None else b"%d" % budget,
        )

    async def apply(self, claims: CallbackClaims, update: Update, *, claimed: bool = False,
                    enforce: bool = False) -> Outcome:
        """Store what a provider (or our own inference) says, if it moves the task forward.
        An update that would bind a task the submitter did not send to a provider task id
        takes the id's claim (`claims`; `ProviderTaskClaimed` if another task holds it), or
        on a cluster answers ``unclaimed`` for the caller to take it (``claimed``: taken).
        ``enforce``: within the tenant's quotas (a callback; what the service learns itself
        is always stored)."""
        return await self._transition(
            b"apply", claims, update.rank, update.status, update.raw, update.fields(),
            ptid=update.provider_task_id or "", claimed=claimed, enforce=enforce,
        )

    async def submitted(self, claims: CallbackClaims, update: Update) -> Outcome:
        """The provider accepted the task: `apply`, and charge the ledger once (even when a
        callback got there first and this update is stale). The caller took the claim."""
        return await self._transition(
            b"submit", claims, update.rank, update.status, update.raw, update.fields(),
            ptid=update.provider_task_id or "", claimed=True,
        )

    async def archived(self, claims: CallbackClaims, image_url: str | None,
                       image_urls: list[str | None]) -> Outcome:
        """The worker stored a SUCCESS's images: the task gains their URLs on this service
        (event ``task.archived``). ``stale`` if the task is not (or no longer) a SUCCESS,
        ``duplicate`` if it has these URLs already."""
        fields = {"archived_image_url": image_url, "archived_image_urls": image_urls}
        return await self._transition(
            b"archive", claims, rank(TaskStatus.SUCCESS, None), TaskStatus.SUCCESS, b"",
            fields, kind=EventKind.ARCHIVED)

    async def _transition(
        self, op: bytes, claims: CallbackClaims, rank_: int, status: TaskStatus, raw: bytes,
        fields: dict[str, Any], ptid: str = "", extra: list[Any] | None = None,
        claimed: bool = False, enforce: bool = False, kind: EventKind | None = None,
        budget: bytes = b"",
    ) -> Outcome:
        job, tenant = claims.job_id, claims.tenant
        stream, last_id, index, channel, usage, quota, tail = self._for_tenant(tenant)
        raw = redact_tokens(raw)
        patch = [_INDEX_BYTES[name] + orjson.dumps(value) for name, value in fields.items()]
        bucket = self._bucket() if self._counting else 0
        max_tasks, max_bytes = self._quotas if enforce else (b"0", b"0")
        keys: tuple[bytes, ...] = TransitionKeys(
            self.keys.task(tenant, job).encode(), self.keys.history(tenant, job).encode(),
            stream, last_id, index, usage, quota, *tail)
        if ptid and not claimed and not self.settings.redis_cluster:
            keys += (claim_key(self.keys, claims.provider, ptid),)  # taken inline
        stream_maxlen, history_maxlen, ttl = self._limits
        args = TransitionArgs(
            op, rank_, status.value, (kind or EVENT_OF_STATUS[status]).value, ptid, raw,
            orjson.dumps(now_iso()), job, channel, stream_maxlen, history_maxlen, ttl,
            b"\0".join(patch), now_ms(), tenant, claims.provider, self._admission,
            b"1" if claimed else b"0", bucket, max_tasks, max_bytes, self._quota_ttl,
            self._claim_ttl, self._archive, budget)
        reply = await self.batcher.call(keys, args + tuple(extra) if extra else args)
        if reply[0] == b"quota":
            self._refuse(tenant, reply[1])
        if reply[0] == b"budget":
            raise BudgetExceeded(
                f"tenant {tenant!r} has committed {int(reply[1]):,} {reply[2].decode()} of its "
                f"budget of {int(budget):,} (TENANT_BUDGETS: spent net of refunds, and its "
                "tasks not yet charged); this task would pass it")
        if reply[0] == b"claimed":
            raise ProviderTaskClaimed(
                f"{claims.provider} task {ptid[:80]!r} belongs to another task here")
        if reply[0] != b"stored":
            return Outcome(reply[0].decode(), int(reply[1]) if len(reply) > 1 else None)
        if status.terminal:
            self.history.soon(tenant, job)
        return Outcome("stored", int(reply[1]), reply[2].decode(),
                       reply[3] if len(reply) > 3 else None)

    def _bucket(self) -> int:
        return int(time.time()) // self._bucket_seconds

    def _refuse(self, tenant: str, which: bytes) -> None:
        settings, width = self.settings, self._bucket_seconds
        window = f"{settings.task_ttl // 3600} h"
        retry = width - int(time.time()) % width  # the oldest bucket leaves the count
        if which == b"tasks":
            raise TaskQuotaExceeded(
                f"tenant {tenant!r} created its {settings.tenant_max_tasks} tasks in the last "
                f"{window} (TENANT_MAX_TASKS)", retry)
        raise StorageQuotaExceeded(
            f"tenant {tenant!r} wrote its {settings.tenant_max_bytes} bytes in the last "
            f"{window} (TENANT_MAX_BYTES)", retry)

    def _for_tenant(self, tenant: str) -> _TenantKeys:
        keys = self._tenant_keys.get(tenant)
        if keys is None:
            k = self.keys
            keys = self._tenant_keys[tenant] = (
                k.stream(tenant).encode(), k.last_event_id(tenant).encode(),
                k.index(tenant).encode(), k.channel(tenant).encode(),
                k.usage(tenant).encode(), k.quota(tenant).encode(),
                (*(k.index(tenant, status.value).encode() for status in TaskStatus),
                 k.archive(tenant).encode()),
            )
        return keys

    async def get(self, tenant: str, job_id: str) -> bytes | None:
        """The task's snapshot JSON, or None."""
        values, extra = await self.redis.hmget(  # type: ignore[misc]
            self.keys.task(tenant, job_id), SNAPSHOT_FIELDS)
        return snapshot(values, extra)

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
                pipe.hmget(self.keys.task(tenant, job.decode()), SNAPSHOT_FIELDS)
            expired = []
            for job, (values, extra) in zip(ids, await pipe.execute(), strict=True):
                task = snapshot(values, extra)
                if task is None:
                    expired.append(job)
                else:
                    found.append(task)
            if expired:  # the task's TTL ran out; the index entry goes too
                await self.redis.zrem(index, *expired)
            upper = f"({ids[-1].decode()}"
        if len(found) > limit:
            return found[:limit], orjson.loads(found[limit - 1])["id"]
        return found, None

    async def ping(self) -> bool:
        return bool(await self.redis.ping())


# Every provider echoes the callback URL it was given (midjourney-proxy in
# properties.notifyHook, OhMyGPT in webhookUrl), token and all; .NET may escape its "=".
_TOKEN_VALUE = re.compile(rb"(?:=|\\u003[dD])[A-Za-z0-9_.%-]+")


def redact_tokens(raw: bytes) -> bytes:
    """``raw`` with every callback token replaced: no token is ever stored. Only the bytes
    after each ``token`` (found at memchr speed) go through the regex: 3.4-3.6 us on a 1 KB
    callback with one, against 6.4-8.4 us for one regex over the whole body (three
    alternating runs of timeit, same process), about 1 us on a body without any."""
    at = raw.find(b"token")
    if at < 0:
        return raw
    out: list[bytes] = []
    done = 0
    while at >= 0:
        at += 5
        match = _TOKEN_VALUE.match(raw, at)
        if match:
            out += (raw[done:at], b"=[redacted]")
            done = match.end()
        at = raw.find(b"token", at)
    out.append(raw[done:])
    return b"".join(out)


# What a snapshot is made of: the task hash's `v` and `x` (`snapshot`'s arguments).
SNAPSHOT_FIELDS = ["v", "x"]


def snapshot(values: bytes | None, extra: bytes | None = None) -> bytes | None:
    """The stored NUL-joined values (`v`, and `x`: the ADDED_FIELDS', their defaults if a
    task has none) -> the task's JSON."""
    if values is None:
        return None
    core = iter(values.split(b"\0"))
    added = iter(extra.split(b"\0") if extra is not None else _ADDED_DEFAULTS)
    return b"{" + b",".join(
        b'"%s":%s' % (name, next(added) if name in _ADDED else next(core))
        for name in _FIELD_NAMES) + b"}"


_ADDED = frozenset(name.encode() for name in ADDED_FIELDS)
_ADDED_DEFAULTS = [FIELD_DEFAULTS.get(name, "null").encode() for name in ADDED_FIELDS]
