"""Admission against a real Redis: slots never outnumber the limit however many dispatchers
race, every task is popped once, a tenant's oldest first, tenants in turn, and final tasks
free their slots."""

from __future__ import annotations

import asyncio
import random

import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from receiver.cli.redis_server import RedisServer
from receiver.store.admission import Admission, Member
from tests.conftest import KEYS


def member(i: int, tenant: str = "acme") -> Member:
    return Member(tenant, f"{1_700_000_000_000 + i:012x}{i:08x}")


async def race(url: str, tasks: int, limit: int, dispatchers: int, seed: int,
               tenants: int = 1, cap: int = 0) -> list[int]:
    """Dispatchers on their own connections take slots and finish tasks at random; returns
    the slots in use seen after every acquire."""
    clients = [Redis.from_url(url) for _ in range(dispatchers)]
    admissions = [Admission(c, KEYS, tenant_cap=cap) for c in clients]
    queued = [member(i, f"t{i % tenants}") for i in range(tasks)]
    for m in queued:
        await admissions[0].enqueue("acct", m)
    rng = random.Random(seed)
    popped: list[Member] = []
    in_use: list[int] = []

    async def dispatcher(admission: Admission) -> None:
        while True:
            got = await admission.acquire("acct", limit, 0)
            if got is None:
                if (await admission.depth("acct"))[0] == 0:
                    return
                await asyncio.sleep(0)
                continue
            popped.append(got)
            in_use.append(await admission.redis.zcard(KEYS.slots("acct")))
            if cap:
                held = await admission.redis.hget(KEYS.in_flight("acct"), got.tenant)
                assert int(held) <= cap
            await asyncio.sleep(rng.random() / 1000)
            await admission.release("acct", got)  # the task ended

    try:
        await asyncio.gather(*(dispatcher(a) for a in admissions))
    finally:
        for c in clients:
            await c.aclose()
    assert sorted(popped) == sorted(queued)  # each exactly once
    return in_use


@given(tasks=st.integers(1, 40), limit=st.integers(1, 6), dispatchers=st.integers(1, 4),
       seed=st.integers(0, 2**16), tenants=st.integers(1, 4), cap=st.integers(0, 3))
def test_racing_dispatchers_never_exceed_the_limit(redis_server: RedisServer, tasks: int,
                                                   limit: int, dispatchers: int, seed: int,
                                                   tenants: int, cap: int) -> None:
    """Nor any tenant its cap (TENANT_MAX_IN_FLIGHT), and every task is sent once."""
    redis.Redis(port=redis_server.port).flushall()
    in_use = asyncio.run(race(redis_server.url, tasks, limit, dispatchers, seed, tenants,
                              cap))
    assert max(in_use) <= limit


def test_oldest_first_and_requeue_keeps_the_place(r: redis.Redis,
                                                  redis_server: RedisServer) -> None:
    async def scenario() -> list[Member | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i in (3, 1, 2):
                await admission.enqueue("acct", member(i))
            first = await admission.acquire("acct", 5, 0)
            assert first is not None
            await admission.requeue("acct", first)  # the provider's queue was full
            return [await admission.acquire("acct", 5, 0) for _ in range(4)]

    assert asyncio.run(scenario()) == [member(1), member(2), member(3), None]


def test_tenants_take_turns_a_small_one_is_not_queued_behind_a_large_one(
        r: redis.Redis, redis_server: RedisServer) -> None:
    """One account, limit 3: A queues 18, three are sent; then B queues 3. As slots free, B's
    three go within the next few, not after A's other 15."""
    async def scenario() -> tuple[list[str], dict[str, int]]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i in range(18):
                await admission.enqueue("acct", member(i, "a"))
            running = [await admission.acquire("acct", 3, 0) for _ in range(3)]
            for i in range(100, 103):
                await admission.enqueue("acct", member(i, "b"))
            waiting = await admission.waiting("acct")
            order: list[str] = []
            while running:
                done = running.pop(0)
                assert done is not None
                await admission.release("acct", done)  # a task ended: a slot is free
                nxt = await admission.acquire("acct", 3, 0)
                if nxt is not None:
                    order.append(nxt.tenant)
                    running.append(nxt)
            return order, waiting

    order, waiting = asyncio.run(scenario())  # "abababaaaaaaaaaaaa"
    assert waiting == {"a": 15, "b": 3}
    assert len(order) == 18 and order.count("b") == 3
    assert max(i for i, t in enumerate(order) if t == "b") <= 5, order  # B's last by the 6th
    assert order[:6].count("a") == 3  # and A not starved meanwhile


def test_tasks_queued_before_per_tenant_queues_are_sent_first(
        r: redis.Redis, redis_server: RedisServer) -> None:
    """An upgrade strands no task: the one queue of before is drained first."""
    old = member(1, "a")
    r.zadd(KEYS.legacy_queue("acct"), {str(old): old.created_ms})

    async def scenario() -> list[Member | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            await admission.enqueue("acct", member(2, "b"))
            assert await admission.depth("acct") == (2, 0)
            return [await admission.acquire("acct", 5, 0) for _ in range(3)]

    assert asyncio.run(scenario()) == [old, member(2, "b"), None]


def test_prune_frees_final_and_vanished_tasks_and_keeps_inferred_ones_watched(
        r: redis.Redis, redis_server: RedisServer) -> None:
    states = {0: (b"200", b"IN_PROGRESS"), 1: (b"1000", b"SUCCESS"),
              2: (b"900", b"FAILURE"), 3: None}  # 3: its record expired
    for i, state in states.items():
        r.zadd(KEYS.slots("acct"), {str(member(i)): 1})
        if state is not None:
            r.hset(KEYS.task("acme", member(i).job_id), mapping={"r": state[0], "s": state[1]})

    async def prune() -> int:
        async with Redis.from_url(redis_server.url) as client:
            return await Admission(client, KEYS).prune("acct")

    assert asyncio.run(prune()) == 1
    assert r.zrange(KEYS.slots("acct"), 0, -1) == [str(member(0)).encode()]
    assert r.zrange(KEYS.inferred("acct"), 0, -1) == [str(member(2)).encode()]


def test_a_tenant_at_its_cap_waits_and_keeps_its_turn(
        r: redis.Redis, redis_server: RedisServer) -> None:
    """TENANT_MAX_IN_FLIGHT=2 at an account of 5 slots: no tenant holds more than 2, even
    with slots free; when one of A's frees, A goes next."""
    async def scenario() -> list[str]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS, tenant_cap=2)
            for i in range(6):
                await admission.enqueue("acct", member(i, "a"))
            taken = [await admission.acquire("acct", 5, 0) for _ in range(3)]
            assert [m.tenant if m else None for m in taken] == ["a", "a", None]
            for i in range(10, 13):
                await admission.enqueue("acct", member(i, "b"))
            more = [await admission.acquire("acct", 5, 0) for _ in range(4)]
            assert [m.tenant if m else None for m in more] == ["b", "b", None, None]
            assert r.hgetall(KEYS.in_flight("acct")) == {b"a": b"2", b"b": b"2"}
            assert r.zcard(KEYS.slots("acct")) == 4  # one free, and nobody may take it
            first = taken[0]
            assert first is not None
            await admission.release("acct", first)
            await admission.requeue("acct", more[0])  # type: ignore[arg-type]
            after = [await admission.acquire("acct", 5, 0) for _ in range(3)]
            return [m.tenant if m else "-" for m in after]

    assert asyncio.run(scenario()) == ["a", "b", "-"]  # A's turn first, then B's requeued one
    assert r.hgetall(KEYS.in_flight("acct")) == {b"a": b"2", b"b": b"2"}


def test_in_flight_counts_are_taken_again_from_the_slots(
        r: redis.Redis, redis_server: RedisServer) -> None:
    """A count gone wrong (a crash, a process of an older version freeing a slot without
    counting) is repaired by the next slot freed: no tenant stays stuck at its cap."""
    async def scenario() -> Member | None:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS, tenant_cap=2)
            for i in range(4):
                await admission.enqueue("acct", member(i, "a"))
            first = await admission.acquire("acct", 5, 0)
            assert first is not None
            r.hset(KEYS.in_flight("acct"), "a", 7)  # drifted: "a" looks far over its cap
            assert await admission.acquire("acct", 5, 0) is None
            await admission.prune("acct")  # the task is gone: its slot is freed
            return await admission.acquire("acct", 5, 0)

    assert asyncio.run(scenario()) == member(1, "a")
    assert r.hgetall(KEYS.in_flight("acct")) == {b"a": b"1"}
