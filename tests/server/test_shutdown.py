"""SIGTERM to a real `receiver serve` mid-load: every callback answered 2xx is in Redis, open
SSE streams are told to reconnect, and the process exits in bounded time."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import orjson
import redis
from httpx_sse import connect_sse

from receiver.cli.redis_server import RedisServer, free_port
from tests.conftest import TIMEOUT, history, serve_process

SENDERS = 8


def test_sigterm_mid_load_loses_nothing_acknowledged_and_exits(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"REDIS_URL": redis_server.url, "RECEIVER_SECRET_KEYS": "test-key-1",
           "RECEIVER_API_KEYS": "acme:key-acme", "RECEIVER_DATA_DIR": str(tmp_path)}
    proc = serve_process(port, env, tmp_path / "serve.log", "--no-worker", "--no-access-log")
    auth = {"Authorization": "Bearer key-acme"}

    with httpx.Client(base_url=base, headers=auth, timeout=TIMEOUT) as client:
        minted = [client.post("/callback-urls", json={"provider": "mjproxy"}).json()
                  for _ in range(SENDERS)]
    acked: dict[str, list[int]] = {}
    sent = threading.Event()
    lock = threading.Lock()

    def sender(job_id: str, url: str) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            for pct in range(1, 100):
                body = orjson.dumps({"id": f"p-{job_id}", "status": "IN_PROGRESS",
                                     "progress": f"{pct}%"})
                try:
                    answer = client.post(url, content=body)
                except httpx.TransportError:
                    return  # the server stopped accepting
                if answer.status_code == 200:
                    with lock:
                        acked.setdefault(job_id, []).append(pct)
                        if sum(map(len, acked.values())) > 100:
                            sent.set()
                time.sleep(0.005)

    stream_ended: list[str] = []

    def listener() -> None:
        with httpx.Client(base_url=base, headers=auth, timeout=TIMEOUT) as client, \
                connect_sse(client, "GET", "/events") as source:
            for event in source.iter_sse():
                if event.retry:
                    stream_ended.append(f"retry {event.retry}")
            stream_ended.append("closed")

    threads = [threading.Thread(target=sender, args=(m["job_id"], m["callback_url"]))
               for m in minted]
    sse = threading.Thread(target=listener)
    sse.start()
    for t in threads:
        t.start()
    assert sent.wait(30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    took = time.monotonic() - started
    for t in (*threads, sse):
        t.join(20)

    output = (tmp_path / "serve.log").read_text()
    # uvicorn shuts down, then re-raises the signal it caught: -15 after a clean shutdown
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert took < 12, took  # uvicorn's graceful timeout is 10 s; SSE streams do not hold it
    assert stream_ended and stream_ended[-1] == "closed"
    total = 0
    for job_id, pcts in acked.items():
        stored = [orjson.loads(h[b"data"])["progress"] for h in history(r, "acme", job_id)]
        assert set(pcts) <= set(stored), job_id  # every 2xx answer is in Redis
        total += len(pcts)
    assert total > 100


def test_two_web_processes_share_events_through_redis(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    """A callback accepted by one process reaches an SSE client of the other."""
    env = {"REDIS_URL": redis_server.url, "RECEIVER_SECRET_KEYS": "test-key-1",
           "RECEIVER_API_KEYS": "acme:key-acme", "RECEIVER_DATA_DIR": str(tmp_path)}
    ports = free_port(), free_port()
    procs = [serve_process(port, env, tmp_path / f"serve-{port}.log", "--no-worker")
             for port in ports]
    auth = {"Authorization": "Bearer key-acme"}
    one, two = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        with httpx.Client(base_url=one, headers=auth, timeout=TIMEOUT) as client:
            job = client.post("/callback-urls", json={"provider": "mjproxy"}).json()
        seen: list[str] = []
        connected = threading.Event()

        def listen() -> None:
            with httpx.Client(base_url=two, headers=auth, timeout=TIMEOUT) as client, \
                    connect_sse(client, "GET", f"/tasks/{job['job_id']}/events") as source:
                connected.set()
                seen.extend(event.event for event in source.iter_sse() if event.id)

        listener = threading.Thread(target=listen)
        listener.start()
        assert connected.wait(10)
        time.sleep(0.2)
        for body in ({"id": "p1", "status": "IN_PROGRESS", "progress": "50%"},
                     {"id": "p1", "status": "SUCCESS", "imageUrl": "https://cdn/x.png"}):
            assert httpx.post(job["callback_url"], json=body).status_code == 200  # to `one`
        listener.join(10)
        assert not listener.is_alive()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert seen == ["task.created", "task.progress", "task.succeeded"]
