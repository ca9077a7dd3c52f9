"""The reconciler and VERIFY_FINAL over real sockets, and what a dead worker or a provider
that is down leaves behind: nothing lost, nothing leaked, nothing sent twice."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis
from starlette.datastructures import Secret

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.settings import ProviderAccount
from receiver.core.tokens import CallbackClaims, TokenSigner
from receiver.simulator import SimulatorConfig, create_simulator
from receiver.store.admission import Member
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
        assert r.zpopmin(KEYS.queue("ohmygpt", "acme"))
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
            assert r.zscore(KEYS.queue("mjproxy", "acme"), str(Member("acme", job))) is not None
            simulator = LiveServer(app=create_simulator(SimulatorConfig(step_interval=0.02)),
                                   port=sim_port).start()
            assert wait_final(acme, job, timeout=40)["status"] == "SUCCESS"
        assert sim_stats(simulator)["submitted"] == 1
    finally:
        receiver.stop()
        if simulator is not None:
            simulator.stop()


def test_a_task_unknown_for_less_than_the_grace_is_polled_again(stack: Stack) -> None:
    receiver, simulator = stack()
    faults(simulator, drop_callbacks=1.0, empty_polls=True)  # trueai's 204: "no such task"
    with receiver.client("key-acme") as acme:
        first = submit(acme, provider="mjproxy", prompt="one")["id"]
        unknown = 'receiver_reconciler_polls_total{provider="mjproxy",result="unknown"}'
        deadline = time.monotonic() + 10
        while unknown not in acme.get("/metrics").text:  # polled (reconcile_after 0.5 s),
            assert time.monotonic() < deadline  # unknown, well within the grace
            time.sleep(0.1)
        second = submit(acme, provider="mjproxy", prompt="two")["id"]
        faults(simulator, empty_polls=False)
        assert [wait_final(acme, job)["status"] for job in (first, second)] == ["SUCCESS"] * 2
    assert sim_stats(simulator)["submitted"] == 2


def test_a_refusal_without_json_fails_the_task_and_frees_its_slot(
        redis_server: RedisServer, r: redis.Redis, stack: Stack) -> None:
    _, simulator = stack(embedded_worker=False)  # only the simulator: no other worker
    port = free_port()  # a wrong base URL: every submit is a 404 page
    receiver = LiveServer(base_settings(
        redis_server.url, public_base_url=f"http://127.0.0.1:{port}", embedded_worker=True,
        accounts={"mjproxy": ProviderAccount(
            "mjproxy", f"{simulator.url}/nowhere", Secret("sk"), 1)}), port=port).start()
    try:
        with receiver.client("key-acme") as acme:
            jobs = [submit(acme, provider="mjproxy", prompt=f"fox {i}")["id"] for i in range(2)]
            failed = [wait_final(acme, job, timeout=10) for job in jobs]
    finally:
        receiver.stop()
    assert [t["status"] for t in failed] == ["FAILURE", "FAILURE"]
    assert all("refused the request (HTTP 404)" in t["fail_reason"] for t in failed)
    assert r.zcard(KEYS.slots("mjproxy")) == 0


def test_verify_final_does_not_take_another_tasks_success_before_ours_is_known(
        stack: Stack) -> None:
    receiver, simulator = stack(verify_final=True)
    with receiver.client("key-acme") as acme:
        other = wait_final(acme, submit(acme, provider="mjproxy", prompt="theirs")["id"])
        faults(simulator, submit_error_rate=1.0)  # ours: sent, no answer we can use
        ours = submit(acme, provider="mjproxy", prompt="ours")["id"]
        time.sleep(0.5)
        forged = json.loads(sample("mjproxy-success.json"))
        forged["id"] = other["provider_task_id"]  # a real, finished task: polling says SUCCESS
        token = TokenSigner(["test-key-1"], 3600, 3600).mint_callback(
            CallbackClaims(ours, "acme", "mjproxy"))
        answer = acme.post(f"/callbacks/mjproxy?token={token}", json=forged)
        assert answer.status_code == 202 and answer.json()["result"] == "verifying"
        task = acme.get(f"/tasks/{ours}").json()
    assert task["status"] == "NOT_START" and task["provider_task_id"] is None


@pytest.mark.parametrize("provider", ["mjproxy", "ohmygpt"])
def test_a_task_the_provider_does_not_know_fails_after_the_grace(stack: Stack,
                                                                 provider: str) -> None:
    receiver, simulator = stack(limit=1, unknown_task_grace=1.0)
    faults(simulator, drop_callbacks=1.0, empty_polls=True)  # it lost the task
    with receiver.client("key-acme") as acme:
        lost = submit(acme, provider=provider, prompt="lost")["id"]
        task = wait_final(acme, lost, timeout=20)
        assert task["status"] == "FAILURE", task
        assert "does not know this task" in task["fail_reason"]
        faults(simulator, drop_callbacks=0.0, empty_polls=False)
        # its slot (the account's only one) came back: the next task runs
        assert wait_final(acme, submit(acme, provider=provider, prompt="next")["id"]
                          )["status"] == "SUCCESS"
        metrics = acme.get("/metrics").text
    assert f'receiver_reconciler_polls_total{{provider="{provider}",result="unknown"}}' in metrics
