"""Event streams read by clients nobody here wrote: each gets every event of a task, the
last one within a second of being stored, no message with empty data, one connection.

sseclient-py (over requests, and over urllib3) once got each event only when the next came,
and the last never: the stream was close-delimited and those readers buffer such a body.
Node's `eventsource` and `@microsoft/fetch-event-source` come from npm (installed once into
pytest's cache) and run `tests/live/sse_clients.mjs`. Chromium's EventSource is the dashboard's
(tests/web/test_dashboard.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import httpx
import orjson
import pytest
import redis
import requests
import sseclient
import urllib3
from aiohttp_sse_client import client as aiohttp_sse
from httpx_sse import connect_sse

from receiver.server.streams import StreamProtocol
from tests.conftest import LiveServer, mint

ACME = {"Authorization": "Bearer key-acme"}
Message = tuple[str, str, str, float]  # event, id, data, when it came (monotonic)
Collect = Callable[[str, Callable[[Message], bool]], None]


def with_sseclient_requests(url: str, take: Callable[[Message], bool]) -> None:
    response = requests.get(url, stream=True, headers=ACME, timeout=20)
    for message in sseclient.SSEClient(response).events():
        if take((message.event, message.id, message.data, time.monotonic())):
            break
    response.close()


def with_sseclient_urllib3(url: str, take: Callable[[Message], bool]) -> None:
    pool = urllib3.PoolManager()
    response = pool.request("GET", url, headers=ACME, preload_content=False, timeout=20)
    for message in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
        if take((message.event, message.id, message.data, time.monotonic())):
            break
    response.release_conn()


def with_httpx_sse(url: str, take: Callable[[Message], bool]) -> None:
    with httpx.Client(timeout=20, headers=ACME) as client, \
            connect_sse(client, "GET", url) as source:
        for message in source.iter_sse():
            if take((message.event, message.id, message.data, time.monotonic())):
                break


def with_aiohttp_sse_client(url: str, take: Callable[[Message], bool]) -> None:
    async def read() -> None:
        async with aiohttp.ClientSession(headers=ACME) as session, \
                aiohttp_sse.EventSource(url, session=session) as source:
            async for message in source:
                if take((message.type, message.last_event_id, message.data,
                         time.monotonic())):
                    break

    asyncio.run(read())


CLIENTS: dict[str, Collect] = {
    "sseclient-py+requests": with_sseclient_requests,
    "sseclient-py+urllib3": with_sseclient_urllib3,
    "httpx-sse": with_httpx_sse,
    "aiohttp-sse-client": with_aiohttp_sse_client,
}


@pytest.fixture(params=["listener", "uvicorn"])
def server(request: pytest.FixtureRequest, make_server: Callable[..., LiveServer],
           r: redis.Redis) -> Iterator[LiveServer]:
    """`receiver serve`'s protocol, and the same app under uvicorn's own."""
    yield make_server(http=StreamProtocol if request.param == "listener" else "httptools")


def callback(task: str, status: str, pct: int) -> bytes:
    return orjson.dumps({"id": task, "status": status, "progress": f"{pct}%",
                         "imageUrl": "http://x/i.png" if status == "SUCCESS" else None})


@pytest.mark.parametrize("name", CLIENTS)
def test_every_client_gets_every_event_at_once(server: LiveServer, name: str) -> None:
    with server.client("key-acme") as acme:
        job, url = mint(acme)
        got: list[Message] = []
        first = threading.Event()

        def take(message: Message) -> bool:
            got.append(message)
            first.set()
            return message[0] == "task.succeeded"

        reader = threading.Thread(target=CLIENTS[name],
                                  args=(f"{server.url}/tasks/{job}/events", take), daemon=True)
        reader.start()
        assert first.wait(10), "no first event (the task as it is)"
        steps = [("IN_PROGRESS", pct) for pct in (10, 40, 70)] + [("SUCCESS", 100)]
        for status, pct in steps:
            answer = acme.post(url, content=callback(f"p-{job}", status, pct))
            assert answer.json()["result"] == "stored"
            stored_at = time.monotonic()
            time.sleep(0.05)
        reader.join(10)
        assert not reader.is_alive(), f"{name} got {[m[0] for m in got]}"
    kinds = [m[0] for m in got]
    assert kinds == ["task.created", "task.progress", "task.progress", "task.progress",
                     "task.succeeded"], kinds
    assert all(m[2] for m in got), "a message with empty data"
    assert [int(orjson.loads(m[2])["progress"]) for m in got] == [0, 10, 40, 70, 100]
    ids = [m[1] for m in got]
    assert len(set(ids)) == len(ids) and all(ids)
    assert got[-1][3] - stored_at < 1.0  # the last one within a second of being stored


NODE_CLIENTS = ("eventsource", "fetch-event-source")
NODE_PACKAGES = ("eventsource@3", "@microsoft/fetch-event-source@2")


@pytest.fixture(scope="session")
def node_clients(request: pytest.FixtureRequest) -> Path:
    """The npm packages, installed once into pytest's cache (from the npm registry)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (make test installs Debian's nodejs and npm)")
    where = request.config.cache.mkdir("node-sse-clients")
    if not (where / "node_modules" / "@microsoft" / "fetch-event-source").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                        "--prefix", str(where), *NODE_PACKAGES], check=True, timeout=300)
    return where


@pytest.mark.parametrize("name", NODE_CLIENTS)
def test_node_clients_get_every_event_at_once(server: LiveServer, name: str,
                                              node_clients: Path) -> None:
    with server.client("key-acme") as acme:
        job, url = mint(acme)
        token = acme.post("/subscribe-tokens", json={"task_id": job}).json()["events_url"]
        reader = subprocess.Popen(
            ["node", str(Path(__file__).with_name("sse_clients.mjs")), name,
             f"{server.url}{token}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "NODE_CLIENTS_DIR": str(node_clients)})
        try:
            assert reader.stdout is not None
            first = reader.stdout.readline()  # {"open": true}
            assert orjson.loads(first) == {"open": True}, first
            created = orjson.loads(reader.stdout.readline())
            assert created["event"] == "task.created", created
            for status, pct in [("IN_PROGRESS", 10), ("IN_PROGRESS", 40), ("SUCCESS", 100)]:
                assert acme.post(url, content=callback(f"p-{job}", status, pct)).json()[
                    "result"] == "stored"
                stored_at = time.time() * 1000
                time.sleep(0.05)
            out, err = reader.communicate(timeout=20)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    lines = [created, *(orjson.loads(line) for line in out.splitlines())]
    assert reader.returncode == 0, (lines, err)
    assert [m.get("event") for m in lines] == [
        "task.created", "task.progress", "task.progress", "task.succeeded"], lines
    assert all(m["data"] for m in lines), "a message with empty data"
    assert lines[-1]["t"] - stored_at < 1000  # within a second of being stored (ms)
    # one connection: no second open, no error
    assert not any("open" in m or "error" in m for m in lines[1:]), lines
