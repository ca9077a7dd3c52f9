"""``receiver serve`` as `make run` runs it: no REDIS_URL, no keys, a fresh data folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from receiver.redis_server import free_port
from tests.conftest import TIMEOUT, sample


def test_serve_starts_its_own_redis_and_accepts_a_minted_callback(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "RECEIVER_API_KEYS", "RECEIVER_SECRET_KEYS")}
    env.update(RECEIVER_DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "serve", "--host", "0.0.0.0"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            minted = client.post("/callback-urls", json={"provider": "mjproxy"}).json()
            url = minted["callback_url"]
            answer = client.post(url, content=sample("mjproxy-success.json"))
            assert answer.json()["result"] == "stored"
            assert client.get(f"/tasks/{minted['job_id']}").json()["status"] == "SUCCESS"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)

    output = log_path.read_text()
    token = url.split("token=")[1]
    assert token not in output  # access lines carry [redacted]
    assert "token=[redacted]" in output
    assert "binding 127.0.0.1 instead of 0.0.0.0" in output  # no keys: loopback only
    assert (tmp_path / "data" / "secret_key").stat().st_mode & 0o077 == 0
    redis_url = next(w for w in output.split() if w.startswith("redis://"))
    try:  # the child Redis went with the service
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
        alive = True
    except redis.ConnectionError:
        alive = False
    assert not alive
