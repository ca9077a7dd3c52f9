"""The reconciler and VERIFY_FINAL over real sockets, and what a dead worker or a provider
that is down leaves behind: nothing lost, nothing leaked, nothing sent twice."""

from __future__ import annotations

import json
import time

import httpx
import redis
from starlette.datastructures import Secret

from receiver.admission import Member
from receiver.redis_server import RedisServer, free_port
from receiver.settings import ProviderAccount
from receiver.simulator import SimulatorConfig, create_simulator
from receiver.tokens import CallbackClaims, TokenSigner
from tests.conftest import (
    KEYS,
    LiveServer,
    Stack,
    base_settings,
    faults,
    sample,
    sim_stats,
    submit,
    wait_final,
)


def wait_status(client: httpx.Client, job_id: str, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while (task := client.get(f"/tasks/{job_id}").json())["status"] != status:
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    return dict(task)


def test_verify_final_stores_what_the_provider_says_not_a_forged_success(stack: Stack) -> None:
    receiver, simulator = stack(verify_final=True)
    faults(simulator, never_finish=True)
    with receiver.client("key-acme") as acme:
        job = submit(acme, provider="mjproxy", prompt="a red fox")["id"]
        running = wait_status(acme, job, "IN_PROGRESS")
        # Whoever learned the callback URL claims SUCCESS with an image of their choosing.
        forged = json.loads(sample("mjproxy-success.json"))
        forged.update(id=running["provider_task_id"], imageUrl="https://evil.example/x.png")
        token = TokenSigner(["test-key-1"], 3600, 3600).mint_callback(
            CallbackClaims(job, "acme", "mjproxy"))
        answer = acme.post(f"/callbacks/mjproxy?token={token}", json=forged)
        assert answer.status_code == 200 and answer.json()["result"] in ("duplicate", "stale")
        task = acme.get(f"/tasks/{job}").json()
        assert task["status"] == "IN_PROGRESS" and task["image_url"] != forged["imageUrl"]
        faults(simulator, never_finish=False)  # the real SUCCESS is confirmed and stored
        done = wait_final(acme, job)
    assert done["status"] == "SUCCESS" and done["image_url"].startswith(simulator.url)


def test_a_dead_dispatchers_slot_is_freed_by_the_timeout(
        redis_server: RedisServer, r: redis.Redis, stack: Stack) -> None:
    # A dispatcher took the slot and died before sending: the task holds the only slot.
    receiver, simulator = stack(limit=1, task_timeout=1.0, embedded_worker=False)
    with receiver.client("key-acme") as acme:
        orphan = submit(acme, provider="ohmygpt", prompt="a lost fox")["id"]
        assert r.zpopmin(KEYS.queue("ohmygpt"))
        r.zadd(KEYS.slots("ohmygpt"), {str(Member("acme", orphan)): int(time.time() * 1000)})
        waiting = submit(acme, provider="ohmygpt", prompt="a waiting fox")["id"]
    port = free_port()  # a live worker on the same Redis
    worker = LiveServer(base_settings(
        redis_server.url, public_base_url=f"http://127.0.0.1:{port}",
        accounts=receiver.settings.accounts, embedded_worker=True, task_timeout=1.0,
        reconcile_interval=0.1), port=port).start()
    try:
        with worker.client("key-acme") as acme:
            lost = wait_final(acme, orphan)
            assert lost["status"] == "FAILURE" and "timed out" in lost["fail_reason"]
            assert wait_final(acme, waiting)["status"] == "SUCCESS"
            usage = acme.get("/usage").json()["totals"]["tokens"]
    finally:
        worker.stop()
    assert sim_stats(simulator)["submitted"] == 1  # the orphan was never sent
    assert usage == {"tasks": 1, "spent": 14000, "refunded": 0, "net": 14000}


def test_an_unreachable_provider_keeps_the_task_queued_until_it_is_back(
        redis_server: RedisServer, r: redis.Redis) -> None:
    sim_port, port = free_port(), free_port()
    receiver = LiveServer(base_settings(
        redis_server.url, public_base_url=f"http://127.0.0.1:{port}", embedded_worker=True,
        accounts={"mjproxy": ProviderAccount(
            "mjproxy", f"http://127.0.0.1:{sim_port}", Secret("sk"), 3)}), port=port).start()
    simulator = None
    try:
        with receiver.client("key-acme") as acme:
            job = submit(acme, provider="mjproxy", prompt="a patient fox")["id"]
            time.sleep(1.5)  # tried, refused (connection refused), queued again
            assert acme.get(f"/tasks/{job}").json()["status"] == "NOT_START"
            assert r.zscore(KEYS.queue("mjproxy"), str(Member("acme", job))) is not None
            simulator = LiveServer(app=create_simulator(SimulatorConfig(step_interval=0.02)),
                                   port=sim_port).start()
            assert wait_final(acme, job, timeout=40)["status"] == "SUCCESS"
        assert sim_stats(simulator)["submitted"] == 1
    finally:
        receiver.stop()
        if simulator is not None:
            simulator.stop()
