"""Abuse limits over real sockets: each refusal is a 413, 408 or 429 (with Retry-After), and
the service keeps serving everyone else."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
import redis
from httpx_sse import connect_sse
from hypothesis import given
from hypothesis import strategies as st

from receiver.core.limits import TooComplex, TooDeep, check_depth, check_json
from tests.conftest import LiveServer, mint, sample

ServerFactory = Callable[..., LiveServer]


def nested(depth: int) -> bytes:
    return b'{"id":"p1","status":"IN_PROGRESS","x":' + b"[" * depth + b"]" * depth + b"}"


def depth_of(doc: object) -> int:
    if isinstance(doc, dict):
        return 1 + max(map(depth_of, doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max(map(depth_of, doc), default=0)
    return 0


json_docs = st.recursive(
    st.none() | st.integers(-9, 99) | st.text(alphabet="ab[]{}\\\"", max_size=6),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet="k[{\"", max_size=3), inner, max_size=4),
    max_leaves=60,
)


@given(json_docs, st.integers(1, 12))
def test_check_depth_refuses_exactly_what_is_deeper_than_the_limit(doc: object, limit: int
                                                                    ) -> None:
    body = orjson.dumps(doc)
    if depth_of(doc) > limit:
        with pytest.raises(TooDeep):
            check_depth(body, limit)
    else:
        check_depth(body, limit)  # brackets in strings (escaped quotes too) do not count


def test_check_json_counts_containers_outside_strings() -> None:
    arrays = b"[" + b",".join([b"[]"] * 87_000) + b"]"
    with pytest.raises(TooComplex):
        check_json(arrays, 32, 10_000)
    check_json(arrays, 32, 0)  # 0: no limit
    # a prompt full of braces is one string, not 20,000 objects
    check_json(orjson.dumps({"prompt": "{a,b} " * 20_000, "x": [[1]]}), 32, 10_000)
    with pytest.raises(TooDeep):
        check_json(b"[" * 40 + b"]" * 40, 32, 10_000)


def test_check_depth_costs_no_python_walk() -> None:
    """87,000 empty arrays (261 KB) are one level deep, whatever their count."""
    check_depth(b"[" + b",".join([b"[]"] * 87_000) + b"]", 32)
    with pytest.raises(TooDeep):
        check_depth(b"[" + b",".join([b"[]"] * 87_000 + [b"[" * 40 + b"]" * 40]) + b"]", 32)


def test_json_nested_too_deep_is_413(make_server: ServerFactory, r: redis.Redis) -> None:
    server = make_server(max_json_depth=16)
    with server.client("key-acme") as acme:
        job, url = mint(acme)
        deep = acme.post(url, content=nested(40))
        assert deep.status_code == 413 and deep.json()["error"] == "json_too_deep"
        assert acme.post(url, content=nested(10)).status_code == 200  # within the limit
        refused = acme.post("/callback-urls", content=b'{"provider":"mjproxy","x":'
                            + b"[" * 40 + b"]" * 40 + b"}")
        assert refused.status_code == 413
        assert acme.get(f"/tasks/{job}").json()["version"] == 2  # created, then the 10


def test_callbacks_per_task_are_rate_limited(make_server: ServerFactory,
                                             r: redis.Redis) -> None:
    server = make_server(callback_rate=1.0, callback_burst=3.0)
    with server.client("key-acme") as acme:
        _, url = mint(acme)
        _, other = mint(acme)
        answers = [acme.post(url, content=sample("mjproxy-success.json")) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[-1].json()["error"] == "rate_limited"
        assert int(answers[-1].headers["retry-after"]) >= 1
        assert acme.post(other, content=sample("mjproxy-success.json", "p2")).status_code == 200
        time.sleep(1.1)  # one token back
        assert acme.post(url, content=sample("mjproxy-success.json")).status_code == 200


def test_submissions_per_tenant_are_rate_limited(make_server: ServerFactory,
                                                 r: redis.Redis) -> None:
    server = make_server(submit_rate=0.5, submit_burst=2.0)
    with server.client("key-acme") as acme, server.client("key-beta") as beta:
        # no provider is configured: each is a 400, but each is counted first
        codes = [acme.post("/tasks", json={"prompt": "x"}).status_code for _ in range(3)]
        assert codes == [400, 400, 429]
        limited = acme.post("/tasks", json={"prompt": "x"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert beta.post("/tasks", json={"prompt": "x"}).status_code == 400  # not beta's


def test_event_streams_per_tenant_are_limited(make_server: ServerFactory,
                                              r: redis.Redis) -> None:
    server = make_server(sse_max_per_tenant=2)
    headers = {"Authorization": "Bearer key-acme"}
    opened = threading.Barrier(3)
    release = threading.Event()

    def hold() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client, \
                connect_sse(client, "GET", "/events", headers=headers) as source:
            assert source.response.status_code == 200
            opened.wait()
            release.wait(10)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    opened.wait()
    time.sleep(0.2)
    try:
        with server.client("key-acme") as acme, server.client("key-beta") as beta:
            third = acme.get("/events")
            assert third.status_code == 429 and third.json()["error"] == "rate_limited"
            assert "retry-after" in third.headers
            with beta.stream("GET", "/events") as theirs:  # another tenant: not limited
                assert theirs.status_code == 200
    finally:
        release.set()
        for t in holders:
            t.join(10)


def test_a_body_that_trickles_is_cut_off(make_server: ServerFactory, r: redis.Redis) -> None:
    server = make_server(body_timeout=0.5)
    with server.client("key-acme") as acme:
        _, url = mint(acme)
    path = url.removeprefix(server.url)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                     .encode() + b'{"id":')  # and then nothing
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "body_timeout" in answer


def test_slow_clients_do_not_hold_the_service(make_server: ServerFactory,
                                              r: redis.Redis) -> None:
    server = make_server()
    slow = []
    try:
        for _ in range(200):  # slowloris: headers that never end
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"POST /callbacks/mjproxy HTTP/1.1\r\nHost: x\r\nX-A: ")
            slow.append(sock)
        with server.client("key-acme") as acme:
            for _ in range(20):  # everyone else is served as usual
                job, url = mint(acme)
                assert acme.post(url, content=sample("mjproxy-success.json", job)).status_code \
                    == 200
    finally:
        for sock in slow:
            sock.close()


def test_cors_only_for_configured_origins(make_server: ServerFactory, r: redis.Redis) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    closed = make_server()
    with closed.client() as client:
        assert "access-control-allow-origin" not in client.options(
            "/tasks", headers=preflight).headers
    opened = make_server(cors_origins=("https://app.example",))
    with opened.client() as client:
        answer = client.options("/tasks", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        evil = client.options("/tasks", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in evil.headers


def test_the_dashboard_sends_security_headers(make_server: ServerFactory,
                                              r: redis.Redis) -> None:
    server = make_server()
    with server.client() as client:
        for path in ("/", "/dashboard/app.js"):
            headers = client.get(path).headers
            assert "script-src 'self'" in headers["content-security-policy"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"


def test_zero_turns_a_limit_off(make_server: ServerFactory, r: redis.Redis) -> None:
    server = make_server(max_json_depth=0, body_timeout=0, callback_rate=0)
    with server.client("key-acme") as acme:
        _, url = mint(acme)
        assert acme.post(url, content=nested(200)).status_code == 200
        _, other = mint(acme)
        assert all(acme.post(other, content=sample("mjproxy-success.json")).status_code == 200
                   for _ in range(30))


def test_a_token_has_one_spelling_and_no_redirect_repeats_it(
        make_server: ServerFactory, r: redis.Redis) -> None:
    server = make_server()
    with server.client("key-acme") as acme:
        _, url = mint(acme)
        # itsdangerous would drop the non-base64 tail; we refuse the token instead
        assert acme.post(url + "%C3%A9", content=sample("mjproxy-success.json")
                         ).status_code == 401
        slash = acme.post(url.replace("/callbacks/mjproxy?", "/callbacks/mjproxy/?"),
                          content=sample("mjproxy-success.json"), follow_redirects=False)
        assert slash.status_code == 404 and "location" not in slash.headers
