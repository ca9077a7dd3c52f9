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
from receiver.store.admission import Account, Admission, Member, Taken
from tests.conftest import KEYS


def member(i: int, tenant: str = "acme") -> Member:
    return Member(tenant, f"{1_700_000_000_000 + i:012x}{i:08x}")


async def take(admission: Admission, limit: int) -> Member | None:
    """A pool of one account, "acct", as the <PROVIDER>_* variables make it."""
    taken = await admission.acquire("acct", [Account("acct", limit)], 0)
    assert taken is None or taken.account == "acct"
    return None if taken is None else taken.member


async def race(url: str, pool: list[Account], tasks: int, dispatchers: int, seed: int,
               tenants: int = 1, cap: int = 0, moded: bool = False) -> dict[str, list[int]]:
    """Dispatchers on their own connections take slots of the pool's accounts and finish
    tasks at random (``moded``: the tasks ask for a mode at random). Returns, per account,
    its slots in use after each task it took; checks every task went once, to an account
    that serves its mode, and no tenant held more than ``cap`` of an account's slots."""
    clients = [Redis.from_url(url) for _ in range(dispatchers)]
    admissions = [Admission(c, KEYS, tenant_cap=cap) for c in clients]
    rng = random.Random(seed)
    modes = {m: rng.choice([None, "FAST", "RELAX"]) if moded else None
             for m in (member(i, f"t{i % tenants}") for i in range(tasks))}
    for m, mode in modes.items():
        await admissions[0].enqueue("p", m, mode)
    popped: list[Member] = []
    in_use: dict[str, list[int]] = {a.name: [] for a in pool}
    served = {a.name: a.modes for a in pool}

    async def dispatcher(admission: Admission) -> None:
        while True:
            got = await admission.acquire("p", pool, 0)
            if got is None:
                if await admission.depth("p") == 0:
                    return
                await asyncio.sleep(0)
                continue
            assert got.account is not None
            mode = modes[got.member]
            assert not served[got.account] or mode is None or mode in served[got.account]
            popped.append(got.member)
            in_use[got.account].append(await admission.in_use("p", got.account))
            if cap:
                held = await admission.redis.hget(KEYS.in_flight(got.account, "p"),
                                                  got.member.tenant)
                assert int(held) <= cap
            await asyncio.sleep(rng.random() / 1000)
            await admission.release("p", got.account, got.member)  # the task ended

    try:
        await asyncio.gather(*(dispatcher(a) for a in admissions))
    finally:
        for c in clients:
            await c.aclose()
    assert sorted(popped) == sorted(modes)  # each exactly once
    return in_use


@given(tasks=st.integers(1, 40), limit=st.integers(1, 6), dispatchers=st.integers(1, 4),
       seed=st.integers(0, 2**16), tenants=st.integers(1, 4), cap=st.integers(0, 3))
def test_racing_dispatchers_never_exceed_the_limit(redis_server: RedisServer, tasks: int,
                                                   limit: int, dispatchers: int, seed: int,
                                                   tenants: int, cap: int) -> None:
    """Nor any tenant its cap (TENANT_MAX_IN_FLIGHT), and every task is sent once."""
    redis.Redis(port=redis_server.port).flushall()
    in_use = asyncio.run(race(redis_server.url, [Account("p", limit)], tasks, dispatchers,
                              seed, tenants, cap))
    assert max(in_use["p"]) <= limit


def test_oldest_first_and_requeue_keeps_the_place(r: redis.Redis,
                                                  redis_server: RedisServer) -> None:
    async def scenario() -> list[Member | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i in (3, 1, 2):
                await admission.enqueue("acct", member(i))
            first = await take(admission, 5)
            assert first is not None
            await admission.requeue("acct", "acct", first)  # the provider's queue was full
            return [await take(admission, 5) for _ in range(4)]

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
            running = [await take(admission, 3) for _ in range(3)]
            for i in range(100, 103):
                await admission.enqueue("acct", member(i, "b"))
            waiting = await admission.waiting("acct")
            order: list[str] = []
            while running:
                done = running.pop(0)
                assert done is not None
                await admission.release("acct", "acct", done)  # a task ended: a slot is free
                nxt = await take(admission, 3)
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
            assert await admission.depth("acct") == 2
            return [await take(admission, 5) for _ in range(3)]

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
            return await Admission(client, KEYS).prune("acct", "acct")

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
            taken = [await take(admission, 5) for _ in range(3)]
            assert [m.tenant if m else None for m in taken] == ["a", "a", None]
            for i in range(10, 13):
                await admission.enqueue("acct", member(i, "b"))
            more = [await take(admission, 5) for _ in range(4)]
            assert [m.tenant if m else None for m in more] == ["b", "b", None, None]
            assert r.hgetall(KEYS.in_flight("acct")) == {b"a": b"2", b"b": b"2"}
            assert r.zcard(KEYS.slots("acct")) == 4  # one free, and nobody may take it
            first = taken[0]
            assert first is not None
            await admission.release("acct", "acct", first)
            await admission.requeue("acct", "acct", more[0])  # type: ignore[arg-type]
            after = [await take(admission, 5) for _ in range(3)]
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
            first = await take(admission, 5)
            assert first is not None
            r.hset(KEYS.in_flight("acct"), "a", 7)  # drifted: "a" looks far over its cap
            assert await take(admission, 5) is None
            await admission.prune("acct", "acct")  # the task is gone: its slot is freed
            return await take(admission, 5)

    assert asyncio.run(scenario()) == member(1, "a")
    assert r.hgetall(KEYS.in_flight("acct")) == {b"a": b"1"}


# --- pools: a provider's accounts ----------------------------------------------------------

POOL = [Account("a", 2), Account("b", 4), Account("c", 3, modes=("RELAX",))]


@given(tasks=st.integers(1, 40), dispatchers=st.integers(1, 4), seed=st.integers(0, 2**16),
       cap=st.integers(0, 3))
def test_racing_dispatchers_never_exceed_any_accounts_limit_in_a_pool(
        redis_server: RedisServer, tasks: int, dispatchers: int, seed: int, cap: int) -> None:
    """And each task goes once, to an account that serves its mode, its tenant within the
    cap at each account."""
    redis.Redis(port=redis_server.port).flushall()
    in_use = asyncio.run(race(redis_server.url, POOL, tasks, dispatchers, seed, tenants=3,
                              cap=cap, moded=True))
    for account in POOL:
        assert max(in_use[account.name], default=0) <= account.limit


def test_the_least_loaded_account_for_its_limit_and_weight_takes_the_task(
        r: redis.Redis, redis_server: RedisServer) -> None:
    async def sent_to(pool: list[Account], tasks: int) -> list[str | None]:
        r.flushall()
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i in range(tasks):
                await admission.enqueue("p", member(i))
            taken = [await admission.acquire("p", pool, 0) for _ in range(tasks + 1)]
            return [t.account if t else None for t in taken]

    # limits 2 and 4: B (1/4 used) before A (1/2), then in turn, until both are full
    assert asyncio.run(sent_to([Account("a", 2), Account("b", 4)], 6)) == [
        "b", "a", "b", "b", "a", "b", None]
    # the same limit, A weighted 3: A takes three for each of B's
    assert asyncio.run(sent_to([Account("a", 4, 3.0), Account("b", 4)], 4)) == [
        "a", "a", "a", "b", None]


def test_an_action_goes_to_its_parents_account_or_fails_if_it_left_the_pool(
        r: redis.Redis, redis_server: RedisServer) -> None:
    pool = [Account("a", 1), Account("b", 1)]

    async def scenario() -> list[Taken | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            await admission.enqueue("p", member(1, "x"), affinity="b")
            await admission.enqueue("p", member(2, "y"))
            await admission.enqueue("p", member(3, "x"), affinity="b")
            await admission.enqueue("p", member(4, "z"), affinity="gone")
            first = [await admission.acquire("p", pool, 0) for _ in range(3)]  # both full
            await admission.release("p", "b", member(1, "x"))
            # z's account is gone: handed back (still queued) until the caller withdraws it
            then = [await admission.acquire("p", pool, 0) for _ in range(2)]
            await admission.withdraw("p", member(4, "z"))
            return [*first, *then, await admission.acquire("p", pool, 0)]

    # the actions are taken bound to their account (the dispatcher need not check again)
    assert asyncio.run(scenario()) == [
        Taken(member(1, "x"), "b", bound=True), Taken(member(2, "y"), "a"), None,
        Taken(member(4, "z"), None), Taken(member(4, "z"), None),
        Taken(member(3, "x"), "b", bound=True)]
    assert r.hlen(KEYS.routes("p")) == 1  # member 3's, until its slot is freed


def test_a_benched_account_is_skipped_and_a_mode_goes_where_it_is_served(
        r: redis.Redis, redis_server: RedisServer) -> None:
    pool = [Account("a", 5, modes=("RELAX",)), Account("b", 5), Account("c", 5)]
    r.hset(KEYS.health("c", "p"), "paused_until", 2_000)  # benched until t=2000 ms

    async def scenario() -> list[str | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i, mode in enumerate(["FAST", "RELAX", "FAST", None]):
                await admission.enqueue("p", member(i), mode)
            at_1s = [await admission.acquire("p", pool, 1_000) for _ in range(4)]
            await admission.enqueue("p", member(9), "FAST")
            at_3s = await admission.acquire("p", pool, 3_000)  # c is back
            return [t.account if t else None for t in [*at_1s, at_3s]]

    # FAST: only b (a is RELAX only, c benched); RELAX: a (less loaded than b by then)
    assert asyncio.run(scenario()) == ["b", "a", "b", "a", "c"]


def test_a_task_waits_for_its_modes_account_without_holding_up_the_others_behind_it(
        r: redis.Redis, redis_server: RedisServer) -> None:
    pool = [Account("fast", 3, modes=("FAST",)), Account("relax", 1, modes=("RELAX",))]

    async def scenario() -> list[Taken | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i, mode in enumerate(["RELAX", "RELAX", "FAST", "FAST", "TURBO"]):
                await admission.enqueue("p", member(i), mode)
            return [await admission.acquire("p", pool, 0) for _ in range(4)]

    # the second RELAX waits for the relax account; the FAST ones behind it go; TURBO, which
    # no account serves, is handed back to be failed
    assert asyncio.run(scenario()) == [
        Taken(member(0), "relax"), Taken(member(2), "fast"), Taken(member(3), "fast"),
        Taken(member(4), None)]


def test_an_account_that_serves_no_mode_takes_only_tasks_that_name_none(
        r: redis.Redis, redis_server: RedisServer) -> None:
    """novicezk has no modes: in a pool with a trueai account, a FAST task waits for the
    trueai one (it would fail at novicezk); a task with no mode may go to either."""
    pool = [Account("novicezk", 5, modes=()), Account("trueai", 1, modes=("FAST", "RELAX"))]

    async def scenario() -> list[Taken | None]:
        async with Redis.from_url(redis_server.url) as client:
            admission = Admission(client, KEYS)
            for i, mode in enumerate(["FAST", "FAST", None]):
                await admission.enqueue("p", member(i), mode)
            return [await admission.acquire("p", pool, 0) for _ in range(3)]

    assert asyncio.run(scenario()) == [
        Taken(member(0), "trueai"), Taken(member(2), "novicezk"), None]
