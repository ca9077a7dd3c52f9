"""The archive's bookkeeping on a real Redis: leases on queued tasks, and images deleted only
once no task needs them (never while an archive extends them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis
from redis.asyncio import Redis

from receiver.cli.redis_server import RedisServer
from receiver.images import ArchiveQueue, ImageLedger, ImageStore, image_name
from receiver.images.ledger import Pending
from receiver.simulator._http import _png
from tests.conftest import KEYS

JOB = "0190000000000000abcd"


def test_a_queued_task_is_one_workers_until_its_lease_runs_out(
        redis_server: RedisServer, r: redis.Redis) -> None:
    async def scenario() -> list[list[Pending]]:
        async with Redis.from_url(redis_server.url) as client:
            r.zadd(KEYS.archive("acme"), {JOB: 0})
            first = ArchiveQueue(client, KEYS, lease=0.3)
            second = ArchiveQueue(client, KEYS, lease=0.3)
            taken = [await first.take(["acme", "beta"]), await second.take(["acme", "beta"])]
            await asyncio.sleep(0.4)  # the first worker died: its lease runs out
            taken.append(await second.take(["acme"]))
            await second.retry(taken[-1][0], 60)
            taken.append(await first.take(["acme"]))  # not due for a minute
            await second.done(Pending("acme", JOB))
            return taken

    assert asyncio.run(scenario()) == [[Pending("acme", JOB)], [], [Pending("acme", JOB)], []]
    assert r.zcard(KEYS.archive("acme")) == 0


def test_an_image_goes_when_no_task_needs_it_and_not_while_one_extends_it(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    store = ImageStore(f"file://{tmp_path}")
    png = _png(rgb=b"\x09\x08\x07")
    name = image_name(png, "image/png")

    async def scenario() -> tuple[list[str], bool, bool, bool]:
        async with Redis.from_url(redis_server.url) as client:
            ledger = ImageLedger(client, KEYS)
            await ledger.keep(name, 0, lambda: store.put(name, png))
            await asyncio.sleep(0.01)
            expired = await ledger.expired()
            # an archive of another task with the same bytes extends it, holding its lock:
            # a sweep now must neither wait for it nor delete the image
            lock = client.lock(KEYS.image_lock(name), timeout=10)
            assert await lock.acquire()
            during = await ledger.forget(name, store.delete)
            await client.zadd(KEYS.images(), {name: int(time.time() * 1000) + 60_000})
            await lock.release()
            extended = await ledger.forget(name, store.delete)
            await client.zadd(KEYS.images(), {name: 1})
            swept = await ledger.forget(name, store.delete)
            return expired, during, extended, swept

    expired, during, extended, swept = asyncio.run(scenario())
    assert expired == [name]
    assert (during, extended, swept) == (False, False, True)
    assert asyncio.run(store.open(name)) is None
    assert r.zcard(KEYS.images()) == 0


def test_keeping_an_image_never_shortens_its_life(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    store = ImageStore(f"file://{tmp_path}")
    png = _png(rgb=b"\x01\x01\x01")
    name = image_name(png, "image/png")

    async def scenario() -> None:
        async with Redis.from_url(redis_server.url) as client:
            ledger = ImageLedger(client, KEYS)
            await ledger.keep(name, 3600, lambda: store.put(name, png))
            await ledger.keep(name, 10, lambda: store.put(name, png))

    asyncio.run(scenario())
    assert r.zscore(KEYS.images(), name) > (time.time() + 3000) * 1000
