"""Admission: dispatch decisions per second, and how fair they are.

Against a real redis-server: 1,000 tenants with tasks queued for one pool of 10 accounts (a
provider's, ACCOUNTS_FILE); dispatchers (asyncio tasks on connections of their own, as
workers would be) take a slot (the ACQUIRE script: the tenant whose turn it is, its oldest
task, the least loaded account that may take it) and free it at once, as if the provider
answered at once. Then fairness: one account, a limit of 3, a large tenant queues 1,000 tasks
and then a small one queues 10: at which positions of the sends that follow do the small
tenant's go?

    .venv/bin/python -m bench.admission [--runs 5] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from bench.ingest import machine, publish
from receiver.cli.redis_server import RedisServer
from receiver.core.constants import Keys
from receiver.store.admission import Account, Admission, Member

KEYS = Keys()
ACCOUNTS, TENANTS, PER_TENANT, LIMIT, DISPATCHERS = 10, 1000, 5, 50, 8
POOL = [Account(f"acct{i}", LIMIT, modes=("FAST", "RELAX") if i % 2 else ())
        for i in range(ACCOUNTS)]
ONE = [Account("acct", 3)]


def member(tenant: str, n: int) -> Member:
    return Member(tenant, f"{1_700_000_000_000 + n:012x}{n:08x}")


async def decisions(url: str) -> float:
    """Decisions (a slot taken and freed) per second, until every queue is empty."""
    setup = Redis.from_url(url)
    await setup.flushall()
    admission = Admission(setup, KEYS)
    n = 0
    for t in range(TENANTS):
        for _ in range(PER_TENANT):
            await admission.enqueue("pool", member(f"tenant{t}", n),
                                    mode="FAST" if n % 3 else None)
            n += 1
    clients = [Redis.from_url(url) for _ in range(DISPATCHERS)]
    done = 0

    async def dispatcher(k: int) -> None:
        nonlocal done
        mine = Admission(clients[k], KEYS)
        while True:
            got = await mine.acquire("pool", POOL, 0)
            if got is None:
                return
            assert got.account is not None
            await mine.release("pool", got.account, got.member)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(dispatcher(k) for k in range(DISPATCHERS)))
    elapsed = time.perf_counter() - started
    for client in (setup, *clients):
        await client.aclose()
    assert done == n, (done, n)
    return done / elapsed


async def fairness(url: str) -> list[int]:
    """The 1-based positions, among the sends after it queued, of the small tenant's tasks."""
    client = Redis.from_url(url)
    await client.flushall()
    admission = Admission(client, KEYS)
    for n in range(1000):
        await admission.enqueue("acct", member("large", n))
    running = [await admission.acquire("acct", ONE, 0) for _ in range(3)]
    for n in range(1000, 1010):
        await admission.enqueue("acct", member("small", n))
    sent: list[str] = []
    while running:
        finished = running.pop(0)
        assert finished is not None
        await admission.release("acct", "acct", finished.member)
        nxt = await admission.acquire("acct", ONE, 0)
        if nxt is not None:
            sent.append(nxt.member.tenant)
            running.append(nxt)
    await client.aclose()
    return [i + 1 for i, tenant in enumerate(sent) if tenant == "small"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.admission", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", persist=False).start()
        try:
            rates = []
            for run in range(args.runs):
                rates.append(asyncio.run(decisions(server.url)))
                print(f"run {run + 1}: {rates[-1]:,.0f} decisions/s", flush=True)
            positions = asyncio.run(fairness(server.url))
        finally:
            server.stop()
    lines = [
        "## bench/admission",
        "",
        f"Dispatch decisions (ACQUIRE: the tenant whose turn it is, its oldest task, the "
        f"least loaded account that serves its mode, a slot; then the slot freed) against "
        f"one redis-server: {TENANTS:,} tenants with {PER_TENANT} tasks each (two in three "
        f"FAST, which half the accounts serve) queued for one pool of {ACCOUNTS} accounts "
        f"(limit {LIMIT} each), {DISPATCHERS} dispatchers on connections of their own, until "
        f"every queue is empty. `.venv/bin/python -m bench.admission` regenerates this "
        f"section.",
        "",
        f"- machine: {machine()}",
        f"- **median {statistics.median(rates):,.0f} decisions/s**; every run: "
        + ", ".join(f"{r:,.0f}" for r in rates),
        "- fairness: one account at a limit of 3, a tenant queues 1,000 tasks, then another "
        f"queues 10; the small tenant's tasks go at sends {', '.join(map(str, positions))} of "
        "those that follow (first come, first served: 998 to 1,007)",
        "",
    ]
    publish(lines, "## bench/admission", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
