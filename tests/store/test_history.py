"""receiver.store.history: a finished task's history is compacted, and every transition and
raw body still reads back exactly, through GET /tasks/{id}/history."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.ingest import callbacks
from receiver.cli.redis_server import RedisServer
from receiver.core.models import TaskStatus, Update
from receiver.store import Admission, Member, TaskStore, history
from receiver.store.history import Entry, merge, pack, read, unpack
from receiver.store.tasks import redact_tokens
from tests.conftest import KEYS, LiveServer, mint
from tests.store.test_store import claims, run


def wait_compacted(r: redis.Redis, job: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while r.hget(KEYS.task("acme", job), "hl") is None or r.exists(
            KEYS.history("acme", job)):
        assert time.monotonic() < deadline, "the history was not compacted"
        time.sleep(0.02)


def test_a_finished_task_reads_back_every_transition_and_raw_body_byte_for_byte(
        server: LiveServer, acme: httpx.Client, r: redis.Redis) -> None:
    job, url = mint(acme, prompt="a watercolor cat")
    bodies = callbacks("1700000000000123", "a watercolor cat")  # 10 steps, SUCCESS; ~1 KB each
    for body in bodies:
        assert acme.post(url, content=body).json()["result"] == "stored"
    wait_compacted(r, job)

    answer = acme.get(f"/tasks/{job}/history")
    assert answer.status_code == 200
    transitions = answer.json()["transitions"]
    assert [t["event"] for t in transitions] == [
        "task.created", *["task.progress"] * (len(bodies) - 1), "task.succeeded"]
    assert [t["raw"] for t in transitions] == ["", *(
        redact_tokens(b).decode() for b in bodies)]
    # each snapshot is the one the tenant stream carried for that event, byte for byte
    published = {i.decode(): f[b"data"] for i, f in r.xrange(KEYS.stream("acme"))}
    raw_answer = answer.content
    for t in transitions:
        assert published[t["event_id"]] in raw_answer
        assert t["task"] == orjson.loads(published[t["event_id"]])
    assert transitions[-1]["task"] == acme.get(f"/tasks/{job}").json() | {
        "event": "task.succeeded", "event_id": transitions[-1]["event_id"]}
    kept = (r.memory_usage(KEYS.task("acme", job), samples=0) or 0) + (
        r.memory_usage(KEYS.history("acme", job), samples=0) or 0)
    assert kept < 8 * 1024, kept  # 12 transitions of ~2.5 KB each, compacted
    with server.client("key-beta") as beta:  # another tenant does not read it
        assert beta.get(f"/tasks/{job}/history").status_code == 404


async def settled(store: TaskStore) -> None:
    while store.history.pending:
        await asyncio.wait(store.history.pending)


def test_a_late_final_after_compaction_is_kept_and_racing_compactions_lose_nothing(
        redis_server: RedisServer) -> None:
    c = claims()
    raws = [b'{"step":%d,"token=secret":"x\xff"}' % n for n in range(5)]

    async def body(store: TaskStore) -> list[tuple[bytes, dict[bytes, bytes]]]:
        for n, pct in enumerate((10, 40, 70)):
            await store.apply(c, Update(TaskStatus.IN_PROGRESS, pct, "p9", raw=raws[n]))
        await store.apply(c, Update(TaskStatus.FAILURE, fail_reason="timed out",
                                    inferred=True, raw=raws[3]))
        await settled(store)  # compacted in the background
        late = await store.apply(c, Update(TaskStatus.SUCCESS, 100, "p9", raw=raws[4]))
        assert late.result == "stored"
        outcomes = await asyncio.gather(*(store.history.compact(c.tenant, c.job_id)
                                          for _ in range(4)))
        # with the one the late final started in the background: one wins, the rest see it
        assert set(outcomes) <= {"compacted", "raced", "short"}, outcomes
        await settled(store)
        return await read(store.redis, store.keys, c.tenant, c.job_id)

    entries = run(redis_server, body)
    client = redis.Redis.from_url(redis_server.url)
    assert not client.exists(KEYS.history("acme", c.job_id))  # all of it in the blob
    published = [(i, f[b"data"]) for i, f in client.xrange(KEYS.stream("acme"))
                 if orjson.loads(f[b"data"])["id"] == c.job_id]
    assert [(i, f[b"data"]) for i, f in entries] == published
    assert [f[b"raw"] for _, f in entries] == [redact_tokens(raw) for raw in raws]
    assert [orjson.loads(f[b"data"])["status"] for _, f in entries] == [
        "IN_PROGRESS", "IN_PROGRESS", "IN_PROGRESS", "FAILURE", "SUCCESS"]


ids = st.tuples(st.integers(0, 2**48), st.integers(0, 2**20)).map(
    lambda t: b"%d-%d" % t)
fields = st.dictionaries(st.binary(max_size=8), st.binary(max_size=64), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ids, fields), max_size=12))
def test_pack_keeps_every_entry_byte_for_byte(
        entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    assert unpack(pack(entries)) == entries


def test_merge_counts_an_entry_in_both_parts_once() -> None:
    a, b, c = ((b"1-%d" % n, {b"data": b"%d" % n}) for n in range(3))
    assert merge(pack([a, b]), [b, c]) == [a, b, c]  # compacted between the two reads
    assert merge(None, [a, b, c]) == [a, b, c]


def test_a_history_too_big_to_unpack_cheaply_stays_a_stream(
        redis_server: RedisServer) -> None:
    c = claims()
    big = [b"{\"pad\":\"%s\"}" % (b"%d" % n * 100_000) for n in range(1, 4)]  # 100 KB each

    async def body(store: TaskStore) -> tuple[str, int]:
        for n, raw in enumerate(big):
            await store.apply(c, Update(TaskStatus.IN_PROGRESS, 10 * (n + 1), "p8", raw=raw))
        await store.apply(c, Update(TaskStatus.SUCCESS, 100, "p8", raw=b"{}"))
        await settled(store)
        outcome = await store.history.compact(c.tenant, c.job_id)
        return outcome, len(await read(store.redis, store.keys, c.tenant, c.job_id))

    assert run(redis_server, body) == ("large", 4)
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(KEYS.history("acme", c.job_id)) == 4  # whole, readable as it was
    assert client.hget(KEYS.task("acme", c.job_id), "h") is None


def test_a_history_over_the_inline_size_is_packed_in_a_thread_and_reads_back(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A history past INLINE_PACK (here about 60 KB) is packed off the loop, in a thread; it
    reads back as it was stored."""
    c = claims()
    raws = [b'{"pad":"%s"}' % (b"%d" % n * 12_000) for n in range(1, 6)]  # 12 KB each
    threads: list[str] = []
    real = asyncio.to_thread

    async def spied(fn: Any, *args: Any) -> Any:
        threads.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(history.asyncio, "to_thread", spied)

    async def body(store: TaskStore) -> tuple[list[Entry], list[Entry]]:
        for n, raw in enumerate(raws[:-1]):
            await store.apply(c, Update(TaskStatus.IN_PROGRESS, 10 * (n + 1), "p7", raw=raw))
        await store.apply(c, Update(TaskStatus.SUCCESS, 100, "p7", raw=raws[-1]))
        before = await read(store.redis, store.keys, c.tenant, c.job_id)
        await settled(store)  # compacted in the background
        return before, await read(store.redis, store.keys, c.tenant, c.job_id)

    before, after = run(redis_server, body)
    assert threads == ["pack"]
    assert sum(len(v) for _, f in after for v in f.values()) > history.INLINE_PACK
    assert after == before and [f[b"raw"] for _, f in after] == raws
    assert not redis.Redis.from_url(redis_server.url).exists(KEYS.history("acme", c.job_id))


def test_a_compaction_lost_with_its_process_is_done_when_the_slot_is_freed(
        redis_server: RedisServer) -> None:
    c, done = claims(), claims()

    async def body(store: TaskStore) -> str:
        await store.apply(c, Update(TaskStatus.IN_PROGRESS, 50, "p7", raw=b"{}"))
        await store.apply(c, Update(TaskStatus.SUCCESS, 100, "p7", raw=b"{}"))
        for task in list(store.history.pending):  # the process died before compacting
            task.cancel()
        await asyncio.sleep(0)
        assert await store.redis.exists(store.keys.history(c.tenant, c.job_id))
        admission = Admission(store.redis, store.keys, history=store.history)
        await store.redis.zadd(store.keys.slots("acct"), {str(Member(c.tenant, c.job_id)): 1})
        assert await admission.prune("acct", "acct") == 0  # final: its slot is freed...
        await settled(store)  # ...and its history compacted
        gone = await store.redis.exists(store.keys.history(c.tenant, c.job_id))
        # a final task whose history was compacted as usual is not compacted again
        await store.apply(done, Update(TaskStatus.SUCCESS, 100, "p8", raw=b"{}"))
        await settled(store)
        await store.redis.zadd(store.keys.slots("acct"),
                               {str(Member(done.tenant, done.job_id)): 1})
        assert await admission.prune("acct", "acct") == 0
        return f"{gone} {len(store.history.pending)}"

    assert run(redis_server, body) == "0 0"
