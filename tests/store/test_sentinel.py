"""Behind Sentinel (REDIS_SENTINELS): the master found through a sentinel, and found again
after it dies and its replica is promoted, without restarting the service."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from receiver.cli.redis_server import RedisServer, free_port
from tests.conftest import LiveServer, base_settings, mint


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, int]]:
    master = RedisServer(tmp_path / "master", persist=False).start()
    replica = RedisServer(tmp_path / "replica", persist=False, extra_args=[
        "--replicaof", "127.0.0.1", str(master.port)]).start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n")
    sentinel = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:  # the sentinel knows the master and has found its replica
            try:
                if client.sentinel_slaves("mymaster"):
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the sentinel did not come up"
            time.sleep(0.1)
        client.close()
        # ...and the replica has its first copy: the master waits 5 s (repl-diskless-sync-
        # delay) before sending it, which the test's WAIT after one write could outlast
        follower = redis.Redis(port=replica.port)
        while follower.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline + 20, "the replica did not sync"
            time.sleep(0.1)
        follower.close()
        yield master, replica, port
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        replica.stop()
        master.stop()


def step(pct: int) -> bytes:
    return orjson.dumps({"id": "p1", "status": "IN_PROGRESS", "progress": f"{pct}%"})


def test_callbacks_follow_the_master_through_a_failover(
        sentinel_setup: tuple[RedisServer, RedisServer, int]) -> None:
    master, replica, sentinel_port = sentinel_setup
    server = LiveServer(base_settings(
        "redis://127.0.0.1:1/0",  # only the options count: the address comes from Sentinel
        redis_sentinels=(f"127.0.0.1:{sentinel_port}",), redis_timeout=1.0)).start()
    try:
        with server.client("key-acme") as acme:
            job, url = mint(acme)
            assert acme.post(url, content=step(10)).json()["result"] == "stored"
            # Replication is asynchronous: what the replica has not received when the master
            # dies is gone (see the README). Here it has it all.
            assert redis.Redis(port=master.port).wait(1, 5000) == 1
            master.stop(kill=True)
            answers: list[int] = []
            deadline = time.monotonic() + 30
            pct = 10
            while not answers or answers[-1] != 200:
                assert time.monotonic() < deadline, answers
                pct += 1
                answers.append(acme.post(url, content=step(pct)).status_code)
                time.sleep(0.2)
            task = acme.get(f"/tasks/{job}").json()
    finally:
        server.stop()
    assert set(answers[:-1]) <= {503}  # refused while there was no master, never lost
    assert task["progress"] == pct and task["version"] == 3  # created, 10%, the last step
    assert redis.Redis(port=replica.port).role()[0] == b"master"
