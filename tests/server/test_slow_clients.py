"""Slow and oversized requests on every route, against real servers on loopback: a head has
HEAD_TIMEOUT and MAX_HEAD_BYTES, a body BODY_TIMEOUT from the end of its head, and 2,000
slowloris connections neither hold the service nor outlive their head's time."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import select
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import cast

import httpx
import orjson
import pytest

from receiver.cli.redis_server import RedisServer, free_port
from tests.conftest import LiveServer, mint, serve_process

ServerFactory = Callable[..., LiveServer]
MB = 1024 * 1024
AUTH = b"Authorization: Bearer key-acme\r\n"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_to_end(sock: socket.socket, timeout: float = 10) -> bytes:
    """What the server writes until it closes (or ``timeout`` passes: then what came)."""
    data = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def read_responses(sock: socket.socket, count: int = 1) -> list[bytes]:
    """``count`` whole responses (each with a content-length), on a connection that stays
    open, and nothing more."""
    data, found = b"", []
    while len(found) < count:
        head_end = data.find(b"\r\n\r\n")
        end = head_end + 4 + _length(data[:head_end])
        if head_end >= 0 and len(data) >= end:
            found.append(data[:end])
            data = data[end:]
            continue
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    assert not data, data
    return found


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    return 0


def refused(answer: bytes, status: bytes, error: str) -> str:
    """The refusal's detail, once its status, close and JSON error are checked."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]
    assert b"connection: close" in head.lower()
    doc = orjson.loads(body)
    assert set(doc) == {"error", "detail"} and doc["error"] == error, doc
    detail: str = doc["detail"]
    return detail


def trickle(port: int, at_once: bytes, trickled: bytes = b"X-Slow: ", every: float = 0.1,
            limit: float = 5.0, sock: socket.socket | None = None) -> tuple[float, bytes]:
    """Sends ``at_once``, then ``trickled`` and an endless header value a byte every
    ``every`` s, until the server closes: (seconds from the first byte, what it wrote)."""
    sock = sock or connect(port)
    started = time.monotonic()
    sock.sendall(at_once)
    data, pending = b"", list(trickled)
    try:
        while time.monotonic() - started < limit:
            if select.select([sock], [], [], every)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return time.monotonic() - started, data
                data += chunk
            else:
                sock.send(bytes([pending.pop(0)]) if pending else b"a")
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - started, data
    finally:
        sock.close()
    raise AssertionError(f"a head trickled for {limit} s is still open: {data!r}")


def push(sock: socket.socket, total: int, chunk: int = 64 * 1024) -> int:
    """Sends up to ``total`` bytes of a header value, stopping as soon as the server answers
    or hangs up; the bytes sent."""
    sent, piece = 0, b"a" * chunk
    while sent < total:
        if select.select([sock], [], [], 0.01)[0]:
            break
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += chunk
    return sent


def healthy(server_url: str) -> None:
    assert httpx.get(f"{server_url}/healthz", timeout=10).status_code == 200


# --- the head: its time -------------------------------------------------------------------

def test_a_trickled_head_is_closed_after_head_timeout(make_server: ServerFactory) -> None:
    server = make_server(head_timeout=0.5)
    lived, answer = trickle(server.port, b"POST /tasks HTTP/1.1\r\nHost: x\r\n")
    assert 0.4 < lived < 1.5, lived
    assert refused(answer, b"408", "head_timeout") == \
        "the request head did not arrive within 0.5 s"
    healthy(server.url)


def test_a_keep_alive_connections_next_head_is_guarded_too(make_server: ServerFactory) -> None:
    server = make_server(head_timeout=0.5)
    sock = connect(server.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    [answer] = read_responses(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    # Idle between requests is uvicorn's keep-alive (5 s), not the head's time.
    assert select.select([sock], [], [], 1.0)[0] == []
    lived, answer = trickle(server.port, b"GET /healthz HTTP/1.1\r\n", sock=sock)
    assert 0.4 < lived < 1.5, lived
    refused(answer, b"408", "head_timeout")


def test_a_hand_over_keeps_the_heads_deadline(make_server: ServerFactory) -> None:
    """The listener holds a GET's request line until it ends, then hands the connection to
    uvicorn's protocol: the head's time still runs from the connection's first byte."""
    server = make_server(head_timeout=1.0)
    lived, answer = trickle(server.port, b"G", b"ET /x HTTP/1.1\r\nX-Slow: ", every=0.05)
    assert 0.9 < lived < 1.5, lived  # not 0.85 s (the request line) + 1 s
    refused(answer, b"408", "head_timeout")


def test_a_connection_that_sends_nothing_is_closed_after_head_timeout(
        make_server: ServerFactory) -> None:
    server = make_server(head_timeout=0.5)
    started = time.monotonic()
    answer = read_to_end(connect(server.port), timeout=5)
    assert 0.4 < time.monotonic() - started < 1.5
    refused(answer, b"408", "head_timeout")


# --- the head: its size -------------------------------------------------------------------

@pytest.mark.parametrize("target", [b"/healthz", b"/events"])
def test_a_megabyte_header_line_gets_431_and_the_server_goes_on(
        make_server: ServerFactory, target: bytes) -> None:
    server = make_server()
    sock = connect(server.port)
    sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"X-Big: ")
    push(sock, MB)
    with suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(b"\r\n\r\n")
    detail = refused(read_to_end(sock), b"431", "head_too_large")
    assert detail == "the request head is over the limit of 32768 bytes"
    healthy(server.url)


@pytest.mark.parametrize("head", [
    b"GET /usage HTTP/1.1\r\nHost: x\r\ncontent-length: \r\n\r\n",  # (Schemathesis sent it)
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
])
def test_a_request_http_cannot_parse_gets_a_json_400(make_server: ServerFactory,
                                                     head: bytes) -> None:
    # uvicorn answered it in plain text, which no operation documented
    server = make_server()
    sock = connect(server.port)
    sock.sendall(head)
    assert refused(read_to_end(sock), b"400", "invalid_http") == "Invalid HTTP request received."
    healthy(server.url)
    documented = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "invalid_http" in documented["/usage"]["get"]["responses"]["400"]["description"]


def head_of(size: int, target: bytes = b"/healthz") -> bytes:
    start, end = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def test_the_cap_counts_each_head_to_the_byte(make_server: ServerFactory) -> None:
    server = make_server(max_head_bytes=4096)
    sock = connect(server.port)
    sock.sendall(head_of(4096) * 2)  # pipelined: each head counted on its own
    assert [a[:13] for a in read_responses(sock, 2)] == [b"HTTP/1.1 200 "] * 2
    sock.sendall(head_of(4097))  # the same kept-alive connection, one byte over
    refused(read_to_end(sock), b"431", "head_too_large")
    for size, status in ((4096, b"401"), (4097, b"431")):  # the listener's own heads
        sock = connect(server.port)
        sock.sendall(head_of(size, b"/events"))
        assert read_to_end(sock).startswith(b"HTTP/1.1 " + status + b" ")


# --- the body -----------------------------------------------------------------------------

@contextmanager
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, with the receiver's INFO lines and uvicorn's own log, which does not reach
    the root (attach once the server is up: uvicorn's Config sets its loggers anew)."""
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="receiver"):
            yield caplog
    finally:
        uvicorn_log.removeHandler(caplog.handler)


def test_a_body_that_never_starts_gets_408(make_server: ServerFactory,
                                           caplog: pytest.LogCaptureFixture) -> None:
    server = make_server(body_timeout=0.5)
    with server.client("key-acme") as acme:
        _, url = mint(acme)
    callback = url.removeprefix(server.url).encode()
    with all_logs(caplog) as logs:
        for target in (b"/tasks", callback):
            sock = connect(server.port)
            started = time.monotonic()
            sock.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + AUTH +
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            answer = read_to_end(sock, timeout=5)
            assert 0.4 < time.monotonic() - started < 1.5
            assert refused(answer, b"408", "body_timeout") == \
                "the body did not arrive within 0.5 s"
        healthy(server.url)
    assert not [r for r in logs.records if r.levelno >= logging.WARNING or r.exc_info]


def test_a_client_that_hangs_up_mid_body_is_one_quiet_line(
        make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    server = make_server()
    with all_logs(caplog) as logs, connect(server.port) as sock:
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\n" + AUTH +
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"prompt":')
        time.sleep(0.2)  # the app is reading the body
        sock.close()
        deadline = time.monotonic() + 5
        while not logs.records:
            assert time.monotonic() < deadline, "nothing logged"
            time.sleep(0.02)
        time.sleep(0.2)  # anything else it would log
    loud = [f"{r.name} {r.levelname} {r.getMessage()}" for r in logs.records
            if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud
    [line] = [r for r in logs.records if r.name == "receiver"]
    assert line.levelno == logging.INFO
    assert line.getMessage() == \
        "client went away before its request body was read: POST /tasks"
    healthy(server.url)


# --- a real `receiver serve` ----------------------------------------------------------------

HEAD_TIMEOUT = 2.0
SLOW = 2000  # slowloris connections
MARGIN = 1.5  # seconds past HEAD_TIMEOUT a slow connection may live (accept lag, load)


def _raise_open_files(need: int) -> bool:
    """Raises the soft limit on open files to ``need`` if the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return True


class Serving:
    def __init__(self, port: int, pid: int, enough_files: bool) -> None:
        self.port, self.pid, self.enough_files = port, pid, enough_files

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss(self) -> int:
        """Its resident set's high-water mark (bytes), since `reset_peak`."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def serving(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Serving]:
    """`receiver serve` in a process of its own (its memory and CPU apart from the
    clients'), HEAD_TIMEOUT=2, the other limits as shipped."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    enough = _raise_open_files(2 * SLOW + 1000)  # before the server inherits the limit
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {"REDIS_URL": redis_server.url, "RECEIVER_SECRET_KEYS": "test-key-1",
           "RECEIVER_API_KEYS": "acme:key-acme", "RECEIVER_DATA_DIR": str(tmp),
           "HEAD_TIMEOUT": str(HEAD_TIMEOUT)}
    proc = serve_process(port, env, tmp / "serve.log", "--no-worker", "--no-access-log")
    try:
        yield Serving(port, proc.pid, enough)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except Exception:
            proc.kill()
            proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_a_header_sent_for_ever_is_cut_at_the_cap(serving: Serving) -> None:
    for _ in range(20):
        healthy(serving.url)  # warm
    try:
        serving.reset_peak()
    except OSError:
        pytest.skip("cannot reset the server's VmHWM (/proc/PID/clear_refs)")
    before = serving.peak_rss()
    sock = connect(serving.port)
    sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    sent = push(sock, 10 * MB)
    answer = read_to_end(sock)
    grown = serving.peak_rss() - before
    print(f"\nendless header: answered after {sent / 1024:.0f} KiB sent; "
          f"server peak RSS grew {grown / 1024:.0f} KiB")
    refused(answer, b"431", "head_too_large")
    assert sent < 2 * MB  # the answer came at the cap (plus what the sockets buffer)
    assert grown < 4 * MB  # not the 10 MB httptools would have kept
    healthy(serving.url)


class Slow(asyncio.Protocol):
    """A slowloris connection: a partial head, then whatever the trickler adds."""

    def __init__(self, head: bytes, lost: asyncio.Future[float]) -> None:
        self.head, self.lost = head, lost
        self.transport: asyncio.Transport | None = None
        self.answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.head)

    def data_received(self, data: bytes) -> None:
        self.answer += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(asyncio.get_running_loop().time())


HEADS = (b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # uvicorn's (guarded) protocol
         b"GET /events HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # the listener's own


async def slowloris(port: int, measure: int = 200) -> dict[str, list[float]]:
    """SLOW connections trickle heads (a byte each every 0.5 s; one the server closes is
    replaced) while another client GETs /healthz ``measure`` times, one after another, 25 ms
    apart (over two HEAD_TIMEOUTs: waves of closes and reconnects); then the slow ones are
    left to the server. The latencies, and how long each slow connection lived."""
    loop = asyncio.get_running_loop()
    lived: list[float] = []
    open_now: set[Slow] = set()
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def slot(i: int) -> None:
        while not stop.is_set():
            lost: asyncio.Future[float] = loop.create_future()
            started = loop.time()
            try:
                _, conn = await loop.create_connection(
                    partial(Slow, HEADS[i % 2], lost), "127.0.0.1", port)
            except OSError as exc:
                errors.append(exc)
                return
            open_now.add(conn)
            ended = await lost
            open_now.discard(conn)
            lived.append(ended - started)

    async def trickler() -> None:
        while True:  # a tenth of the connections every 50 ms: each a byte every 0.5 s
            for n, conn in enumerate(list(open_now)):
                if conn.transport is not None and n % 10 == int(loop.time() * 20) % 10:
                    conn.transport.write(b"a")
            await asyncio.sleep(0.05)

    async def healthz() -> float:
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        return loop.time() - started

    async with asyncio.timeout(120):
        calm = [await healthz() for _ in range(measure)]
        slots = []
        for start in range(0, SLOW, 100):  # connect in steps, within the listen backlog
            slots += [loop.create_task(slot(i)) for i in range(start, start + 100)]
            await asyncio.sleep(0.02)
        while len(open_now) < SLOW * 0.95:
            assert not errors, errors[:3]
            await asyncio.sleep(0.05)
        tricking = loop.create_task(trickler())
        opened = len(open_now)
        under = []
        for _ in range(measure):
            under.append(await healthz())
            await asyncio.sleep(0.025)
        during = len(open_now)
        stop.set()  # no more replacements: the server must close what is open
        try:
            async with asyncio.timeout(HEAD_TIMEOUT + MARGIN + 5):
                await asyncio.gather(*slots)
        except TimeoutError:
            pass
        left = len(open_now)
        tricking.cancel()
        for slot_task in slots:
            slot_task.cancel()
        for conn in open_now:
            if conn.transport is not None:
                conn.transport.abort()
    assert not errors, errors[:3]
    return {"calm": calm, "under": under, "lived": lived,
            "open": [float(opened), float(during), float(left)]}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def test_slowloris_neither_holds_the_service_nor_outlives_head_timeout(
        serving: Serving) -> None:
    if not serving.enough_files:
        pytest.skip(f"{2 * SLOW + 1000} open files are needed; the hard limit is "
                    f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}")
    figures = asyncio.run(slowloris(serving.port))
    calm, under, lived = figures["calm"], figures["under"], figures["lived"]
    ms = 1000
    print(f"\n/healthz alone: p50 {statistics.median(calm) * ms:.1f} ms, "
          f"p99 {percentile(calm, 99) * ms:.1f} ms")
    print(f"/healthz under {SLOW} slow heads (open at start/end of the run: "
          f"{figures['open'][0]:.0f}/{figures['open'][1]:.0f}): "
          f"p50 {statistics.median(under) * ms:.1f} ms, p99 {percentile(under, 99) * ms:.1f} "
          f"ms, max {max(under) * ms:.1f} ms")
    print(f"{len(lived)} slow connections lived: min {min(lived):.2f} s, median "
          f"{statistics.median(lived):.2f} s, max {max(lived):.2f} s "
          f"(HEAD_TIMEOUT {HEAD_TIMEOUT:g} s)")
    assert figures["open"][2] == 0, f"{figures['open'][2]:.0f} slow connections never closed"
    assert len(lived) >= 2 * SLOW  # the measuring saw every slow connection replaced
    assert percentile(under, 99) < 1.0
    assert max(lived) < HEAD_TIMEOUT + MARGIN
    assert min(lived) > HEAD_TIMEOUT * 0.9  # closed for their time, not for anything else
    assert os.path.exists(f"/proc/{serving.pid}")  # and the server is still up
    healthy(serving.url)
