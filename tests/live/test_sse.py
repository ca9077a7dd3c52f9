"""SSE over real sockets: httpx-sse clients against a running uvicorn."""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from httpx_sse import connect_sse
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.cli.redis_server import RedisServer
from receiver.core.models import event_key
from receiver.server.streams import StreamProtocol
from tests.conftest import KEYS, TIMEOUT, LiveServer, base_settings, history_entries, mint

ACME = {"Authorization": "Bearer key-acme"}


@pytest.fixture(params=["listener", "uvicorn"])
def make_server(request: pytest.FixtureRequest, make_server: Callable[..., LiveServer]
                ) -> Callable[..., LiveServer]:
    """Each test twice: with `receiver serve`'s protocol, whose idle streams the connection
    writes itself, and with uvicorn's, where `sse.EventStream` loops to the end."""
    return functools.partial(make_server, http=StreamProtocol if request.param == "listener"
                             else "httptools")


def progress(task: str, pct: int, prompt: str = "a cat") -> bytes:
    return orjson.dumps({"id": task, "status": "IN_PROGRESS", "progress": f"{pct}%",
                         "prompt": prompt})


def success(task: str) -> bytes:
    return orjson.dumps({"id": task, "status": "SUCCESS", "imageUrl": "https://cdn/x.png"})


class Reader(threading.Thread):
    """Reads an SSE stream in the background: events with an id, and whether it ended."""

    def __init__(self, server: LiveServer, path: str, headers: dict[str, str] | None = None,
                 limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.server, self.path, self.headers, self.limit = server, path, headers or ACME, limit
        self.events: list[Any] = []
        self.connected = threading.Event()
        self.ended = False
        self.status: int | None = None

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=TIMEOUT) as client, \
                connect_sse(client, "GET", self.path, headers=self.headers) as source:
            self.status = source.response.status_code
            self.connected.set()
            if self.status != 200:
                return
            for sse in source.iter_sse():
                if sse.id:
                    self.events.append(sse)
                    if self.limit and len(self.events) >= self.limit:
                        return
            self.ended = True

    def wait(self, timeout: float = 10) -> Reader:
        self.join(timeout)
        assert not self.is_alive(), f"stream still open after {timeout}s: {self.events}"
        return self


def start(reader: Reader) -> Reader:
    reader.start()
    assert reader.connected.wait(10)
    time.sleep(0.1)  # the subscription is registered before history is read; be sure
    return reader


def stored_ids(r: redis.Redis, key: str, after: str = "0-0") -> list[str]:
    return [i.decode() for i, _ in r.xrange(key, min=f"({after}")]


def test_task_stream_is_live_and_ends_after_the_terminal_event(
    server: LiveServer, acme: httpx.Client, r: redis.Redis
) -> None:
    job, url = mint(acme)
    reader = start(Reader(server, f"/tasks/{job}/events"))
    for pct in (10, 50):
        acme.post(url, content=progress("p1", pct))
    acme.post(url, content=success("p1"))
    reader.wait()
    assert reader.ended
    assert [e.event for e in reader.events] == [
        "task.created", "task.progress", "task.progress", "task.succeeded"]
    assert [e.id for e in reader.events] == [
        i.decode() for i, _ in history_entries(r, "acme", job)]
    data = [orjson.loads(e.data) for e in reader.events]
    assert [d["progress"] for d in data] == [0, 10, 50, 100]
    assert all(d["event_id"] == e.id for d, e in zip(data, reader.events, strict=True))


def test_final_task_gets_its_snapshot_and_the_close_at_once(
    server: LiveServer, acme: httpx.Client
) -> None:
    job, url = mint(acme)
    acme.post(url, content=success("p1"))
    reader = Reader(server, f"/tasks/{job}/events")
    reader.start()
    reader.wait()
    assert reader.ended and [e.event for e in reader.events] == ["task.succeeded"]
    # an EventSource reconnects after every close: having seen the end, it is told to stop
    seen_end = {"Last-Event-ID": reader.events[-1].id}
    assert acme.get(f"/tasks/{job}/events", headers=seen_end).status_code == 204


def test_resume_with_header_or_query_gets_exactly_what_followed(
    server: LiveServer, acme: httpx.Client, r: redis.Redis
) -> None:
    job, url = mint(acme)
    for pct in (10, 20, 30, 40):
        acme.post(url, content=progress("p1", pct))
    ids = [i.decode() for i, _ in history_entries(r, "acme", job)]
    by_header = Reader(server, f"/tasks/{job}/events", {**ACME, "Last-Event-ID": ids[2]},
                       limit=2)
    by_header.start()
    by_query = Reader(server, f"/tasks/{job}/events?last_event_id={ids[2]}", limit=2)
    by_query.start()
    for reader in (by_header, by_query):
        assert [e.id for e in reader.wait().events] == ids[3:]
    bad = acme.get(f"/tasks/{job}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400


def test_tenant_stream_resumes_across_forced_disconnects(
    server: LiveServer, acme: httpx.Client, r: redis.Redis
) -> None:
    jobs = [mint(acme) for _ in range(3)]
    start_id = stored_ids(r, KEYS.stream("acme"))[-1]
    received = read_with_drops(server, start_id, drops=[1, 2, 5],
                               post=lambda: [acme.post(url, content=progress(j, p))
                                             for p in range(1, 8) for j, url in jobs],
                               expected=21)
    assert received == stored_ids(r, KEYS.stream("acme"), after=start_id)


def read_with_drops(server: LiveServer, start_id: str, drops: list[int],
                    post: Callable[[], object], expected: int) -> list[str]:
    """Read /events from ``start_id`` while ``post`` runs, hanging up after each count in
    ``drops`` and resuming with Last-Event-ID, until ``expected`` events are read (a missing
    one times out; a duplicate fails the caller's comparison)."""
    received: list[str] = []
    last = start_id
    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        for budget in [*drops, 10**9]:
            with connect_sse(client, "GET", "/events",
                             headers={**ACME, "Last-Event-ID": last}) as source:
                count = 0
                for sse in source.iter_sse():
                    if not sse.id:
                        continue
                    received.append(sse.id)
                    last, count = sse.id, count + 1
                    if len(received) == expected:
                        poster.join(10)
                        return received
                    if count >= budget:
                        break  # hang up mid-stream
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def shared(redis_server: RedisServer) -> Iterator[tuple[LiveServer, httpx.Client, redis.Redis]]:
    server = LiveServer(base_settings(redis_server.url)).start()
    client = server.client("key-acme")
    r = redis.Redis(port=redis_server.port)
    yield server, client, r
    client.close()
    r.close()
    server.stop()


@settings(max_examples=12)
@given(drops=st.lists(st.integers(1, 6), max_size=5), tasks=st.integers(1, 3),
       steps=st.integers(1, 6))
def test_resume_after_random_disconnects_yields_exactly_the_stored_sequence(
    shared: tuple[LiveServer, httpx.Client, redis.Redis], drops: list[int], tasks: int,
    steps: int,
) -> None:
    server, acme, r = shared
    jobs = [mint(acme) for _ in range(tasks)]
    start_id = stored_ids(r, KEYS.stream("acme"))[-1]

    def post() -> None:
        for p in range(1, steps + 1):
            for j, url in jobs:
                acme.post(url, content=progress(j, p))
        for j, url in jobs:
            acme.post(url, content=success(j))

    received = read_with_drops(server, start_id, drops, post, expected=tasks * (steps + 1))
    assert received == stored_ids(r, KEYS.stream("acme"), after=start_id)
    assert len(received) == tasks * (steps + 1)


def test_slow_client_is_cut_off_while_a_fast_one_keeps_receiving(
    make_server: Callable[..., LiveServer], r: redis.Redis
) -> None:
    server = make_server(sse_queue_limit=4, sse_send_timeout=2.0)
    hub = server.server.config.app.state.services.hub
    with server.client("key-acme") as acme:
        _job, url = mint(acme)
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n")
        fast = start(Reader(server, "/events", limit=60))
        deadline = time.monotonic() + 5
        while hub.client_count() < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        big = "x" * 120_000  # each event carries the prompt: 60 of them are 7 MB
        for pct in range(1, 61):
            assert acme.post(url, content=progress("p1", pct, big)).status_code == 200
        assert len(fast.wait(20).events) == 60  # the fast one got everything
        deadline = time.monotonic() + 10
        while hub.client_count() > 0:  # the slow one is gone too, not buffered forever
            assert time.monotonic() < deadline, "the slow client was never cut off"
            time.sleep(0.05)
        slow.close()
        assert hub.dropped == 1  # counted once


def test_connect_disconnect_cycles_leave_nothing_behind(
    server: LiveServer, acme: httpx.Client, r: redis.Redis
) -> None:
    hub = server.server.config.app.state.services.hub
    loop = hub._ticker.get_loop()

    def tasks() -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())
        return asyncio.run_coroutine_threadsafe(count(), loop).result(5)

    def task_names() -> list[str]:
        async def names() -> list[str]:
            return [repr(t.get_coro()) for t in asyncio.all_tasks()]
        return asyncio.run_coroutine_threadsafe(names(), loop).result(5)

    job, _ = mint(acme)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT, headers=ACME) as client:
        with connect_sse(client, "GET", f"/tasks/{job}/events") as source:  # sse-starlette
            next(source.iter_sse())  # starts its one shutdown watcher per process on first use
        time.sleep(0.2)
        baseline_tasks, baseline_clients = tasks(), len(r.client_list())
        for i in range(1000):
            path = "/events" if i % 2 else f"/tasks/{job}/events"
            with connect_sse(client, "GET", path) as source:
                if i % 2:  # the preamble (no message: nothing has happened since)
                    next(source.response.iter_bytes())
                else:
                    next(source.iter_sse())  # the task as it is now
                # then hang up
    deadline = time.monotonic() + 10
    while hub.client_count() or tasks() > baseline_tasks:
        assert time.monotonic() < deadline, (hub.client_count(), tasks(), baseline_tasks,
                                             task_names())
        time.sleep(0.05)
    assert len(r.client_list()) <= baseline_clients + 2  # the pool, not a connection each
    assert r.pubsub_channels() == []  # no client left: the process listens to nothing


def test_tenants_never_see_each_others_events(
    server: LiveServer, acme: httpx.Client, r: redis.Redis
) -> None:
    watcher = start(Reader(server, "/events", limit=1))
    with server.client("key-beta") as beta:
        _, beta_url = mint(beta)
        for pct in range(1, 6):
            beta.post(beta_url, content=progress("b", pct))
    job, _ = mint(acme)
    events = watcher.wait().events
    assert [orjson.loads(e.data)["id"] for e in events] == [job]
    assert orjson.loads(events[0].data)["tenant"] == "acme"


def test_subscribe_tokens_scope_and_expiry(
    make_server: Callable[..., LiveServer], r: redis.Redis
) -> None:
    server = make_server()
    with server.client("key-acme") as acme, server.client("key-beta") as beta:
        job, url = mint(acme)
        other, _ = mint(acme)
        beta_job, _ = mint(beta)
        acme.post(url, content=success("p1"))
        one = acme.post("/subscribe-tokens", json={"task_id": job}).json()
        assert one["events_url"] == f"/tasks/{job}/events?token={one['token']}"
        everything = acme.post("/subscribe-tokens", json={}).json()["token"]
        assert acme.post("/subscribe-tokens", json={"task_id": beta_job}).status_code == 404
        with server.client() as browser:  # no Authorization header, as an EventSource
            ok = Reader(server, one["events_url"], headers={})
            ok.start()
            assert [e.event for e in ok.wait().events] == ["task.succeeded"]
            for path, status in [
                (f"/tasks/{other}/events?token={one['token']}", 403),
                (f"/events?token={one['token']}", 403),
                (f"/tasks/{beta_job}/events?token={everything}", 404),
                (f"/tasks/{job}/events?token={everything[:-2]}xx", 401),
                (f"/tasks/{job}/events", 401),
            ]:
                assert browser.get(path).status_code == status, path
    expired = make_server(subscribe_token_ttl=-1)
    with expired.client("key-acme") as acme:
        token = acme.post("/subscribe-tokens", json={}).json()["token"]
        answer = acme.get(f"/events?token={token}")
        assert (answer.status_code, answer.json()["error"]) == (401, "expired_token")


def test_consumer_group_redelivers_unacknowledged_events(
    server: LiveServer, acme: httpx.Client, redis_server: RedisServer
) -> None:
    from redis.asyncio import Redis

    from receiver.events.consumer import EventConsumer

    async def main() -> None:
        client = Redis.from_url(redis_server.url)
        first = EventConsumer(client, "acme", "billing", "one", start="$", block_ms=2000)
        await first._create_group()
        _job, url = mint(acme)
        for pct in (10, 20, 30):
            acme.post(url, content=progress("p1", pct))
        got = await first.read()
        assert [e.kind for e in got] == ["task.created", *["task.progress"] * 3]
        await first.ack(got[0], got[1])  # two handled, then "one" dies
        # the same name, restarted: its unacknowledged events first
        again = EventConsumer(client, "acme", "billing", "one", block_ms=100)
        assert [e.id for e in await again.read()] == [got[2].id, got[3].id]
        # another consumer claims what a dead one left pending
        other = EventConsumer(client, "acme", "billing", "two", claim_idle_ms=0,
                              block_ms=100)
        other._own_pending = False
        claimed = await other.read()
        assert [e.id for e in claimed] == [got[2].id, got[3].id]
        assert claimed[0].task["progress"] == 20
        await other.ack(*claimed)
        assert (await client.xpending("receiver:stream:{acme}", "billing"))["pending"] == 0
        await client.aclose()

    asyncio.run(main())


def test_an_id_older_than_the_stream_holds_gets_current_snapshots_first(
    make_server: Callable[..., LiveServer], r: redis.Redis
) -> None:
    server = make_server(tenant_stream_maxlen=10)  # trimmed in whole nodes of ~100 entries
    with server.client("key-acme") as acme:
        jobs = [mint(acme) for _ in range(4)]
        first_id = stored_ids(r, KEYS.stream("acme"))[0]
        for pct in range(1, 80):
            for j, url in jobs:
                acme.post(url, content=progress(f"p-{j}", pct))
        assert stored_ids(r, KEYS.stream("acme"))[0] != first_id, "nothing was trimmed"
        latest = [r.xrevrange(KEYS.history("acme", j), count=1)[0][0].decode() for j, _ in jobs]
        reader = start(Reader(server, "/events", {**ACME, "Last-Event-ID": first_id},
                              limit=5))
        job, url = jobs[0]
        acme.post(url, content=success(f"p-{job}"))
        events = reader.wait().events
    # each task as it was (its latest event), oldest first; then the live event
    assert [e.id for e in events[:4]] == sorted(latest, key=event_key)
    assert [orjson.loads(e.data)["progress"] for e in events[:4]] == [79] * 4
    assert (events[4].event, orjson.loads(events[4].data)["id"]) == ("task.succeeded", job)


def test_an_idle_stream_is_pinged(make_server: Callable[..., LiveServer], r: redis.Redis
                                  ) -> None:
    server = make_server(sse_ping=0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n")
        data = b""
        while data.count(b": ping\r\n") < 2:  # comment lines: no blank line after them
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        if b"transfer-encoding: chunked" not in data:  # else chunks end in CRLF anyway
            assert b": ping\r\n\r\n" not in data
