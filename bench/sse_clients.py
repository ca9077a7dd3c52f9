"""The processes and raw connections ``bench.sse`` drives: the servers under test (uvicorn
children, their memory, descriptors and CPU read from /proc, Redis's figures) and the clients
that talk to them (raw asyncio SSE subscribers, keep-alive POSTs), so that the client's cost
stays small next to the servers'."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from bench.ingest import HOST, OURS_APP, child_server, uvicorn_command
from receiver.cli.redis_server import free_port
from receiver.core.constants import DEFAULT_PREFIX, Keys
from receiver.core.settings import DEFAULT_TENANT

NAIVE_APP = "bench.naive_sse:create_app"
APPS = {"ours": OURS_APP, "asgi": OURS_APP, "naive": NAIVE_APP}
# The HTTP protocol of each side: `receiver serve`'s, or uvicorn's own (httptools).
PROTOCOL = {"ours": "receiver.server.streams:StreamProtocol"}
SIDES = ("ours", "asgi", "naive")
# The sides that take the callbacks themselves (the receiver's app); naive's come from ours.
PRODUCERS = frozenset({"ours", "asgi"})
CHANNEL = Keys(DEFAULT_PREFIX).channel(DEFAULT_TENANT)
NOFILE = 65_536  # wanted for this process and (inherited) the servers and Redis
EVENT_END = b"\r\n\r\n"  # sse-starlette's default line separator is CRLF


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


def redis_figures(client: redis.Redis) -> dict[str, int]:
    memory = cast(dict[str, Any], client.info("memory"))
    clients = cast(dict[str, Any], client.info("clients"))
    return {"used_memory": int(memory["used_memory"]),
            "used_memory_rss": int(memory["used_memory_rss"]),
            "connected_clients": int(clients["connected_clients"])}


def channel_subscribers(client: redis.Redis) -> int:
    counts = cast(list[tuple[bytes, int]], client.pubsub_numsub(CHANNEL))
    return int(counts[0][1])


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
        if body and not self.first.done():
            # any line: the stream opens with a comment (no blank line after it, so that no
            # client reads an empty message), sent once the subscriber is registered
            self.first.set_result(True)
        while (end := body.find(EVENT_END)) >= 0:
            event = bytes(body[:end])
            del body[:end + 4]
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
