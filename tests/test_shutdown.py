"""SIGTERM to a real `receiver serve` mid-load: every callback answered 2xx is in Redis, open
SSE streams are told to reconnect, and the process exits in bounded time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import redis
from httpx_sse import connect_sse

from receiver.redis_server import RedisServer, free_port
from tests.conftest import TIMEOUT, history

SENDERS = 8


def test_sigterm_mid_load_loses_nothing_acknowledged_and_exits(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "REDIS_URL": redis_server.url, "RECEIVER_SECRET_KEYS": "test-key-1",
           "RECEIVER_API_KEYS": "acme:key-acme", "RECEIVER_DATA_DIR": str(tmp_path)}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "serve", "--no-worker", "--port", str(port),
         "--no-access-log"], env=env, stdout=log, stderr=subprocess.STDOUT)
    auth = {"Authorization": "Bearer key-acme"}
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)

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
    log.close()

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
