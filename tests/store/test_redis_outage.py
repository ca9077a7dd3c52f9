"""Redis stopped mid-load: 503s, nothing acknowledged is lost, recovery without a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from starlette.datastructures import Secret

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.settings import ProviderAccount
from receiver.simulator import SimulatorConfig, create_simulator
from tests.conftest import LiveServer, base_settings, history, mint

JOBS, STEPS = 8, 40


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    # fsync every write: a SIGKILL must not take back what Redis acknowledged to us
    server = RedisServer(tmp_path, extra_args=["--appendfsync", "always"]).start()
    yield server
    server.stop()


def body(ptid: str, pct: int) -> bytes:
    return orjson.dumps({"id": ptid, "status": "IN_PROGRESS", "progress": f"{pct}%"})


def test_redis_down_gives_503_and_acknowledged_callbacks_survive(
    own_redis: RedisServer,
) -> None:
    server = LiveServer(base_settings(own_redis.url, redis_timeout=1.0)).start()
    acked: dict[str, list[int]] = {}
    refused = 0
    lock = threading.Lock()
    halfway, down_done = threading.Barrier(JOBS + 1), threading.Barrier(JOBS + 1)
    killed, restarted = threading.Event(), threading.Event()
    try:
        with server.client("key-acme") as acme:
            jobs = [mint(acme) for _ in range(JOBS)]

            def sender(job: str, url: str) -> None:
                nonlocal refused
                with server.client() as client:
                    for pct in range(1, STEPS + 1):
                        if pct == STEPS // 2:  # three steps while Redis is down
                            halfway.wait()
                            killed.wait(30)
                        answer = client.post(url, content=body(job, pct))
                        with lock:
                            if answer.status_code == 200:
                                acked.setdefault(job, []).append(pct)
                            else:
                                assert answer.status_code == 503, answer.text
                                assert answer.json()["error"] == "store_unavailable"
                                assert answer.headers["retry-after"] == "1"
                                refused += 1
                        if pct == STEPS // 2 + 2:
                            down_done.wait()
                            restarted.wait(30)

            threads = [threading.Thread(target=sender, args=job) for job in jobs]
            for t in threads:
                t.start()
            halfway.wait()
            own_redis.stop(kill=True)  # SIGKILL
            killed.set()
            assert acme.get("/readyz").status_code == 503
            assert acme.get("/tasks").status_code == 503
            down_done.wait()
            own_redis.start()  # same port, same data folder
            restarted.set()
            for t in threads:
                t.join(60)

            # the service recovered by itself (the script cache was lost with the process)
            assert acme.get("/readyz").status_code == 200
            job, url = mint(acme)
            assert acme.post(url, content=body(job, 5)).json()["result"] == "stored"
    finally:
        server.stop()

    assert refused >= JOBS * 3, "the outage did not refuse what it should have"
    assert sum(map(len, acked.values())) >= JOBS * (STEPS - 3)
    check = redis.Redis(port=own_redis.port)
    for job, _ in jobs:
        stored = {orjson.loads(f[b"data"])["progress"] for f in history(check, "acme", job)}
        missing = set(acked.get(job, [])) - stored
        assert not missing, f"acknowledged but not stored: {job} {sorted(missing)}"
    check.close()


def test_the_worker_rides_out_a_redis_outage(tmp_path: Path) -> None:
    """Redis killed while a task is in flight: the worker's loops keep going, readiness is
    false meanwhile, and once Redis is back the task is finished by polling (the provider's
    callbacks during the outage got 503s, and providers never retry)."""
    own = RedisServer(tmp_path, extra_args=["--appendfsync", "always"]).start()
    simulator = LiveServer(app=create_simulator(SimulatorConfig(step_interval=0.3))).start()
    port = free_port()
    server = LiveServer(base_settings(
        own.url, redis_timeout=1.0, embedded_worker=True, reconcile_after=0.5,
        reconcile_interval=0.1, public_base_url=f"http://127.0.0.1:{port}",
        accounts={"mjproxy": ProviderAccount("mjproxy", simulator.url, Secret("sk"), 1)}),
        port=port).start()
    try:
        with server.client("key-acme") as acme:
            first = acme.post("/tasks", json={"provider": "mjproxy", "prompt": "one"})
            job = first.json()["id"]
            deadline = time.monotonic() + 10
            while acme.get(f"/tasks/{job}").json()["status"] == "NOT_START":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            own.stop(kill=True)  # mid-task
            assert acme.get("/readyz").status_code == 503
            time.sleep(2.5)  # callbacks refused meanwhile; the worker's loops meet errors
            own.start()
            deadline = time.monotonic() + 30
            while (task := acme.get(f"/tasks/{job}").json())["status"] != "SUCCESS":
                assert time.monotonic() < deadline, task
                time.sleep(0.1)
            assert acme.get("/readyz").status_code == 200
            second = acme.post("/tasks", json={"provider": "mjproxy", "prompt": "two"})
            while (task2 := acme.get(f"/tasks/{second.json()['id']}").json())[
                    "status"] != "SUCCESS":
                assert time.monotonic() < deadline, task2  # the dispatcher is alive too
                time.sleep(0.1)
            metrics = acme.get("/metrics").text
    finally:
        server.stop()
        simulator.stop()
        own.stop()
    assert task["image_url"] and task2["image_url"]
    assert 'receiver_redis_errors_total{where="api"}' in metrics
    assert 'receiver_redis_errors_total{where="reconciler"}' in metrics  # and went on
