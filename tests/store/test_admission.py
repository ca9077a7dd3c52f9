"""Admission against a real Redis: slots never outnumber the limit however many dispatchers
race, every task is popped once and oldest first, and final tasks free their slots."""

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


def member(i: int) -> Member:
    return Member("acme", f"{1_700_000_000_000 + i:012x}{i:08x}")


async def race(url: str, tasks: int, limit: int, dispatchers: int, seed: int) -> list[int]:
    """Dispatchers on their own connections take slots and finish tasks at random; returns
    the slots in use seen after every acquire."""
    clients = [Redis.from_url(url) for _ in range(dispatchers)]
    admissions = [Admission(c, KEYS) for c in clients]
    for i in range(tasks):
        await admissions[0].enqueue("acct", member(i))
    rng = random.Random(seed)
    popped: list[Member] = []
    in_use: list[int] = []

    async def dispatcher(admission: Admission) -> None:
        while True:
            got = await admission.acquire("acct", limit, 0)
            if got is None:
                if await admission.redis.zcard(KEYS.queue("acct")) == 0:
                    return
                await asyncio.sleep(0)
                continue
            popped.append(got)
            in_use.append(await admission.redis.zcard(KEYS.slots("acct")))
            await asyncio.sleep(rng.random() / 1000)
            await admission.release("acct", got)  # the task ended

    try:
        await asyncio.gather(*(dispatcher(a) for a in admissions))
    finally:
        for c in clients:
            await c.aclose()
    assert sorted(popped) == sorted(member(i) for i in range(tasks))  # each exactly once
    return in_use


@given(tasks=st.integers(1, 40), limit=st.integers(1, 6), dispatchers=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_racing_dispatchers_never_exceed_the_limit(
        redis_server: RedisServer, tasks: int, limit: int, dispatchers: int, seed: int) -> None:
    redis.Redis(port=redis_server.port).flushall()
    in_use = asyncio.run(race(redis_server.url, tasks, limit, dispatchers, seed))
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
