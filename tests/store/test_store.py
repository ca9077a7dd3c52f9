"""The transition script's rules, against a real Redis."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import orjson
import redis
from redis.asyncio import Redis
from redis.crc import key_slot

from receiver.cli.redis_server import RedisServer
from receiver.core.models import TaskStatus, Update, new_job_id
from receiver.core.tokens import CallbackClaims
from receiver.store.batcher import ScriptBatcher
from receiver.store.claims import ProviderTaskClaimed
from receiver.store.tasks import (
    CORE_FIELDS,
    TRANSITION,
    BudgetExceeded,
    Outcome,
    StorageQuotaExceeded,
    TaskQuotaExceeded,
    TaskStore,
    TransitionArgs,
    TransitionKeys,
)
from tests.conftest import KEYS, base_settings, history_entries


class Store(TaskStore):
    """The store as its callers use it once they hold the provider task id's claim (the
    claim itself: tests/test_attacks.py)."""

    async def apply(self, claims: CallbackClaims, update: Update, *, claimed: bool = True,
                    enforce: bool = False) -> Outcome:
        return await super().apply(claims, update, claimed=claimed, enforce=enforce)


def run(
    redis_server: RedisServer, body: Callable[[TaskStore], Awaitable[Any]], **settings: Any
) -> Any:
    async def main() -> Any:
        client = Redis.from_url(redis_server.url)
        batcher = ScriptBatcher(redis_server.url, TRANSITION)
        store = Store(client, batcher, base_settings(redis_server.url, **settings))
        try:
            return await body(store)
        finally:
            await store.close()
            await client.aclose()

    return asyncio.run(main())


def claims() -> CallbackClaims:
    return CallbackClaims(new_job_id(), "acme", "mjproxy")


def stored(redis_server: RedisServer, c: CallbackClaims) -> dict[str, Any]:
    task = run(redis_server, lambda store: store.get(c.tenant, c.job_id))
    assert task is not None
    return dict(orjson.loads(task))


def test_inferred_failure_is_replaced_by_a_later_provider_success(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    c = claims()

    async def body(store: TaskStore) -> list[str]:
        results = [
            await store.apply(c, Update(TaskStatus.IN_PROGRESS, 30, "p1")),
            await store.apply(c, Update(TaskStatus.FAILURE, fail_reason="timed out",
                                        inferred=True)),
            await store.apply(c, Update(TaskStatus.IN_PROGRESS, 80, "p1")),  # below: stale
            await store.apply(c, Update(TaskStatus.SUCCESS, 100, "p1", image_url="u",
                                        finished_at="2030-01-01T00:00:00.000Z")),
            await store.apply(c, Update(TaskStatus.FAILURE, fail_reason="late", inferred=True)),
        ]
        return [o.result for o in results]

    assert run(redis_server, body) == ["stored", "stored", "stale", "stored", "stale"]
    task = stored(redis_server, c)
    assert (task["status"], task["version"], task["image_url"]) == ("SUCCESS", 3, "u")
    # nothing of the failure it replaced is left
    assert task["fail_reason"] is None and task["progress"] == 100
    history = [orjson.loads(f[b"data"]) for _, f in history_entries(r, "acme", c.job_id)]
    assert history[1]["finished_at"] is not None  # our inferred end
    assert task["finished_at"] == "2030-01-01T00:00:00.000Z"  # replaced by the provider's


def test_provider_finals_are_final(redis_server: RedisServer, r: redis.Redis) -> None:
    for first, second in [
        (TaskStatus.SUCCESS, TaskStatus.FAILURE),
        (TaskStatus.FAILURE, TaskStatus.SUCCESS),
        (TaskStatus.CANCEL, TaskStatus.SUCCESS),
    ]:
        c = claims()

        async def body(store: TaskStore, c: CallbackClaims = c, a: TaskStatus = first,
                       b: TaskStatus = second) -> list[str]:
            return [(await store.apply(c, Update(s, None, "p"))).result for s in (a, b)]

        assert run(redis_server, body) == ["stored", "duplicate"]
        assert stored(redis_server, c)["status"] == first.value


def test_every_key_of_a_task_shares_one_slot(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    c = claims()
    run(redis_server, lambda store: store.apply(c, Update(TaskStatus.SUCCESS, None, "p")))
    keys = [k.decode() for k in r.keys("*")]
    assert KEYS.task("acme", c.job_id) in keys and KEYS.stream("acme") in keys
    assert len({key_slot(k.encode()) for k in keys}) == 1
    expected = [KEYS.task("acme", c.job_id), KEYS.history("acme", c.job_id),
                KEYS.stream("acme"), KEYS.last_event_id("acme"), KEYS.index("acme"),
                *(KEYS.index("acme", s) for s in TaskStatus)]
    assert len({key_slot(k.encode()) for k in expected}) == 1


def test_event_ids_are_shared_by_stream_and_history_and_increase(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    a, b = claims(), claims()

    async def body(store: TaskStore) -> None:
        await asyncio.gather(*(
            store.apply(c, Update(TaskStatus.IN_PROGRESS, p, f"p-{c.job_id}"))
            for p in range(1, 30) for c in (a, b)
        ))

    run(redis_server, body)
    tenant_ids = [i for i, _ in r.xrange(KEYS.stream("acme"))]
    assert len(tenant_ids) == 58
    for c in (a, b):
        for event_id, fields in history_entries(r, "acme", c.job_id):
            data = orjson.loads(fields[b"data"])
            assert data["event_id"] == event_id.decode()
            assert event_id in tenant_ids


def test_status_indexes_follow_the_task(redis_server: RedisServer, r: redis.Redis) -> None:
    c = claims()

    async def body(store: TaskStore) -> None:
        await store.create(c)
        await store.apply(c, Update(TaskStatus.IN_PROGRESS, 10, "p"))
        await store.apply(c, Update(TaskStatus.SUCCESS, None, "p"))

    run(redis_server, body)
    member = c.job_id.encode()
    assert r.zrange(KEYS.index("acme", "SUCCESS"), 0, -1) == [member]
    assert r.zcard(KEYS.index("acme", "IN_PROGRESS")) == 0
    assert r.zcard(KEYS.index("acme", "NOT_START")) == 0
    assert r.zrange(KEYS.index("acme"), 0, -1) == [member]


def test_publishes_the_stored_event(redis_server: RedisServer, r: redis.Redis) -> None:
    pubsub = r.pubsub()
    pubsub.subscribe(KEYS.channel("acme"))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"  # type: ignore[index]
    c = claims()
    run(redis_server, lambda store: store.apply(c, Update(TaskStatus.SUCCESS, None, "p")))
    message = pubsub.get_message(timeout=2)
    assert message is not None
    event = orjson.loads(message["data"])
    assert (event["id"], event["event"], event["status"]) == (c.job_id, "task.succeeded",
                                                              "SUCCESS")
    last = r.xrevrange(KEYS.stream("acme"), count=1)[0]
    assert last[1][b"data"] == message["data"]
    pubsub.close()


def test_streams_are_bounded(redis_server: RedisServer, r: redis.Redis) -> None:
    async def body(store: TaskStore) -> None:
        await asyncio.gather(*(
            store.apply(claims(), Update(TaskStatus.SUBMITTED, None, "p")) for _ in range(1000)
        ))

    run(redis_server, body, tenant_stream_maxlen=50)
    assert r.xlen(KEYS.stream("acme")) < 200  # MAXLEN ~ trims by whole nodes of 100


def test_a_callback_that_beats_the_submit_answer_is_matched_and_the_task_charged_once(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    c = CallbackClaims(new_job_id(), "acme", "aigc2d")
    billing = {"a": b"aigc2d", "b": b"aigc2d|-|IMAGINE|points\x00100\x001"}

    async def body(store: TaskStore) -> list[str]:
        await store.create(c, control=billing, action="IMAGINE", prompt="fox")
        return [o.result for o in (
            # the provider's first callbacks arrive before its answer to the submit
            await store.apply(c, Update(TaskStatus.IN_PROGRESS, 40, "777")),
            await store.submitted(c, Update(TaskStatus.SUBMITTED, provider_task_id="777")),
            await store.submitted(c, Update(TaskStatus.SUBMITTED, provider_task_id="777")),
            await store.apply(c, Update(TaskStatus.FAILURE, fail_reason="provider says no")),
            await store.apply(c, Update(TaskStatus.FAILURE, fail_reason="provider says no")),
        )]

    assert run(redis_server, body) == ["stored", "stale", "stale", "stored", "duplicate"]
    task = stored(redis_server, c)
    assert (task["provider_task_id"], task["status"], task["prompt"]) == ("777", "FAILURE", "fox")
    assert r.hgetall(KEYS.usage("acme")) == {  # charged once, refunded once
        b"aigc2d|-|IMAGINE|points|tasks": b"1", b"aigc2d|-|IMAGINE|points|spent": b"100",
        b"aigc2d|-|IMAGINE|points|refunded": b"100", b"@committed|points": b"0"}


def test_a_task_whose_submit_answer_was_lost_is_charged_by_its_first_callback(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    c = CallbackClaims(new_job_id(), "acme", "aigc2d")
    minted = CallbackClaims(new_job_id(), "acme", "aigc2d")  # POST /callback-urls: no account
    billing = {"a": b"aigc2d", "b": b"aigc2d|-|IMAGINE|points\x00100\x001"}

    async def body(store: TaskStore) -> None:
        await store.create(c, control=billing, action="IMAGINE")
        await store.create(minted, action="IMAGINE")
        for job in (c, minted):
            await store.apply(job, Update(TaskStatus.IN_PROGRESS, 40, "888"))
            await store.apply(job, Update(TaskStatus.SUCCESS, 100, "888"))

    run(redis_server, body)
    assert r.hgetall(KEYS.usage("acme")) == {
        b"aigc2d|-|IMAGINE|points|tasks": b"1", b"aigc2d|-|IMAGINE|points|spent": b"100",
        b"@committed|points": b"100"}


def test_an_update_that_binds_a_task_takes_the_ids_claim(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """On a single Redis the script takes the claim itself (on a cluster it answers
    `unclaimed` for the caller to: tests/store/test_cluster.py)."""
    c, other = claims(), claims()

    async def body(store: TaskStore) -> list[str]:
        await store.create(c)
        await store.create(other)
        seen = [
            (await store.apply(c, Update(TaskStatus.IN_PROGRESS, 10, "p9"), claimed=False)).result,
            # bound now: its own id needs no claim, another one is a conflict
            (await store.apply(c, Update(TaskStatus.IN_PROGRESS, 20, "p9"), claimed=False)).result,
            (await store.apply(c, Update(TaskStatus.IN_PROGRESS, 30, "p8"), claimed=False)).result,
        ]
        try:
            await store.apply(other, Update(TaskStatus.IN_PROGRESS, 10, "p9"), claimed=False)
        except ProviderTaskClaimed:
            seen.append("claimed")
        return seen

    assert run(redis_server, body) == ["stored", "stored", "conflict", "claimed"]
    assert stored(redis_server, c)["progress"] == 20
    assert stored(redis_server, other)["version"] == 1  # nothing stored
    assert r.get(KEYS.claim("mjproxy", "p9")) == f"acme/{c.job_id}".encode()


def test_quotas_count_the_last_task_ttl(redis_server: RedisServer, r: redis.Redis) -> None:
    """Three tasks and 100 KB per window of 8 buckets: what left the window frees room."""
    now = [100]

    class Clocked(Store):
        def _bucket(self) -> int:
            return now[0]

    async def body(_: TaskStore) -> list[Any]:
        client = Redis.from_url(redis_server.url)
        settings = base_settings(redis_server.url, tenant_max_tasks=3,
                                 tenant_max_bytes=100_000)
        store = Clocked(client, ScriptBatcher(redis_server.url, TRANSITION), settings)
        seen: list[Any] = []

        async def attempt(**fields: Any) -> Any:
            try:
                return (await store.create(claims(), **fields)).result
            except (TaskQuotaExceeded, StorageQuotaExceeded) as exc:
                return exc.code

        try:
            seen += [await attempt() for _ in range(4)]  # bucket 100
            now[0] = 107
            seen.append(await attempt())  # 100 is still in the window (100..107)
            now[0] = 108
            seen.append(await attempt())  # 100 left it: its three tasks are off the count
            now[0] = 120  # everything left the window
            seen += [await attempt(prompt="x" * 15_000) for _ in range(3)]  # ~45 KB each
        finally:
            await store.close()
            await client.aclose()
        return seen

    assert run(redis_server, body) == [
        "stored", "stored", "stored", "task_quota", "task_quota", "stored",
        "stored", "stored", "storage_quota"]


def test_quota_counts_exactly_with_a_clock_behind_and_buckets_leaving(
        redis_server: RedisServer) -> None:
    """The quota hash after creates and a callback, one from a process whose clock is a
    bucket behind (the window's bucket N stays), then a bucket that moves the window past
    them: every counter is what the script wrote, by bucket and in total."""
    now = [100]

    def clocked() -> CallbackClaims:  # a tenant of its own: no other test's counts
        return CallbackClaims(new_job_id(), "clocked", "mjproxy")

    class Clocked(Store):
        def _bucket(self) -> int:
            return now[0]

    async def body(_: TaskStore) -> list[dict[bytes, bytes]]:
        client = Redis.from_url(redis_server.url)
        store = Clocked(client, ScriptBatcher(redis_server.url, TRANSITION),
                        base_settings(redis_server.url, tenant_max_tasks=10,
                                      tenant_max_bytes=10**9))
        quota = KEYS.quota("clocked")
        seen = []
        try:
            first = clocked()
            await store.create(first)
            await store.apply(first, Update(TaskStatus.IN_PROGRESS, raw=b"x" * 500,
                                            progress=10), enforce=True)
            seen.append(await client.hgetall(quota))
            now[0] = 99  # another process, its clock a bucket behind
            await store.create(clocked())
            seen.append(await client.hgetall(quota))
            assert 0 < await client.ttl(quota) <= 8 * store._bucket_seconds
            now[0] = 108  # 99 and 100 left the window
            await store.create(clocked())
            seen.append(await client.hgetall(quota))
            now[0] = 109  # a callback, not a create: no task counted in bucket 109
            await store.apply(first, Update(TaskStatus.IN_PROGRESS, raw=b"x", progress=20),
                              enforce=True)
            seen.append(await client.hgetall(quota))
            assert await client.ttl(quota) > 0
        finally:
            await store.close()
            await client.aclose()
        return seen

    at_100, behind, moved, callback = run(redis_server, body)
    assert at_100[b"N"] == b"100" and at_100[b"T"] == at_100[b"t100"] == b"1"
    assert at_100[b"B"] == at_100[b"b100"] and int(at_100[b"B"]) > 500
    assert behind[b"N"] == b"100" and behind[b"T"] == b"2" and behind[b"t99"] == b"1"
    assert int(behind[b"B"]) == int(behind[b"b100"]) + int(behind[b"b99"])
    assert moved.keys() == {b"N", b"T", b"B", b"t108", b"b108"}
    assert moved[b"N"] == b"108" and moved[b"T"] == moved[b"t108"] == b"1"
    assert moved[b"B"] == moved[b"b108"]
    assert callback.keys() == {b"N", b"T", b"B", b"t108", b"b108", b"b109"}
    assert callback[b"N"] == b"109" and callback[b"T"] == b"1"
    assert int(callback[b"B"]) == int(callback[b"b108"]) + int(callback[b"b109"])


def test_transition_luas_table_names_keys_and_argv_as_store_builds_them() -> None:
    """The table at the head of transition.lua is the order `store` sends things in."""
    head = (files("receiver.store") / "transition.lua").read_text()
    table = head.split("-- KEYS", 1)[1].split("\n\n", 1)[0]
    keys_doc, argv_doc = table.split("-- ARGV", 1)
    documented = re.findall(r"(\d+) (\w+)", keys_doc)
    fields = len(TransitionKeys._fields)
    assert [name for _, name in documented] == [*TransitionKeys._fields, "claim"]
    assert [int(n) for n, _ in documented] == list(range(1, fields + 2))
    # the header's map from a status to its index's position, and the claim's
    assert "local STATUS_INDEX = {NOT_START = 8, SUBMITTED = 9, IN_PROGRESS = 10, " \
        "MODAL = 11, SUCCESS = 12, FAILURE = 13, CANCEL = 14}" in TRANSITION
    assert f"local CLAIM = {fields + 1}" in TRANSITION
    assert f"local ARCHIVE = {fields}" in TRANSITION and TransitionKeys._fields[-1] == "archive"
    argv = re.findall(r"(\d+) (\w+)", argv_doc)
    assert [name for _, name in argv][:len(TransitionArgs._fields)] == \
        list(TransitionArgs._fields)
    assert [int(n) for n, _ in argv][:len(TransitionArgs._fields)] == \
        list(range(1, len(TransitionArgs._fields) + 1))


# `v` as every version so far wrote it: processes of an earlier version, during a rolling
# upgrade, read and write it this way (fields added since live in `x`).
V_LAYOUT = ("id", "tenant", "provider", "provider_task_id", "action", "mode", "status",
            "progress", "prompt", "final_prompt", "image_url", "image_urls", "buttons",
            "fail_reason", "parent_id", "cost", "created_at", "submitted_at", "started_at",
            "finished_at", "updated_at", "version")


def test_v_keeps_its_layout_and_a_task_without_x_reads_the_added_fields_as_defaults(
        redis_server: RedisServer, r: redis.Redis) -> None:
    assert CORE_FIELDS == V_LAYOUT
    c = claims()
    run(redis_server, lambda store: store.apply(c, Update(TaskStatus.IN_PROGRESS, 40, "p1",
                                                          image_url="u")))
    before = stored(redis_server, c)
    values = r.hget(KEYS.task("acme", c.job_id), "v").split(b"\0")
    assert len(values) == len(V_LAYOUT) and values[V_LAYOUT.index("image_url")] == b'"u"'
    # only an archive writes `x`: the task has none, as an earlier version left it, and is
    # read back whole, the new fields as their defaults
    assert r.hget(KEYS.task("acme", c.job_id), "x") is None
    assert before["archived_image_url"] is None and before["archived_image_urls"] == []
    outcome = run(redis_server, lambda store: store.apply(c, Update(
        TaskStatus.SUCCESS, 100, "p1", image_url="v")))
    assert outcome.result == "stored"
    after = stored(redis_server, c)
    assert after["version"] == before["version"] + 1 and after["image_url"] == "v"
    assert after["progress"] == 100 and after["prompt"] == before["prompt"]
    assert r.hget(KEYS.task("acme", c.job_id), "x") is None
    outcome = run(redis_server, lambda store: store.archived(c, "a", ["a1"]))
    assert outcome.result == "stored"
    assert r.hget(KEYS.task("acme", c.job_id), "x") == b'"a"\0["a1"]'
    assert stored(redis_server, c)["archived_image_urls"] == ["a1"]


def test_the_archive_is_one_transition_after_success_and_only_then(
        redis_server: RedisServer, r: redis.Redis) -> None:
    done, running, bare, missing = claims(), claims(), claims(), claims()

    async def body(store: TaskStore) -> list[str]:
        await store.apply(done, Update(TaskStatus.SUCCESS, 100, "p1", image_url="u",
                                       image_urls=["u1", "u2"]))
        await store.apply(running, Update(TaskStatus.IN_PROGRESS, 50, "p2", image_url="u"))
        await store.apply(bare, Update(TaskStatus.SUCCESS, 100, "p3"))  # no image
        queued = await store.redis.zrange(KEYS.archive("acme"), 0, -1)
        assert queued == [done.job_id.encode()]
        # its history compacted (the stream deleted) before the archive's entry comes
        await store.redis.delete(KEYS.history("acme", done.job_id))
        results = [(await store.archived(done, "a", ["a1", None])).result]
        # the stream the archive started again goes with its task (if no compaction,
        # started by this final state, took it first)
        ttl = await store.redis.pttl(KEYS.history("acme", done.job_id))
        task_ttl = await store.redis.pttl(KEYS.task("acme", done.job_id))
        assert ttl == -2 or 0 <= ttl - task_ttl < 1000  # (read a moment apart)
        return results + [(await store.archived(*args)).result for args in [
            (done, "a", ["a1", None]), (running, "a", []), (missing, "a", [])]]

    assert run(redis_server, body, image_store="file:///unused") == [
        "stored", "duplicate", "stale", "stale"]
    task = stored(redis_server, done)
    assert (task["archived_image_url"], task["archived_image_urls"]) == ("a", ["a1", None])
    assert task["status"] == "SUCCESS" and task["version"] == 2
    assert [f[b"event"] for _, f in history_entries(r, "acme", done.job_id)][-1:] == [
        b"task.archived"]
    assert r.exists(KEYS.task("acme", missing.job_id)) == 0
    assert stored(redis_server, running)["archived_image_url"] is None


def test_no_archive_is_queued_without_an_image_store(
        redis_server: RedisServer, r: redis.Redis) -> None:
    c = claims()
    run(redis_server, lambda store: store.apply(c, Update(TaskStatus.SUCCESS, 100, "p1",
                                                          image_url="u")), image_store="")
    assert r.zcard(KEYS.archive("acme")) == 0
    run(redis_server, lambda store: store.apply(claims(), Update(
        TaskStatus.SUCCESS, 100, "p2", image_url="u")), image_store="file:///unused")
    assert r.zcard(KEYS.archive("acme")) == 1


def test_what_a_budget_counts_follows_every_charge_refund_and_task_that_never_ran(
        redis_server: RedisServer, r: redis.Redis) -> None:
    """`@committed|<unit>`: reserved at create, kept by the charge, given back by a refund or
    by an end with no charge, taken again by a late charge or a refund taken back."""
    billing = {"a": b"aigc2d", "b": b"aigc2d|-|IMAGINE|points\x00100\x001"}
    ran, unanswered, over = (CallbackClaims(new_job_id(), "acme", "aigc2d") for _ in range(3))
    committed = KEYS.usage("acme"), "@committed|points"

    async def body(store: TaskStore) -> tuple[str, list[int]]:
        for c in (ran, unanswered):
            await store.create(c, control=billing, action="IMAGINE", budget=250)
        try:
            await store.create(over, control=billing, action="IMAGINE", budget=250)
            refused = ""
        except BudgetExceeded as exc:
            refused = exc.detail
        seen = []
        for c, update in [
            (ran, Update(TaskStatus.SUBMITTED, provider_task_id="1")),  # charged: kept
            (unanswered, Update(TaskStatus.FAILURE, fail_reason="timed out", inferred=True)),
            (ran, Update(TaskStatus.FAILURE, "1", fail_reason="no", inferred=True)),  # refund
            (ran, Update(TaskStatus.SUCCESS, 100, "1")),  # the refund taken back
            (unanswered, Update(TaskStatus.SUCCESS, 100, "2")),  # it ran after all: charged
        ]:
            if update.status is TaskStatus.SUBMITTED:
                await store.submitted(c, update)
            else:
                await store.apply(c, update)
            seen.append(int(await store.redis.hget(*committed)))
        return refused, seen

    refused, seen = run(redis_server, body)
    assert "committed 200 points of its budget of 250" in refused
    assert r.exists(KEYS.task("acme", over.job_id)) == 0  # refused: nothing stored
    assert seen == [200, 100, 0, 100, 200]
    assert r.hget(KEYS.usage("acme"), "aigc2d|-|IMAGINE|points|spent") == b"200"
