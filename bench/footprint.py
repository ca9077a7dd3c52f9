"""Redis bytes per finished task, measured from outside: a real ``receiver serve`` and a
real redis-server; tasks minted and driven to their end with callbacks over HTTP; Redis's
``used_memory`` before and after, divided by the tasks (the tenant stream capped small, so
it does not count). Workloads: trueai-shaped IMAGINE (ten progress steps of ~1 KB, then a
SUCCESS with nine buttons, as bench/ingest sends), a DESCRIBE, a FAILURE, an OhMyGPT task.

    .venv/bin/python -m bench.footprint [--tasks 400] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import redis

from bench.ingest import callbacks, publish, receiver_server
from receiver.cli.redis_server import RedisServer

DAY_TASKS = (10_000, 100_000, 1_000_000)
TTL_DAYS = (1, 7, 30)


def imagine(n: int) -> tuple[str, list[bytes]]:
    return "mjproxy", callbacks(str(10**15 + n), f"footprint cat {n}, watercolor --ar 3:2")


def describe(n: int) -> tuple[str, list[bytes]]:
    ptid = str(2 * 10**15 + n)
    text = "\n\n".join(f"{i}️⃣ a watercolor cat on a windowsill, soft morning light, "
                       f"muted palette, study {n} --ar 3:2" for i in range(1, 5))
    task: dict[str, Any] = {"id": ptid, "action": "DESCRIBE", "status": "IN_PROGRESS",
                            "progress": "50%", "prompt": "", "promptEn": "",
                            "imageUrl": "https://cdn.discordapp.com/attachments/1/2/in.png",
                            "submitTime": 1, "startTime": 2, "properties": {}, "buttons": []}
    first = orjson.dumps(task)
    task.update(status="SUCCESS", progress="100%", prompt=text, promptEn=text,
                properties={"finalPrompt": text}, finishTime=3)
    return "mjproxy", [first, orjson.dumps(task)]


def failure(n: int) -> tuple[str, list[bytes]]:
    bodies = callbacks(str(3 * 10**15 + n), f"footprint fox {n}")[:3]
    task = orjson.loads(bodies[-1])
    task.update(status="FAILURE", progress="", failReason="Banned prompt detected")
    return "mjproxy", [*bodies, orjson.dumps(task)]


def ohmygpt(n: int) -> tuple[str, list[bytes]]:
    out = []
    task: dict[str, Any] = {
        "taskId": 4 * 10**6 + n, "taskType": "FAST", "action": "IMAGINE",
        "description": f"/imagine footprint owl {n}", "prompt": f"footprint owl {n}",
        "submitTime": "2026-12-03T10:00:00.000Z", "startTime": "2026-12-03T10:00:03.000Z",
        "webhookUrl": "https://example.com/callbacks/ohmygpt?token=REDACTED",
        "imageS3Url": None, "failReason": None, "actions": []}
    for pct in (10, 35, 60, 85):
        task.update(status="IN_PROGRESS", progress=f"{pct}%",
                    imageDcUrl=f"https://cdn.discordapp.com/attachments/{n}/{pct}/p.webp")
        out.append(orjson.dumps(task))
    task.update(status="SUCCESS", progress="100%", finishTime="2026-12-03T10:01:00.000Z",
                imageDcUrl=f"https://cdn.discordapp.com/attachments/{n}/grid.png",
                actions=[{"customId": f"MJ::JOB::{k}::{i}::{n:032x}", "emoji": "",
                          "label": f"{k[0].upper()}{i}"}
                         for k in ("upsample", "variation") for i in range(1, 5)])
    out.append(orjson.dumps(task))
    return "ohmygpt", out


WORKLOADS: dict[str, Callable[[int], tuple[str, list[bytes]]]] = {
    "IMAGINE, trueai-shaped (11 callbacks: 10 progress, SUCCESS with 9 buttons)": imagine,
    "DESCRIBE (2 callbacks)": describe,
    "FAILURE (4 callbacks)": failure,
    "OhMyGPT IMAGINE (5 callbacks)": ohmygpt,
}


async def drive(base: str, make: Callable[[int], tuple[str, list[bytes]]], first: int,
                count: int, workers: int = 8) -> None:
    """``count`` tasks minted and driven to their end, ``workers`` at a time."""
    numbers = iter(range(first, first + count))
    async with httpx.AsyncClient(base_url=base, timeout=10.0, trust_env=False) as client:
        async def worker() -> None:
            for n in numbers:
                provider, bodies = make(n)
                doc = (await client.post("/callback-urls", json={
                    "provider": provider, "prompt": f"footprint {n}"})).json()
                url = urlsplit(doc["callback_url"])
                for body in bodies:
                    resp = await client.post(f"{url.path}?{url.query}", content=body)
                    assert resp.status_code == 200, resp.text

        await asyncio.gather(*(worker() for _ in range(workers)))


def settled_memory(r: redis.Redis) -> int:
    """used_memory once background work (compaction) has stopped changing it."""
    last = -1
    for _ in range(100):
        time.sleep(0.3)
        now = int(r.info("memory")["used_memory"])
        if now == last:
            return now
        last = now
    return last


def measure(base: str, r: redis.Redis, tasks: int) -> dict[str, float]:
    per_task: dict[str, float] = {}
    first = 0
    for name, make in WORKLOADS.items():
        asyncio.run(drive(base, make, first, 20))  # the tenant's keys exist before
        first += 20
        before = settled_memory(r)
        asyncio.run(drive(base, make, first, tasks))
        first += tasks
        per_task[name] = (settled_memory(r) - before) / tasks
        print(f"{name}: {per_task[name] / 1024:.2f} KiB per finished task", flush=True)
    return per_task


def capacity(kib: float) -> list[str]:
    rows = ["| tasks a day | " + " | ".join(f"TASK_TTL {d} d" for d in TTL_DAYS) + " |",
            "| ---: | " + " | ".join("---:" for _ in TTL_DAYS) + " |"]
    for day in DAY_TASKS:
        cells = [f"{day * d * kib / 1024**2:,.1f} GB" for d in TTL_DAYS]
        rows.append(f"| {day:,} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.footprint", description=__doc__)
    parser.add_argument("--tasks", type=int, default=400, help="tasks per workload")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            env = {"REDIS_URL": server.url, "RECEIVER_SECRET_KEYS": "bench-key",
                   "TENANT_STREAM_MAXLEN": "100", "MINT_RATE": "0", "CALLBACK_RATE": "0",
                   "RECEIVER_DATA_DIR": str(Path(tmp) / "data")}
            with receiver_server(env, Path(tmp) / "serve.log") as base:
                per_task = measure(base, redis.Redis.from_url(server.url), args.tasks)
        finally:
            server.stop()
    lines = [
        "## bench/footprint",
        "",
        "Redis memory per finished task (`used_memory` before and after, divided by the "
        f"tasks; {args.tasks} tasks a workload through a real `receiver serve`, the tenant "
        "stream capped at 100 events so that it does not count). `.venv/bin/python -m "
        "bench.footprint` regenerates this section.",
        "",
        "| workload | Redis per finished task |",
        "| --- | ---: |",
        *(f"| {name} | {kib / 1024:.2f} KiB |" for name, kib in per_task.items()),
        "",
        "Capacity, for the trueai-shaped IMAGINE (tasks a day kept `TASK_TTL`):",
        "",
        *capacity(next(iter(per_task.values())) / 1024),
        "",
    ]
    publish(lines, "## bench/footprint", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
