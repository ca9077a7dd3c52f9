"""Live events over SSE: the receiver's one-subscription hub against one subscription per client.

Two servers, side by side in one run, on one uvicorn worker each with the same flags and
against the same throwaway Redis:

- **ours**, ``receiver.app:create_app``: one PSUBSCRIBE per process (``receiver.events``)
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
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import orjson
import redis
import uvloop

from bench.ingest import (
    CALLBACKS_PER_JOB,
    HOST,
    OURS_APP,
    PROGRESS_STEPS,
    ROOT,
    UVICORN_FLAGS,
    callbacks,
    child_server,
    machine,
    mint,
    uvicorn_command,
    write_markdown,
)
from receiver.constants import DEFAULT_PREFIX, Keys
from receiver.redis_server import RedisServer, free_port
from receiver.settings import DEFAULT_TENANT

NAIVE_APP = "bench.naive_sse:create_app"
APPS = {"ours": OURS_APP, "asgi": OURS_APP, "naive": NAIVE_APP}
# The HTTP protocol of each side: `receiver serve`'s, or uvicorn's own (httptools).
PROTOCOL = {"ours": "receiver.listener:StreamProtocol"}
SIDES = ("ours", "asgi", "naive")
# The sides that take the callbacks themselves (the receiver's app); naive's come from ours.
PRODUCERS = frozenset({"ours", "asgi"})
LABEL = {"ours": "receiver (`receiver serve`)", "asgi": "receiver, uvicorn's protocol",
         "naive": "naive (pub/sub per client)"}
CHANNEL = Keys(DEFAULT_PREFIX).channel(DEFAULT_TENANT)
NOFILE = 65_536  # wanted for this process and (inherited) the servers and Redis
EVENT_END = b"\r\n\r\n"  # sse-starlette's default line separator is CRLF
GOAL_P99_MS = 10.0
GOAL_CONNECTIONS = 10_000
GOAL_KB_PER_CONNECTION = 10.0
GOAL_FANOUT_MS = 100.0
SECTION = "## bench/sse"


# --- processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A uvicorn child serving one app; its memory and descriptors read from /proc."""

    name: str
    port: int
    pid: int

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def nofile(self) -> str:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
        return "?"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def uvicorn_child(name: str, app: str, env: dict[str, str], log_path: Path) -> Iterator[Server]:
    """``python -m uvicorn <app>`` with the shared flags (`bench.server` for another HTTP
    protocol); stopped (then killed) on exit."""
    port = free_port()
    command = uvicorn_command(app, port)
    if name in PROTOCOL:
        command = [sys.executable, "-m", "bench.server", app, "--port", str(port),
                   "--http", PROTOCOL[name]]
    with child_server(command, port, env, log_path) as proc:
        yield Server(name, port, proc.pid)


def raise_nofile(wanted: int) -> int:
    """Raise this process's descriptor limit (children inherit it); the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):  # not allowed past the hard limit: go as far as it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- clients -------------------------------------------------------------------------------


class SseClient(asyncio.Protocol):
    """One SSE subscriber on a raw socket: sends the GET, reads the headers, de-chunks the body
    and splits it into events, each stamped with the time the read that completed it began.
    Only events with a ``data:`` line count (pings and the receiver's hello are comments)."""

    def __init__(self, path: str, keep: bool = True,
                 on_data: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n"
        self.keep = keep
        self.on_data = on_data
        self.status = 0
        self.headers: asyncio.Future[int] = loop.create_future()  # the status; 0: closed
        self.first: asyncio.Future[bool] = loop.create_future()  # any event; False: closed
        self.closed: asyncio.Future[None] = loop.create_future()
        self.events: list[tuple[float, bytes]] = []  # (read at, event), if keep
        self.data_events = 0
        self.transport: asyncio.Transport | None = None
        self._raw = bytearray()
        self._body = bytearray()
        self._chunked = False
        self._chunk_left = -1  # bytes of the current chunk still to come, -1 = a size line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request.encode())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        raw = self._raw
        raw += data
        if not self.headers.done():
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(raw[:end]).lower()
            del raw[:end + 4]
            self.status = int(head.split(b" ", 2)[1])
            self._chunked = b"transfer-encoding: chunked" in head
            self.headers.set_result(self.status)
        if self._chunked:
            self._dechunk()
        else:
            self._body += raw
            raw.clear()
        body = self._body
        while (end := body.find(EVENT_END)) >= 0:
            event = bytes(body[:end])
            del body[:end + 4]
            if not self.first.done():
                self.first.set_result(True)
            if b"data:" in event:
                self.data_events += 1
                if self.keep:
                    self.events.append((now, event))
                if self.on_data is not None:
                    self.on_data()

    def _dechunk(self) -> None:
        raw = self._raw
        while raw:
            if self._chunk_left < 0:
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                self._chunk_left = int(bytes(raw[:end]).split(b";")[0], 16)
                del raw[:end + 2]
                if self._chunk_left == 0:  # the last chunk: the stream ended
                    raw.clear()
                    return
            if len(raw) < self._chunk_left + 2:
                return
            self._body += raw[:self._chunk_left]
            del raw[:self._chunk_left + 2]
            self._chunk_left = -1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.headers.done():
            self.headers.set_result(0)
        if not self.first.done():
            self.first.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def event_key(event: bytes) -> tuple[str, int]:
    """(job id, progress) of an event, from its ``data:`` line (the task snapshot)."""
    for line in event.split(b"\r\n"):
        if line.startswith(b"data:"):
            doc = orjson.loads(line[5:])
            return doc["id"], doc["progress"]
    raise ValueError(f"no data line in {event[:200]!r}")


async def connect(server: Server, path: str, count: int, *, keep: bool = True,
                  ready: str = "first", concurrency: int = 200,
                  on_data: Callable[[], None] | None = None, answer_within: float = 30.0,
                  timeout: float = 120.0) -> tuple[list[SseClient], int]:
    """``count`` SSE clients, ``concurrency`` connecting at a time; each is ready at its
    headers (``ready="headers"``) or at its first event (``"first"``). (the clients that got
    ready, how many did not; those are closed)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    clients: list[SseClient] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with gate:
            client: SseClient | None = None
            try:
                _, client = await loop.create_connection(
                    lambda: SseClient(path, keep, on_data), HOST, server.port)
                status = await asyncio.wait_for(client.headers, answer_within)
                if status != 200:
                    raise ConnectionError(f"status {status}")
                if ready == "first" and not await asyncio.wait_for(client.first,
                                                                   answer_within):
                    raise ConnectionError("closed before its first event")
                clients.append(client)
            except (OSError, TimeoutError):
                failures += 1
                if client is not None:
                    client.close()

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(one() for _ in range(count)))
    return clients, failures


async def disconnect(clients: Sequence[SseClient]) -> None:
    for client in clients:
        client.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 30)


@dataclass
class Answer:
    sent_at: float
    answered_at: float
    status: int
    result: str


class Poster:
    """Keep-alive HTTP/1.1 POSTs on raw asyncio streams, one request per connection at a
    time, connections used in turn (uvicorn closes one idle for 5 s); a request that finds
    every connection busy opens another, so the load stays open-loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.opened = 0

    async def open(self, count: int) -> None:
        for _ in range(count):
            self.idle.append(await asyncio.open_connection(HOST, self.port))
            self.opened += 1

    async def post(self, target: str, body: bytes) -> Answer:
        while self.idle and self.idle[0][0].at_eof():  # closed by the server meanwhile
            self.idle.popleft()[1].close()
        if self.idle:
            reader, writer = self.idle.popleft()
        else:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.opened += 1
        request = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s") % (target.encode(), HOST.encode(),
                                                       len(body), body)
        sent_at = time.perf_counter()
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        answer = await reader.readexactly(length)
        answered_at = time.perf_counter()
        self.idle.append((reader, writer))
        status = int(head.split(b" ", 2)[1])
        result = orjson.loads(answer).get("result", "?") if status == 200 else "error"
        return Answer(sent_at, answered_at, status, result)

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


# --- measures ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class Latency:
    """(a) for one side."""

    subscribers: int
    shots: int  # callbacks in the measured window (after the warm-up)
    stored: int  # of them answered "stored" (each one event)
    received: int  # (event, subscriber) pairs read
    samples_ms: list[float]
    post_ms: list[float]  # POST answer times, for context
    late: int  # sends more than 2 ms behind their slot
    errors: int  # non-200 answers
    connections: int  # POST connections the generator needed
    cpu: dict[str, float]  # share of one core per process over the run (warm-up included)
    others: float  # share of one core used by every other process on the machine
    steal: float  # share of one core the hypervisor took away
    timeline: list[tuple[float, float]]  # (seconds since the first measured send, latency ms)

    @property
    def expected(self) -> int:
        return self.stored * self.subscribers

    def over(self, limit_ms: float) -> int:
        return sum(1 for value in self.samples_ms if value > limit_ms)


def merge(runs: Sequence[Latency]) -> Latency:
    """Several runs of one side as one: samples pooled, CPU shares averaged."""
    return Latency(
        subscribers=runs[0].subscribers, shots=sum(r.shots for r in runs),
        stored=sum(r.stored for r in runs), received=sum(r.received for r in runs),
        samples_ms=[v for r in runs for v in r.samples_ms],
        post_ms=[v for r in runs for v in r.post_ms], late=sum(r.late for r in runs),
        errors=sum(r.errors for r in runs), connections=max(r.connections for r in runs),
        cpu={k: sum(r.cpu[k] for r in runs) / len(runs) for k in runs[0].cpu},
        others=sum(r.others for r in runs) / len(runs),
        steal=sum(r.steal for r in runs) / len(runs),
        timeline=[t for r in runs for t in r.timeline],
    )


@dataclass
class Holding:
    """(b) for one side."""

    wanted: int
    opened: int  # connections that got their headers (and, ours, the first event)
    held: int  # still open and subscribed when memory was read
    failures: int
    open_seconds: float
    rss_before_kib: int
    rss_after_kib: int
    fds_before: int
    fds_after: int
    redis_before: dict[str, int]
    redis_after: dict[str, int]
    probe: str = ""  # what happened to connections beyond the limit, if one was hit
    closed: str = ""  # the server's descriptors and Redis's clients once they were closed

    @property
    def kib_per_connection(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.held if self.held else math.nan

    def redis_kib_per_connection(self, key: str) -> float:
        delta = self.redis_after[key] - self.redis_before[key]
        return delta / 1024 / self.held if self.held else math.nan


@dataclass
class FanOut:
    """(c) for one side."""

    subscribers: int
    events: int
    last_ms: list[float] = field(default_factory=list)  # per event: the last subscriber
    median_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    missing: int = 0  # (event, subscriber) pairs never read
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per event, by process


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


def redis_figures(client: redis.Redis) -> dict[str, int]:
    memory = cast(dict[str, Any], client.info("memory"))
    clients = cast(dict[str, Any], client.info("clients"))
    return {"used_memory": int(memory["used_memory"]),
            "used_memory_rss": int(memory["used_memory_rss"]),
            "connected_clients": int(clients["connected_clients"])}


def channel_subscribers(client: redis.Redis) -> int:
    counts = cast(list[tuple[bytes, int]], client.pubsub_numsub(CHANNEL))
    return int(counts[0][1])


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


# --- report --------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} ms"


def kib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} KiB"


def slow_seconds(lat: Latency, over_ms: float) -> str:
    """Where the slow samples fall in time: ``second: count`` for each second that has any."""
    counts: Counter[int] = Counter(int(at) for at, value in lat.timeline if value > over_ms)
    return ", ".join(f"{second}s: {n:,}" for second, n in sorted(counts.items())) or "none"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


@dataclass
class Results:
    latency_runs: dict[str, list[Latency]] = field(default_factory=dict)
    latency: dict[str, Latency] = field(default_factory=dict)  # the runs merged
    holding: dict[str, Holding] = field(default_factory=dict)
    fan_out: dict[str, FanOut] = field(default_factory=dict)


def table(res: Results, args: argparse.Namespace) -> list[str]:
    sides = args.sides
    rows = ["| measure | " + " | ".join(LABEL[s] for s in sides) + " |",
            "| --- |" + " ---: |" * len(sides)]

    def row(name: str, cell: Callable[[str], str]) -> None:
        rows.append(f"| {name} | " + " | ".join(cell(s) for s in sides) + " |")

    lat = res.latency
    if lat:
        row(f"(a) callback → subscriber p50 ({args.rate:,.0f}/s, {args.subscribers} subs)",
            lambda s: ms(percentile(lat[s].samples_ms, 50)))
        row("(a) p99", lambda s: ms(percentile(lat[s].samples_ms, 99)))
        row("(a) p99.9", lambda s: ms(percentile(lat[s].samples_ms, 99.9)))
        row("(a) max", lambda s: ms(max(lat[s].samples_ms, default=math.nan)))
        row("(a) p99 of each run, in run order",
            lambda s: " / ".join(ms(percentile(r.samples_ms, 99))
                                 for r in res.latency_runs[s]))
        row("(a) samples over 10 ms, each run",
            lambda s: " / ".join(f"{r.over(GOAL_P99_MS):,}" for r in res.latency_runs[s]))
        row("(a) CPU of other processes + hypervisor steal, each run",
            lambda s: " / ".join(f"{r.others:.0%}+{r.steal:.0%}" for r in res.latency_runs[s]))
        row("(a) events read / expected",
            lambda s: f"{lat[s].received:,} / {lat[s].expected:,}")
        row("(a) POST answer p50 / p99 (context)",
            lambda s: f"{percentile(lat[s].post_ms, 50):.2f} / "
                      f"{percentile(lat[s].post_ms, 99):.2f} ms")
        row("(a) CPU, share of one core: SSE server / our ingest / Redis / client",
            lambda s: " / ".join(f"{lat[s].cpu[p]:.0%}" for p in (s, "ours", "redis", "client"))
            if s not in PRODUCERS else
            f"{lat[s].cpu[s]:.0%} (both) / {lat[s].cpu['redis']:.0%} / "
            f"{lat[s].cpu['client']:.0%}")
        row("(a) sends more than 2 ms behind their slot (client stalls)",
            lambda s: f"{lat[s].late:,} of {lat[s].shots:,}")
        row("(a) POST errors", lambda s: f"{lat[s].errors:,}")
    hold = res.holding
    if hold:
        row("(b) idle connections held (wanted)",
            lambda s: f"{hold[s].held:,} ({hold[s].wanted:,})")
        row("(b) server RSS before → after",
            lambda s: f"{hold[s].rss_before_kib / 1024:.1f} → "
                      f"{hold[s].rss_after_kib / 1024:.1f} MiB")
        row("(b) **server memory per connection**",
            lambda s: f"**{kib(hold[s].kib_per_connection)}**")
        row("(b) Redis used_memory per connection",
            lambda s: kib(hold[s].redis_kib_per_connection("used_memory")))
        row("(b) Redis RSS per connection",
            lambda s: kib(hold[s].redis_kib_per_connection("used_memory_rss")))
        row("(b) Redis connected_clients before → after",
            lambda s: f"{hold[s].redis_before['connected_clients']:,} → "
                      f"{hold[s].redis_after['connected_clients']:,}")
        row("(b) server fds before → after",
            lambda s: f"{hold[s].fds_before:,} → {hold[s].fds_after:,}")
        row("(b) time to open them", lambda s: f"{hold[s].open_seconds:.1f} s")
        row("(b) once closed (incl. the ~1 s settling wait)", lambda s: hold[s].closed)
    fan = res.fan_out
    if fan:
        row(f"(c) fan-out to {args.fanout:,}: last subscriber p50",
            lambda s: ms(percentile(fan[s].last_ms, 50)))
        row("(c) last subscriber max", lambda s: ms(max(fan[s].last_ms, default=math.nan)))
        row("(c) median subscriber p50", lambda s: ms(percentile(fan[s].median_ms, 50)))
        row("(c) first subscriber p50", lambda s: ms(percentile(fan[s].first_ms, 50)))
        row("(c) CPU per event: SSE server / our ingest / client",
            lambda s: f"{fan[s].cpu_ms[s]:.1f} / {fan[s].cpu_ms['ours']:.1f} / "
                      f"{fan[s].cpu_ms['client']:.1f} ms" if s not in PRODUCERS else
                      f"{fan[s].cpu_ms[s]:.1f} (both) / {fan[s].cpu_ms['client']:.1f} ms")
        row("(c) events / missed deliveries",
            lambda s: f"{len(fan[s].last_ms)} / {fan[s].missing}")
    return rows


def code_version() -> str:
    """The commit measured, and whether receiver/ had uncommitted changes."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "receiver")
    return f"commit {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        " with uncommitted changes in receiver/" if dirty else "")


def goals(res: Results) -> list[str]:
    out = []
    if "ours" in res.latency:
        p99 = percentile(res.latency["ours"].samples_ms, 99)
        each = [percentile(r.samples_ms, 99) for r in res.latency_runs["ours"]]
        out.append(f"- (a) ours p99 < {GOAL_P99_MS:g} ms: {ms(p99)} over "
                   f"{len(each)} runs, {verdict(p99 < GOAL_P99_MS)} (each run: "
                   + ", ".join(f"{ms(v)} {'met' if v < GOAL_P99_MS else 'not met'}"
                               for v in each) + ")")
    if "ours" in res.holding:
        h = res.holding["ours"]
        per = h.kib_per_connection
        out.append(f"- (b) ours holds {GOAL_CONNECTIONS:,} connections: {h.held:,}, "
                   f"{verdict(h.held >= GOAL_CONNECTIONS)}; under "
                   f"{GOAL_KB_PER_CONNECTION:g} KB each: {per * 1.024:.2f} KB "
                   f"({kib(per)}), {verdict(per * 1.024 < GOAL_KB_PER_CONNECTION)}")
    if "ours" in res.fan_out:
        last = res.fan_out["ours"].last_ms
        worst = max(last, default=math.nan)
        out.append(f"- (c) ours: the last of {res.fan_out['ours'].subscribers:,} subscribers "
                   f"within {GOAL_FANOUT_MS:g} ms: the slowest of {len(last)} events "
                   f"{ms(worst)}, {verdict(worst < GOAL_FANOUT_MS)}")
    if "naive" in res.holding:
        h = res.holding["naive"]
        out.append(f"- (b) naive: {h.held:,} of {h.wanted:,} wanted"
                   + (f" ({h.probe})" if h.probe else ""))
    return out


def report(res: Results, args: argparse.Namespace, argv: Sequence[str],
           servers: dict[str, Server], limits: str, redis_version: str) -> str:
    command = " ".join([".venv/bin/python -m bench.sse", *argv])
    order = ", ".join(",".join(args.sides if n % 2 == 0 else args.sides[::-1])
                      for n in range(args.rounds))
    return "\n".join([
        SECTION,
        "",
        "Live events over SSE, our service (one Redis subscription per process, "
        "`receiver/events.py`; as `receiver serve` runs it, the hub writes each event to "
        "every idle client's connection, `receiver/listener.py`; and the same app under "
        "uvicorn's own protocol, a loop per client) against the pattern a user would write "
        "instead (`bench/naive_sse.py`: sse-starlette, each client its own Redis pub/sub "
        "subscription to `receiver:events:{default}`). Events are real callbacks POSTed to "
        "our service, which publishes each on that channel, so every side delivers the same "
        "events. `.venv/bin/python -m bench.sse` regenerates this section.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; code: {code_version()}",
        f"- machine: {machine()} (shared, noisy)",
        f"- software: uvicorn {version('uvicorn')}, uvloop {version('uvloop')}, httptools "
        f"{version('httptools')}, starlette {version('starlette')}, sse-starlette "
        f"{version('sse-starlette')}, redis-py {version('redis')}, hiredis "
        f"{version('hiredis')}, redis-server {redis_version}",
        f"- servers: `python -m uvicorn <app> --factory --host {HOST} --port P "
        f"{' '.join(UVICORN_FLAGS)}` (one worker), `<app>` = "
        + " or ".join(f"`{a}`" for a in dict.fromkeys(APPS[s] for s in servers)) + "; "
        + "".join(f"{LABEL[s]}: the same through `python -m bench.server` with `--http "
                  f"{PROTOCOL[s]}`, as `receiver serve` runs it; " for s in servers
                  if s in PROTOCOL)
        + "env REDIS_URL = one throwaway redis-server (no persistence, default config, "
        "maxclients 10000), RECEIVER_SECRET_KEYS random, no RECEIVER_API_KEYS (open mode, "
        "SSE_MAX_PER_TENANT=0 (no cap on one tenant's streams), "
        f"tenant `default`); open-files limit {limits}",
        f"- (a): {args.subscribers} subscribers on `GET /events`; a paced open-loop "
        f"generator POSTs {args.rate:,.0f} mjproxy callbacks/s to our service for "
        f"{args.warmup:g}s warm-up + {args.duration:g}s measured (jobs minted by "
        "`POST /callback-urls`, IN_PROGRESS 1..99% then SUCCESS, 256 jobs interleaved); "
        "latency = the subscriber's read of the event (matched by job id and progress) minus "
        "the moment just before its POST was written; one sample per event and subscriber; "
        f"{args.rounds} runs per side in the order {order}, samples pooled",
        f"- (b): {args.connections:,} wanted idle `GET /events` connections (raw sockets: "
        "request, headers; on the hub's sides also the first comment, sent once the client "
        "is registered; for naive, Redis PUBSUB NUMSUB counts them), then 3 s settling; "
        "memory per connection = (VmRSS after - VmRSS before) / connections held",
        f"- (c): {args.fanout:,} subscribers on `GET /events`, {args.events} callbacks one "
        "at a time; per callback the time from its POST to the first, median and last "
        "subscriber's read",
        "- every client is in one Python process (uvloop, raw asyncio protocols, events "
        "time-stamped on read and parsed afterwards), on the same two cores as the servers "
        "and Redis",
        "- the sides run one after the other; in ours ingest and fan-out share one process; "
        "while naive is measured our service only ingests (its hub has no clients), so the "
        "naive app has a core of its own",
        "",
        *table(res, args),
        "",
        "Goals:",
        *goals(res),
        "",
    ])


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
                   "REDIS_PREFIX": DEFAULT_PREFIX}
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
