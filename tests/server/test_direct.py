"""`direct`: callbacks answered by the protocol past ASGI, exactly as the app answers them."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from receiver.cli.redis_server import RedisServer
from receiver.server import direct
from receiver.server.access import access_log
from tests.conftest import KEYS, LiveServer, base_settings, mint
from tests.server.test_streams import Raw


def progress(task_id: str, pct: int) -> bytes:
    return orjson.dumps({"id": task_id, "status": "IN_PROGRESS", "progress": f"{pct}%"})


def request(target: str, body: bytes, *extra: bytes) -> tuple[bytes, bytes]:
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % (target.encode(), len(body)))
    return head + b"".join(extra) + b"\r\n", body


def answer(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(status line, sorted headers without the date, body) of one response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    return status, sorted(h.lower() for h in headers if not h.lower().startswith(b"date:")), body


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The statuses `direct.respond` answered with (its calls, spied on)."""
    calls: list[int] = []
    respond = direct.respond

    def spy(protocol: Any, cycle: Any, status: int, *rest: Any) -> None:
        calls.append(status)
        respond(protocol, cycle, status, *rest)
    monkeypatch.setattr(direct, "respond", spy)
    return calls


@pytest.fixture
def live(redis_server: RedisServer, r: redis.Redis) -> Iterator[LiveServer]:
    server = LiveServer(base_settings(redis_server.url, max_body_bytes=4096)).start()
    yield server
    server.stop()


@pytest.fixture
def plain(redis_server: RedisServer, r: redis.Redis) -> Iterator[LiveServer]:
    """The same app on uvicorn's own protocol: every callback through ASGI."""
    server = LiveServer(base_settings(redis_server.url, max_body_bytes=4096),
                        http="httptools").start()
    yield server
    server.stop()


def whole(server: LiveServer, head: bytes, body: bytes) -> bytes:
    """The request in one write: served by `direct`."""
    raw = Raw(server, head + body)
    try:
        return response(raw)
    finally:
        raw.close()


def split(server: LiveServer, head: bytes, body: bytes) -> bytes:
    """The body sent 0.2 s after the head."""
    raw = Raw(server, head)
    try:
        time.sleep(0.2)
        raw.sock.sendall(body)
        return response(raw)
    finally:
        raw.close()


def response(raw: Raw) -> bytes:
    """One whole response (its head, and a body of its content-length)."""
    data = raw.read_until(b"\r\n\r\n")
    found = re.search(rb"content-length: (\d+)", data, re.I)
    assert found is not None, data
    while len(data.partition(b"\r\n\r\n")[2]) < int(found.group(1)):
        chunk = raw.sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_every_answer_is_the_apps_byte_for_byte(live: LiveServer, plain: LiveServer,
                                                served: list[int]) -> None:
    with live.client("key-acme") as acme:
        job, url = mint(acme)
        _, other = mint(acme, provider="ohmygpt")
    path = url.removeprefix(live.url)
    token = path.partition("?")[2]
    cases = {
        "stored, then a duplicate": request(path, progress("d1", 10)),
        "unknown provider": request(f"/callbacks/nope?{token}", progress("d1", 10)),
        "no token": request("/callbacks/mjproxy", progress("d1", 10)),
        "bad token": request("/callbacks/mjproxy?token=forged", progress("d1", 10)),
        "another provider's token": request(
            "/callbacks/mjproxy?" + other.partition("?")[2], progress("d1", 10)),
        "not the dialect": request(path, b'{"nothing": 1}'),
        "not JSON": request(path, b"{"),
        "over MAX_BODY_BYTES": request(path, b'{"id": "d1", "x": "' + b"a" * 5000 + b'"}'),
        "bad encoding": request(path, progress("d1", 10), b"Content-Encoding: br\r\n"),
    }
    first: dict[str, bytes] = {}
    for name, (head, body) in cases.items():
        ours = first[name] = whole(live, head, body)
        if name.startswith("stored"):
            ours = whole(live, head, body)
            assert answer(ours)[2].startswith(b'{"result":"duplicate"')
        apps = answer(whole(plain, head, body))
        assert answer(ours) == apps, name
        assert answer(split(live, head, body)) == apps, name  # the body read as it comes
    stored = answer(first["stored, then a duplicate"])
    assert stored[2] == b'{"result":"stored","job_id":"%s","version":2}' % job.encode()
    assert answer(first["no token"])[0] == b"HTTP/1.1 401 Unauthorized"
    assert b"www-authenticate: bearer" in answer(first["no token"])[1]
    # Every request to `live` was answered by `direct`, the body in one piece or two.
    assert served == [200, 200, 200, 404, 404, 401, 401, 401, 401, 403, 403, 400, 400, 400, 400,
                      413, 413, 415, 415]


def test_keep_alive_pipelining_and_close(live: LiveServer, served: list[int],
                                         r: redis.Redis) -> None:
    with live.client("key-acme") as acme:
        job, url = mint(acme)
    path = url.removeprefix(live.url)
    one, two = request(path, progress("k1", 10)), request(path, progress("k1", 20))
    close = request(path, progress("k1", 30), b"Connection: close\r\n")
    raw = Raw(live, b"".join((*one, *two, *close)))  # three requests in one write
    data = raw.read_to_end()
    raw.close()
    bodies = re.findall(rb'\{"result":"(\w+)","job_id":"[^"]+","version":(\d+)\}', data)
    assert bodies == [(b"stored", b"2"), (b"stored", b"3"), (b"stored", b"4")]
    assert data.count(b"connection: close") == 1 and served == [200, 200, 200]
    with httpx.Client(base_url=live.url) as client:  # one connection, kept alive
        for pct in (40, 50):
            assert client.post(path, content=progress("k1", pct)).status_code == 200
        assert client.get("/healthz").status_code == 200  # the app's, on that connection
        assert client.post(path, content=progress("k1", 60)).json()["version"] == 7
    assert served == [200] * 6
    assert r.xlen(KEYS.history("acme", job)) == 7  # created, then the six callbacks


def test_a_body_that_waits_for_100_continue(live: LiveServer, served: list[int]) -> None:
    with live.client("key-acme") as acme:
        _, url = mint(acme)
    head, body = request(url.removeprefix(live.url), progress("c1", 10),
                         b"Expect: 100-continue\r\n")
    raw = Raw(live, head)
    assert raw.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
    raw.sock.sendall(body)
    assert b'"result":"stored"' in raw.read_until(b"}")
    raw.close()
    assert served == [200]


def test_the_access_log_line_is_the_same(live: LiveServer, served: list[int],
                                         caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with live.client("key-acme") as acme:
        _, url = mint(acme)
    head, body = request(url.removeprefix(live.url), progress("a1", 10),
                         b"X-Forwarded-For: 203.0.113.9\r\n")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        whole(live, head, body)
        log = access_log(json_lines=False)
    assert log is not None
    log.flush()
    lines = [x for x in capsys.readouterr().err.splitlines() if "POST /callbacks" in x]
    assert lines == ['INFO uvicorn.access: 203.0.113.9:0 - "POST /callbacks/mjproxy'
                     '?token=[redacted] HTTP/1.1" 200']
    assert served == [200]


def test_a_cors_request_is_the_apps(redis_server: RedisServer, r: redis.Redis,
                                    served: list[int]) -> None:
    """Under CORS_ORIGINS a callback with an Origin gets the CORS middleware's headers, so
    the app serves it; one without is served directly."""
    server = LiveServer(base_settings(redis_server.url,
                                      cors_origins=("https://app.example",))).start()
    try:
        with server.client("key-acme") as acme:
            _, url = mint(acme)
        path = url.removeprefix(server.url)
        cors = answer(whole(server, *request(path, progress("o1", 10),
                                             b"Origin: https://app.example\r\n")))
        assert b"access-control-allow-origin: https://app.example" in cors[1]
        assert served == []
        assert b'"result":"stored"' in answer(whole(server, *request(path, progress("o1", 20))))[2]
        assert served == [200]
    finally:
        server.stop()
