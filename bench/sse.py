"""Live events over SSE: the receiver's one-subscription hub against one subscription per client.

Two servers, side by side in one run, on one uvicorn worker each with the same flags and
against the same throwaway Redis:

- **ours**, ``receiver.app:create_app``: one PSUBSCRIBE per process (``receiver.events.hub``)
  feeds every SSE client of the process through bounded in-memory queues;
- **naive**, ``bench.naive_sse:create_app``: the pattern a user would write instead, every
  SSE client opening its own Redis pub/sub subscription to the tenant's channel and
  forwarding what arrives (sse-starlette on both sides).

Events are real: callbacks POSTed to our service, whose transition script publishes each
stored event on ``receiver:events:{default}``, the channel the naive app's clients listen
to. So both sides deliver the same events; only the fan-out differs. Measured:

(a) latency from just before a callback's POST is written to the moment a subscriber's
    client reads the event, at a steady paced rate (default 1,000 callbacks/s for 10 s,
    10 subscribers on ``GET /events``); goal for ours: p99 < 10 ms;
(b) idle SSE connections one worker holds, and the server's memory per connection
    (VmRSS before and after, over N); for the naive side Redis's memory and clients too,
    since each connection is also a Redis client; goal for ours: 10,000 at < 10 KB each;
(c) fan-out: 1,000 subscribers, one callback, the time until the last one has it.

The clients are raw asyncio protocols (GET, de-chunk, split events, time-stamp the read),
so that the client's cost stays small next to the servers'. Results go to stdout,
raw samples and server logs to ``bench/results/sse/``, the table to the ``## bench/sse``
section of ``BENCHMARKS.md``.

    .venv/bin/python -m bench.sse [--quick] [--sides ours,naive] [--rate 1000]
                                  [--duration 10] [--rounds 2] [--connections 10000]
                                  [--fanout 1000] [--events 20] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
import uvloop

from bench.ingest import (
    CALLBACKS_PER_JOB,
    PROGRESS_STEPS,
    ROOT,
    SERVICE_ENV,
    callbacks,
    mint,
    write_markdown,
)
from bench.sse_clients import (
    APPS,
    NOFILE,
    PRODUCERS,
    SIDES,
    Answer,
    Poster,
    Server,
    SseClient,
    channel_subscribers,
    connect,
    cpu_seconds,
    disconnect,
    event_key,
    machine_cpu,
    raise_nofile,
    redis_figures,
    uvicorn_child,
)
from bench.sse_report import (
    GOAL_CONNECTIONS,
    GOAL_P99_MS,
    SECTION,
    FanOut,
    Holding,
    Latency,
    Results,
    merge,
    ms,
    percentile,
    report,
    slow_seconds,
)
from receiver.cli.redis_server import RedisServer
from receiver.core.constants import DEFAULT_PREFIX

# --- phases --------------------------------------------------------------------------------


@dataclass
class Shot:
    key: tuple[str, int]  # (job id, progress): what the event will carry
    target: str
    body: bytes


def shots(jobs: Sequence[tuple[str, str]], first_id: int, window: int) -> list[Shot]:
    """Every job's callbacks (bench.ingest's: IN_PROGRESS 1..99%, then SUCCESS at 100),
    ``window`` jobs interleaved, so a job's successive callbacks are ``window`` slots apart
    and arrive in order."""
    out: list[Shot] = []
    progress = [*PROGRESS_STEPS, 100]
    for start in range(0, len(jobs), window):
        group = [(job, path, callbacks(str(first_id + start + j), f"sse cat {start + j}"))
                 for j, (job, path) in enumerate(jobs[start:start + window])]
        for step in range(CALLBACKS_PER_JOB):
            out.extend(Shot((job, progress[step]), path, bodies[step])
                       for job, path, bodies in group)
    return out



class Bench:
    """The three measures, against the running servers and Redis."""

    def __init__(self, args: argparse.Namespace, servers: dict[str, Server],
                 client: redis.Redis, redis_pid: int) -> None:
        self.args = args
        self.servers = servers
        self.redis = client
        # whose CPU time (a) reports: the servers, Redis, and this process (the clients)
        self.pids = {**{name: s.pid for name, s in servers.items()}, "redis": redis_pid,
                     "client": os.getpid()}
        self.out_dir = ROOT / "bench" / "results" / "sse"  # raw figures; git-ignored
        self.next_id = int(time.time() * 1e6)  # provider task ids: distinct numeric strings

    def log(self, text: str) -> None:
        print(text, flush=True)

    def producer(self, side: str) -> Server:
        """Where the side's callbacks go: the side itself if it is the receiver's app (ingest
        and fan-out in one process), else our service, which publishes what naive reads."""
        return self.servers[side if side in PRODUCERS else "ours"]

    async def fresh_jobs(self, side: str, count: int) -> tuple[list[tuple[str, str]], int]:
        """``count`` freshly minted jobs (callback paths) and the first provider id for them."""
        jobs = await mint(self.producer(side).base, count)
        first = self.next_id
        self.next_id += count
        return jobs, first

    async def subscribed(self, side: str, clients: Sequence[SseClient], wanted: int,
                         timeout: float = 60.0) -> int:
        """Wait until the side's clients are live (ours: every one has its first event, which
        the receiver sends once registered; naive: Redis counts ``wanted`` subscribers to
        the channel, or stops growing); the number subscribed."""
        if side != "naive":  # the hub's clients get a first comment once registered
            firsts = [c.first for c in clients]
            if firsts:
                await asyncio.wait(firsts, timeout=timeout)
            return sum(1 for c in clients
                       if c.first.done() and c.first.result() and not c.closed.done())
        deadline = time.monotonic() + timeout
        seen, stable_since = -1, time.monotonic()
        while True:
            count = channel_subscribers(self.redis)
            if count >= wanted:
                return count
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif time.monotonic() - stable_since > 5 or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.05)

    # (a) ---------------------------------------------------------------------------------

    async def latency(self, side: str) -> Latency:
        args, server = self.args, self.servers[side]
        total = round(args.rate * (args.warmup + args.duration))
        warm = round(args.rate * args.warmup)
        jobs, first = await self.fresh_jobs(side, math.ceil(total / CALLBACKS_PER_JOB))
        plan = shots(jobs, first, window=256)[:total]
        fds = server.fds()
        clients, failures = await connect(server, "/events", args.subscribers,
                                          ready="headers")
        if failures:
            raise RuntimeError(f"{side}: {failures} of {args.subscribers} subscribers failed")
        if await self.subscribed(side, clients, args.subscribers) < args.subscribers:
            raise RuntimeError(f"{side}: not every subscriber got subscribed")
        poster = Poster(self.producer(side).port)
        await poster.open(16)
        self.log(f"  {side}: {len(clients)} subscribers; {total:,} callbacks at "
                 f"{args.rate:,.0f}/s ({args.warmup:g}s warm-up + {args.duration:g}s)")
        answers: list[Answer | None] = [None] * total
        late = 0
        gc.disable()  # no collector pauses in the client while it times things
        cpu_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        machine_before = machine_cpu()
        began = time.perf_counter()
        try:
            pending: set[asyncio.Task[None]] = set()

            async def shoot(i: int) -> None:
                try:
                    answers[i] = await poster.post(plan[i].target, plan[i].body)
                except (OSError, asyncio.IncompleteReadError):
                    now = time.perf_counter()
                    answers[i] = Answer(now, now, 0, "error")  # counted as an error

            start = time.perf_counter() + 0.05
            for i in range(total):
                due = start + i / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif i >= warm and -delay > 0.002:
                    late += 1
                task = asyncio.create_task(shoot(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
            async with asyncio.timeout(30):
                await asyncio.gather(*pending)
            # every stored event at every subscriber, or give up after a few seconds
            stored = sum(1 for a in answers if a is not None and a.result == "stored")
            deadline = time.monotonic() + 5
            while (sum(c.data_events for c in clients) < stored * len(clients)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.05)
        finally:
            elapsed = time.perf_counter() - began
            cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / elapsed
                   for name, pid in self.pids.items()}
            busy, stolen = (now - then for now, then in zip(machine_cpu(), machine_before,
                                                             strict=True))
            others = max(0.0, busy / elapsed - sum(cpu.values()))
            gc.enable()
            await poster.close()
            await disconnect(clients)
            await self.settle(server, fds)  # gone from the server (and Redis) before the next

        sent = {plan[i].key: a for i, a in enumerate(answers) if i >= warm and a is not None}
        samples: list[float] = []
        timeline: list[tuple[float, float]] = []
        origin = min((a.sent_at for a in sent.values()), default=0.0)
        for client in clients:
            for read_at, event in client.events:
                answer = sent.get(event_key(event))
                if answer is not None and answer.result == "stored":
                    samples.append((read_at - answer.sent_at) * 1e3)
                    timeline.append((answer.sent_at - origin, samples[-1]))
        measured = list(sent.values())
        return Latency(
            subscribers=len(clients), shots=len(measured),
            stored=sum(1 for a in measured if a.result == "stored"), received=len(samples),
            samples_ms=samples, post_ms=[(a.answered_at - a.sent_at) * 1e3 for a in measured],
            late=late, errors=sum(1 for a in measured if a.status != 200),
            connections=poster.opened, cpu=cpu, others=others, steal=stolen / elapsed,
            timeline=sorted(timeline),
        )

    # (b) ---------------------------------------------------------------------------------

    async def settle(self, server: Server, fds: int, timeout: float = 60.0) -> None:
        """Until the server is back to about ``fds`` descriptors (its clients are gone)."""
        deadline = time.monotonic() + timeout
        while server.fds() > fds + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)

    def naive_room(self) -> tuple[str, int]:
        """How many clients the naive app can hold at most, and what bounds it: Redis's
        maxclients less the clients it has, and the app's descriptors, two per client (its
        socket and its Redis connection) under the open-files limit."""
        server = self.servers["naive"]
        config = cast(dict[str, str], self.redis.config_get("maxclients"))
        maxclients = int(config["maxclients"])
        others = redis_figures(self.redis)["connected_clients"]
        nofile = int(server.nofile())
        fds = server.fds()
        by_redis, by_fds = maxclients - others, (nofile - fds) // 2
        note = (f"bounded by Redis maxclients {maxclients:,} less {others} other clients = "
                f"{by_redis:,}, and by the app's open-files limit {nofile:,} less {fds} open "
                f"= {by_fds:,} clients at two descriptors each")
        return note, min(by_redis, by_fds)

    async def holding(self, side: str) -> Holding:
        server = self.servers[side]
        wanted = self.args.connections
        limit_note = ""
        if side == "naive":  # each connection is a Redis client too
            note, room = self.naive_room()
            if room < wanted:
                limit_note, wanted = note, room
        await asyncio.sleep(1.0)
        rss_before, fds_before = server.rss_kib(), server.fds()
        redis_before = redis_figures(self.redis)
        self.log(f"  {side}: opening {wanted:,} idle connections (RSS before "
                 f"{rss_before / 1024:.1f} MiB, {fds_before} fds)")
        began = time.perf_counter()
        clients, failures = await connect(server, "/events", wanted, keep=False,
                                          ready="headers" if side == "naive" else "first")
        opened = len(clients)
        subscribed = await self.subscribed(side, clients, opened)
        open_seconds = time.perf_counter() - began
        probe: list[SseClient] = []
        try:
            await asyncio.sleep(3.0)  # let allocations settle
            held = min(subscribed, sum(1 for c in clients if not c.closed.done()))
            rss_after, fds_after = server.rss_kib(), server.fds()
            redis_after = redis_figures(self.redis)
            self.log(f"  {side}: {held:,} held after {open_seconds:.1f}s, RSS after "
                     f"{rss_after / 1024:.1f} MiB, {fds_after} fds, "
                     f"{(rss_after - rss_before) / max(held, 1):.2f} KiB each")
            if wanted < self.args.connections:  # show that the limit is real: a few more
                probe, failed = await connect(server, "/events", 10, ready="headers",
                                              answer_within=5)
                probed = time.monotonic()  # redis-py retries a refused connection a while
                while (not all(c.closed.done() for c in probe)
                       and time.monotonic() - probed < 20):
                    await asyncio.sleep(0.5)
                lost = sum(1 for c in probe if c.closed.done())
                limit_note += (f"; 10 more connections past that: {failed} not answered "
                               "within 5 s, "
                               f"{lost} answered and then closed by the app within "
                               f"{time.monotonic() - probed:.0f} s, subscribers went from "
                               f"{held:,} to {channel_subscribers(self.redis):,}")
        finally:
            began = time.perf_counter()
            await disconnect([*clients, *probe])
            await self.settle(server, fds_before)
            if side == "naive":
                deadline = time.monotonic() + 30
                while channel_subscribers(self.redis) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
        closed = (f"{server.fds()} fds, {redis_figures(self.redis)['connected_clients']} Redis "
                  f"clients, {time.perf_counter() - began:.1f}s after closing")
        self.log(f"  {side}: closed: {closed}")
        return Holding(wanted=self.args.connections, opened=opened, held=held,
                       failures=failures, open_seconds=open_seconds,
                       rss_before_kib=rss_before, rss_after_kib=rss_after,
                       fds_before=fds_before, fds_after=fds_after,
                       redis_before=redis_before, redis_after=redis_after, probe=limit_note,
                       closed=closed)

    # (c) ---------------------------------------------------------------------------------

    async def fan_out(self, side: str) -> FanOut:
        args, server = self.args, self.servers[side]
        jobs, first = await self.fresh_jobs(side, args.events)
        result = FanOut(args.fanout, args.events)
        loop = asyncio.get_running_loop()
        waiting: dict[str, Any] = {"left": 0, "done": loop.create_future()}

        def on_data() -> None:
            waiting["left"] -= 1
            if waiting["left"] == 0 and not waiting["done"].done():
                waiting["done"].set_result(None)

        clients, failures = await connect(server, "/events", args.fanout, on_data=on_data,
                                          ready="headers" if side == "naive" else "first")
        if failures or await self.subscribed(side, clients, args.fanout) < args.fanout:
            await disconnect(clients)
            raise RuntimeError(f"{side}: not all {args.fanout} fan-out subscribers are live")
        poster = Poster(self.producer(side).port)
        await poster.open(1)
        self.log(f"  {side}: {len(clients)} subscribers, {args.events} events")
        gc.disable()  # no collector pauses in the client while it times things
        try:
            await asyncio.sleep(0.5)
            cpu_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
            for n, (job, path) in enumerate(jobs):
                waiting.update(left=len(clients), done=loop.create_future())
                body = callbacks(str(first + n), f"fan-out cat {n}")[0]
                answer = await poster.post(path, body)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiting["done"], 10)
                times = [read_at - answer.sent_at for client in clients
                         for read_at, event in client.events
                         if event_key(event) == (job, PROGRESS_STEPS[0])]
                result.missing += len(clients) - len(times)
                if times:
                    result.last_ms.append(max(times) * 1e3)
                    result.median_ms.append(percentile(times, 50) * 1e3)
                    result.first_ms.append(min(times) * 1e3)
                for client in clients:
                    client.events.clear()
                await asyncio.sleep(0.2)
            result.cpu_ms = {name: (cpu_seconds(pid) - cpu_before[name]) * 1e3 / len(jobs)
                             for name, pid in self.pids.items()}
        finally:
            gc.enable()
            await poster.close()
            fds = server.fds() - len(clients) * (2 if side == "naive" else 1)
            await disconnect(clients)
            await self.settle(server, fds)
        return result



# --- main ----------------------------------------------------------------------------------


def report_run(bench: Bench, side: str, n: int, lat: Latency) -> None:
    """One (a) run: a log line, and its samples in time order as CSV in bench/results/sse."""
    bench.log(f"  {side}: p50 {ms(percentile(lat.samples_ms, 50))}, p99 "
              f"{ms(percentile(lat.samples_ms, 99))}, {lat.received:,}/{lat.expected:,} "
              f"events read, {lat.late} late sends, {lat.errors} errors; CPU "
              + ", ".join(f"{k} {v:.0%}" for k, v in lat.cpu.items())
              + f", other processes {lat.others:.0%}, steal {lat.steal:.0%}"
              + f"; over 10 ms by second: {slow_seconds(lat, GOAL_P99_MS)}")
    with (bench.out_dir / f"latency-{side}-{n + 1}.csv").open("w") as f:
        f.write("sent_s,latency_ms\n")
        f.writelines(f"{at:.6f},{value:.3f}\n" for at, value in lat.timeline)


async def run(bench: Bench, phases: str) -> Results:
    res = Results()
    async with asyncio.timeout(bench.args.budget):
        if "a" in phases:
            bench.log("(a) latency at a steady rate")
            for n in range(bench.args.rounds):
                sides = bench.args.sides if n % 2 == 0 else bench.args.sides[::-1]
                for side in sides:
                    lat = await bench.latency(side)
                    res.latency_runs.setdefault(side, []).append(lat)
                    report_run(bench, side, n, lat)
            res.latency = {side: merge(runs) for side, runs in res.latency_runs.items()}
        if "b" in phases:
            bench.log("(b) idle connections and memory")
            for side in bench.args.sides:
                res.holding[side] = await bench.holding(side)
        if "c" in phases:
            bench.log("(c) fan-out")
            for side in bench.args.sides:
                res.fan_out[side] = await bench.fan_out(side)
                fan = res.fan_out[side]
                bench.log(f"  {side}: last subscriber p50 {ms(percentile(fan.last_ms, 50))}, "
                          f"max {ms(max(fan.last_ms, default=math.nan))}")
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench.sse", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run: one 3s run at the rate, 2,000 connections, 200 "
                        "fan-out subscribers, 10 events")
    parser.add_argument("--rate", type=float, default=1000, help="(a) callbacks per second")
    parser.add_argument("--duration", type=float, default=10, help="(a) measured seconds")
    parser.add_argument("--warmup", type=float, default=1, help="(a) unmeasured seconds first")
    parser.add_argument("--rounds", type=int, default=2,
                        help="(a) runs per side, the order reversed every other round")
    parser.add_argument("--subscribers", type=int, default=10, help="(a) SSE subscribers")
    parser.add_argument("--connections", type=int, default=GOAL_CONNECTIONS,
                        help="(b) idle connections to open")
    parser.add_argument("--fanout", type=int, default=1000, help="(c) subscribers")
    parser.add_argument("--events", type=int, default=20, help="(c) callbacks, one at a time")
    parser.add_argument("--phases", default="abc", help="which of a, b, c to run")
    parser.add_argument("--sides", default=",".join(SIDES),
                        type=lambda text: [s for s in text.split(",") if s],
                        help=f"which servers to measure, of {', '.join(APPS)}")
    parser.add_argument("--budget", type=float, default=600,
                        help="seconds after which the run gives up")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not args.sides or set(args.sides) - set(APPS):
        parser.error(f"--sides takes some of {', '.join(APPS)}")
    if args.quick:
        args.duration, args.rounds = 3, 1
        args.connections, args.fanout, args.events = 2000, 200, 10

    limit = raise_nofile(NOFILE)  # before any child starts: they inherit it
    if limit < 2 * args.connections + 1000:
        print(f"bench.sse: open-files limit {limit} is low for {args.connections} "
              "connections (each naive one is two descriptors in its server)", file=sys.stderr)
    out_dir = ROOT / "bench" / "results" / "sse"  # server logs; git-ignored
    out_dir.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sse-") as tmp:
        store = RedisServer(data_dir=Path(tmp) / "redis", persist=False).start()
        client = redis.Redis.from_url(store.url)
        try:
            redis_version = str(cast(dict[str, Any], client.info("server"))["redis_version"])
            env = {**os.environ, "REDIS_URL": store.url,
                   "RECEIVER_SECRET_KEYS": secrets.token_urlsafe(32),
                   "RECEIVER_API_KEYS": "", "SSE_MAX_PER_TENANT": "0", "PUBLIC_BASE_URL": "",
                   "REDIS_PREFIX": DEFAULT_PREFIX, **SERVICE_ENV}
            with contextlib.ExitStack() as stack:
                for side in dict.fromkeys(["ours", *args.sides]):  # ours is the producer
                    servers[side] = stack.enter_context(
                        uvicorn_child(side, APPS[side], env, out_dir / f"{side}.log"))
                limits = f"{limit} (servers: " + ", ".join(
                    f"{name} {s.nofile()}" for name, s in servers.items()) + ")"
                assert store.process is not None
                bench = Bench(args, servers, client, store.process.pid)
                res = uvloop.run(run(bench, args.phases))
        finally:
            client.close()
            store.stop()

    section = report(res, args, argv, servers, limits, redis_version)
    print()
    print(section)
    if not args.no_write:
        write_markdown(section, ROOT / "BENCHMARKS.md", SECTION)
        print(f"written to {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
