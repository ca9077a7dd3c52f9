"""A task's history, kept small once the task has ended, and read back whole.

Every stored transition is an entry of the task's history stream: the event (the task's
snapshot) and the provider's raw body. That is about 2.5 KB a step, and nearly all of it
repeats the step before. When a task reaches a final state, `HistoryCompactor` moves its
entries into one zlib-compressed blob in the task's hash (``h``; ``hl`` is the id of the
last entry it holds) and deletes the stream: a stream of one 2.5 KB entry still cost Redis
4.7 KB (its listpack node). A later transition (a provider's SUCCESS after a timeout we
inferred) starts a new stream, and is compacted in turn. Readers take both parts: `read`
(every entry, byte for byte as stored: tests/store/test_history.py) and `latest`.

What each step bought, for a trueai-shaped task of eleven callbacks (bench/footprint, Redis
per finished task): as streams, 22.5 KiB; every entry but the last compacted, 7.94 KiB; all
of them, and the stream deleted, 4.09 KiB (at zlib level 9; at `LEVEL` 3, 4.36 KiB). The
blob: 16.8 KB of entries in 1,494 bytes; reading it back takes 30 us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from receiver.core.constants import Keys
from receiver.core.models import event_key
from receiver.store.batcher import ClusterBatcher, ScriptBatcher

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields), as XRANGE gives them

# KEYS: 1 task, 2 history. ARGV: 1 blob, 2 the last id it holds, 3 the ``hl`` the blob was
# built on ('' for none), 4 the first id to keep (XTRIM MINID). Refuses if the task is gone
# or another compaction got there first (the caller's blob would drop its entries). A stream
# left empty goes: even empty, a stream costs Redis a listpack node.
COMPACT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if (redis.call('HGET', KEYS[1], 'hl') or '') ~= ARGV[3] then return 'raced' end
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'hl', ARGV[2])
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[4])
if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
return 'compacted'
"""
_LENGTH = struct.Struct(">I")
# Once per task, on a trueai-shaped history of 16.8 KB (timeit, one run): level 3 packs it in
# 40 us to 1,494 bytes; level 6, 99 us to 1,375; level 9, 147 us to 1,338. At 9 it cost the
# ingest process 9 us per callback for 156 bytes a task.
LEVEL = 3
# A history up to this many bytes is packed on the event loop (typical: 17 KB, 40 us);
# handing it to a thread and back cost the process more than zlib itself.
INLINE_PACK = 32 * 1024
# A history of more than this many bytes stays a stream: a blob is unpacked whole on a read
# (GET /tasks/{id}/history, a resume), and a tenant's 100 steps of 256 KiB bodies would make
# that 0.1 s of a web process's loop (0.8 s to pack). Typical: 18 KB.
MAX_COMPACTED = 256 * 1024


def pack(entries: Sequence[Entry]) -> bytes:
    """Entries as one compressed blob: each id, its field count, then each field and value,
    every piece length-prefixed (raw bodies are bytes, whatever they hold)."""
    parts: list[bytes] = []
    for entry_id, fields in entries:
        parts += (_LENGTH.pack(len(entry_id)), entry_id, _LENGTH.pack(len(fields)))
        for name, value in fields.items():
            parts += (_LENGTH.pack(len(name)), name, _LENGTH.pack(len(value)), value)
    return zlib.compress(b"".join(parts), LEVEL)


def unpack(blob: bytes) -> list[Entry]:
    """`pack`'s entries, in order."""
    data, pos, out = zlib.decompress(blob), 0, []

    def piece() -> bytes:
        nonlocal pos
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += 4 + size
        return data[pos - size:pos]

    while pos < len(data):
        entry_id = piece()
        (count,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        fields = {}
        for _ in range(count):
            name = piece()
            fields[name] = piece()
        out.append((entry_id, fields))
    return out


def _after(entry_id: bytes) -> str:
    """The id just after ``entry_id`` (XTRIM MINID keeps it and what follows)."""
    ms, seq = event_key(entry_id)
    return f"{ms}-{seq + 1}"


async def read(redis: Redis, keys: Keys, tenant: str, job_id: str) -> list[Entry]:
    """Every stored transition of the task, oldest first: the blob's, then the stream's."""
    pipe = redis.pipeline(transaction=False)
    pipe.xrange(keys.history(tenant, job_id))  # before the blob: see `merge`
    pipe.hget(keys.task(tenant, job_id), "h")
    stream, blob = await pipe.execute()
    return merge(blob, stream)


async def latest(redis: Redis, keys: Keys, tenant: str, job_id: str) -> Entry | None:
    """The task's newest transition (its state now, as its last event carried it)."""
    pipe = redis.pipeline(transaction=False)
    pipe.xrevrange(keys.history(tenant, job_id), count=1)
    pipe.hmget(keys.task(tenant, job_id), ["h", "hl"])
    tail, (blob, held) = await pipe.execute()
    return newest(blob, held, tail)


def newest(blob: bytes | None, held: bytes | None, tail: Sequence[Entry]) -> Entry | None:
    """The newest of the stream's last entry (``tail``: none or one) and the blob's last
    (``held``: its id), unpacking the blob only when the stream has nothing newer."""
    if tail and (held is None or event_key(tail[0][0]) > event_key(held)):
        return tail[0]
    entries = merge(blob, tail)
    return entries[-1] if entries else None


def merge(blob: bytes | None, stream: Sequence[Entry]) -> list[Entry]:
    """The blob's entries, then the stream's after them. Read the stream first and the blob
    second: a compaction in between then finds its entries in both (once here), and never
    in neither."""
    held = unpack(blob) if blob else []
    last = event_key(held[-1][0]) if held else (-1, -1)
    return [*held, *(entry for entry in stream if event_key(entry[0]) > last)]


class HistoryCompactor:
    """Compacts the histories of tasks that reached a final state, in the background of the
    process that stored it, a few at a time. A compaction that fails (Redis gone, the
    process stopped) leaves the history whole and only bigger; the next final transition of
    the task compacts it again."""

    def __init__(self, batcher: ScriptBatcher | ClusterBatcher, keys: Keys,
                 concurrency: int = 4) -> None:
        # The transition's own connection (hiredis, auto-pipelined): through redis-py's
        # pool, the read and the script cost the ingest process 32 us per callback of the
        # 163 (bench.ingest --against a commit that did not compact, CPU per request).
        self.batcher, self.keys = batcher, keys
        self.slots = asyncio.Semaphore(concurrency)
        self.pending: set[asyncio.Task[Any]] = set()

    def soon(self, tenant: str, job_id: str) -> None:
        """Compact the task's history once the caller has answered."""
        task = asyncio.get_running_loop().create_task(self._run(tenant, job_id))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _run(self, tenant: str, job_id: str) -> None:
        async with self.slots:
            for _ in range(3):  # a race with another compaction: read again
                try:
                    if await self.compact(tenant, job_id) != "raced":
                        return
                except RedisError as exc:
                    log.info("history of %s/%s not compacted: %r", tenant, job_id, exc)
                    return

    async def compact(self, tenant: str, job_id: str) -> str:
        """Moves the history's entries into the blob: ``compacted``, or why not
        (``short``: nothing to move, ``large``: over `MAX_COMPACTED`, ``gone``, ``raced``)."""
        task = self.keys.task(tenant, job_id).encode()
        history = self.keys.history(tenant, job_id).encode()
        blob, held = await self.batcher.keyed(task, b"HMGET", task, b"h", b"hl")
        moved = [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)))
                 for entry_id, fields in await self.batcher.keyed(
                     history, b"XRANGE", history, b"-", b"+")]
        if not moved:
            return "short"
        size = sum(len(v) for _, fields in moved for v in fields.values())
        if size + (len(blob) * 20 if blob else 0) > MAX_COMPACTED:
            return "large"  # kept as a stream: whole, and nothing big to unpack on a read
        entries = [*(unpack(blob) if blob else []), *moved]
        if blob is None and size <= INLINE_PACK:  # (a blob's entries are packed again too)
            packed = pack(entries)
        else:  # zlib off the event loop: other requests go on meanwhile
            packed = await asyncio.to_thread(pack, entries)
        outcome = await self.batcher.keyed(task, b"EVAL", COMPACT, 2, task, history, packed,
                                           moved[-1][0], held or b"", _after(moved[-1][0]))
        return str(outcome.decode() if isinstance(outcome, bytes) else outcome)

    async def close(self) -> None:
        """Lets the compactions under way finish (they are short), then stops."""
        if self.pending:
            with contextlib.suppress(Exception):
                await asyncio.wait(self.pending, timeout=0.5)
        for task in self.pending:
            task.cancel()
