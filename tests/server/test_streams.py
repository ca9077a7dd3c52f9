"""`listener.StreamProtocol`: idle event streams without a task, everything else uvicorn's."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from receiver.cli.redis_server import RedisServer
from receiver.server.access import access_log
from receiver.server.streams import StreamProtocol
from tests.conftest import LiveServer, base_settings, mint

HEAD = b"Host: x\r\nAuthorization: Bearer key-acme\r\n\r\n"


def progress(pct: int) -> bytes:
    return orjson.dumps({"id": "p1", "status": "IN_PROGRESS", "progress": f"{pct}%"})


class Raw:
    """A client on a plain socket, reading everything the server writes."""

    def __init__(self, server: LiveServer, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock.sendall(request)
        self.data = b""

    def read_until(self, marker: bytes, timeout: float = 10, count: int = 1) -> bytes:
        deadline = time.monotonic() + timeout
        while self.data.count(marker) < count:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.data[-300:]!r}"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before {marker!r}: {self.data[-300:]!r}")
            self.data += chunk
        return self.data

    def read_to_end(self, timeout: float = 10) -> bytes:
        self.sock.settimeout(timeout)
        while chunk := self.sock.recv(65536):
            self.data += chunk
        return self.data

    def close(self) -> None:
        self.sock.close()


def on_loop(server: LiveServer, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on the server's event loop (its tasks, its connections)."""
    loop = server.server.config.app.state.services.hub._ticker.get_loop()

    async def call() -> Any:
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), loop).result(5)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def streams(redis_server: RedisServer, r: redis.Redis) -> Iterator[LiveServer]:
    server = LiveServer(base_settings(redis_server.url)).start()
    yield server
    server.stop()


def test_idle_streams_hold_no_task_and_still_get_every_event(streams: LiveServer) -> None:
    server = streams
    hub = server.server.config.app.state.services.hub
    with server.client("key-acme") as acme:
        job, url = mint(acme)
        clients = [Raw(server, b"GET /events HTTP/1.1\r\n" + HEAD)]
        clients[0].read_until(b"retry: ")  # the hub's reader task starts with the first
        wait_for(lambda: hub.client_count() == 1, "the first subscription")
        baseline = on_loop(server, lambda: len(asyncio.all_tasks())) - 1  # less on_loop's
        clients += [Raw(server, b"GET /events HTTP/1.1\r\n" + HEAD) for _ in range(39)]
        clients += [Raw(server, f"GET /tasks/{job}/events HTTP/1.1\r\n".encode() + HEAD)
                    for _ in range(10)]
        for client in clients:
            client.read_until(b"retry: ")
        wait_for(lambda: hub.client_count() == 50, "50 subscriptions")
        # The replay is done: each connection writes its own events, with no task left.
        wait_for(lambda: on_loop(server, lambda: len(asyncio.all_tasks())) - 1 == baseline,
                 "a task per stream left: " + repr(on_loop(server, lambda: [
                     t.get_coro() for t in asyncio.all_tasks()])))
        assert all(sub.sink is not None for subs in hub.subscriptions.values()
                   for sub in subs)
        for pct in (10, 20):
            assert acme.post(url, content=progress(pct)).status_code == 200
        for client in clients:
            client.read_until(b'"progress":20')
            assert client.data.count(b"event: task.progress") == 2
        assert acme.post(url, content=orjson.dumps({"id": "p1", "status": "SUCCESS"})
                         ).status_code == 200
        for client in clients[40:]:  # a task's stream ends after its terminal event
            assert client.read_to_end().endswith(b"\r\n\r\n")
            assert b"event: task.succeeded" in client.data
        wait_for(lambda: hub.client_count() == 40, "the task streams released")
        for client in clients:
            client.close()
        wait_for(lambda: hub.client_count() == 0, "subscriptions left")
        wait_for(lambda: len(server.server.server_state.connections) <= 1, "connections left")
        assert on_loop(server, lambda: len(asyncio.all_tasks())) - 1 <= baseline


def test_other_requests_pass_to_uvicorn_on_the_same_connection(streams: LiveServer) -> None:
    ping = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = Raw(streams, ping + ping)  # pipelined, on one kept-alive connection
    raw.read_until(b"HTTP/1.1 200 OK", count=2)
    raw.sock.sendall(ping)  # and a third, later: still uvicorn's keep-alive connection
    raw.read_until(b"HTTP/1.1 200 OK", count=3)
    raw.close()


def test_unusual_stream_requests_get_uvicorns_own_handling(streams: LiveServer) -> None:
    old = Raw(streams, b"GET /events HTTP/1.0\r\n" + HEAD)  # HTTP/1.0: uvicorn's protocol
    assert old.read_until(b"retry: ").startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding: chunked" in old.data.split(b"\r\n\r\n")[0]  # uvicorn's
    old.close()
    broken = Raw(streams, b"GET /events HTTP/1.1\r\nNo colon here\r\n\r\n")
    assert broken.read_to_end().startswith(b"HTTP/1.1 400 Bad Request")
    refused = Raw(streams, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # no key
    head, _, body = refused.read_to_end().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and b"connection: close" in head
    assert b"transfer-encoding" not in head  # the listener's (it closes instead)
    assert set(orjson.loads(body)) == {"error", "detail"}


def test_shutdown_tells_every_stream_to_reconnect(streams: LiveServer) -> None:
    clients = [Raw(streams, b"GET /events HTTP/1.1\r\n" + HEAD) for _ in range(5)]
    for client in clients:
        client.read_until(b"retry: ")
    started = time.monotonic()
    streams.stop()
    assert not streams.thread.is_alive()
    assert time.monotonic() - started < 5  # not uvicorn's graceful timeout
    for client in clients:
        # the cut-off comment, then the chunked body's end
        assert client.read_to_end().endswith(
            b": cut off: reconnect with Last-Event-ID\r\n\r\n0\r\n\r\n")


def test_a_connection_that_never_finishes_its_head_is_closed(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    server = LiveServer(base_settings(redis_server.url, head_timeout=0.3)).start()
    try:
        started = time.monotonic()
        raw = Raw(server, b"GET /events HTTP/1.1\r\nHost: x\r\n")
        head, _, body = raw.read_to_end(timeout=5).partition(b"\r\n\r\n")
        assert 0.25 < time.monotonic() - started < 2
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"connection: close" in head
        assert orjson.loads(body) == {
            "error": "head_timeout", "detail": "the request head did not arrive within 0.3 s"}
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


class QuickHead(StreamProtocol):
    head_timeout = 0.3  # a class may still fix it, over the settings


def test_a_protocol_class_may_fix_the_head_timeout(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    server = LiveServer(base_settings(redis_server.url), http=QuickHead).start()
    try:
        raw = Raw(server, b"GET /events HTTP/1.1\r\nHost: x\r\n")
        assert raw.read_to_end(timeout=5).startswith(b"HTTP/1.1 408 ")
    finally:
        server.stop()


def test_an_app_that_raises_gets_a_500_and_the_connection_closed() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raise RuntimeError("a bug")

    server = LiveServer(app=broken).start()  # with StreamProtocol, as every LiveServer
    try:
        raw = Raw(server, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = raw.read_to_end().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"connection: close" in head and body == b"Internal Server Error"
    finally:
        server.stop()


def test_a_client_that_stops_reading_during_the_replay_is_let_go(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    server = LiveServer(base_settings(redis_server.url, sse_send_timeout=1.0)).start()
    try:
        hub = server.server.config.app.state.services.hub
        with server.client("key-acme") as acme:
            _, url = mint(acme)
            big = "x" * 100_000  # 40 events of 100 KB: more than the socket buffers hold
            for pct in range(1, 41):
                assert acme.post(url, content=orjson.dumps(
                    {"id": "p1", "status": "IN_PROGRESS", "progress": f"{pct}%",
                     "prompt": big})).status_code == 200
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", server.port))
        stuck.sendall(b"GET /events HTTP/1.1\r\nLast-Event-ID: 0-1\r\n" + HEAD)  # all of it
        wait_for(lambda: hub.dropped == 1, "the stalled replay was never given up", 10)
        wait_for(lambda: hub.client_count() == 0 and not server.server.server_state.connections
                 and not server.server.server_state.tasks, "the stalled client left something")
        stuck.close()
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 2  # nothing left for the graceful timeout


def test_the_access_log_names_the_client_the_proxy_names(
    streams: LiveServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):  # the tests' servers: WARNING
        raw = Raw(streams, b"GET /events?token=abc HTTP/1.1\r\nX-Forwarded-For: 203.0.113.7"
                  b"\r\nHost: x\r\n\r\n")
        raw.read_to_end()
        log = access_log(json_lines=False)
    assert log is not None
    log.flush()
    [line] = [x for x in capsys.readouterr().err.splitlines() if "uvicorn.access" in x]
    assert line == ('INFO uvicorn.access: 203.0.113.7:0 - "GET /events?token=[redacted] '
                    'HTTP/1.1" 401')


def test_the_installed_uvicorn_keeps_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """What our protocols use of uvicorn's internals is all there; a release that drops a
    piece is named (and `receiver serve` falls back to uvicorn's plain protocol)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from receiver.server.guard import uvicorn_contract
    from receiver.server.run import protocol as _protocol

    assert uvicorn_contract() == []
    assert _protocol(StreamProtocol, []) is StreamProtocol
    monkeypatch.delattr(HttpToolsProtocol, "on_message_begin")
    assert uvicorn_contract() == ["HttpToolsProtocol.on_message_begin"]
    assert _protocol(StreamProtocol, uvicorn_contract()) == "httptools"
