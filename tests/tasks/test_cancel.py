"""POST /tasks/{id}/cancel over real sockets: the receiver with its worker, the simulator."""

from __future__ import annotations

import time

import httpx

from tests.conftest import Stack, faults, sim_stats, submit, wait_final


def wait_sent(client: httpx.Client, job_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/tasks/{job_id}").json()["provider_task_id"] is None:
        assert time.monotonic() < deadline, "the task was not sent"
        time.sleep(0.05)


def test_a_queued_task_canceled_is_never_sent_and_a_sent_one_is_canceled_on_trueai(
        stack: Stack) -> None:
    receiver, simulator = stack(limit=1)
    faults(simulator, never_finish=True)  # the first task holds the account's only slot
    with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
        first = submit(acme, provider="mjproxy", prompt="one")["id"]
        wait_sent(acme, first)
        queued = submit(acme, provider="mjproxy", prompt="two")["id"]
        assert beta.post(f"/tasks/{queued}/cancel").status_code == 404  # not beta's
        answer = acme.post(f"/tasks/{queued}/cancel")
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "CANCEL"
        assert "before it was sent" in answer.json()["fail_reason"]
        again = acme.post(f"/tasks/{queued}/cancel")
        assert again.status_code == 409 and again.json()["error"] == "task_final"
        # sent and running: trueai cancels it (FAILURE 取消任务 there, no callback)
        canceled = acme.post(f"/tasks/{first}/cancel")
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["status"] == "CANCEL"
        faults(simulator, never_finish=False)
        # the slot came back: a new task runs
        assert wait_final(acme, submit(acme, provider="mjproxy", prompt="three")["id"]
                          )["status"] == "SUCCESS"
        assert wait_final(acme, queued)["status"] == "CANCEL"
    assert sim_stats(simulator)["submitted"] == 2  # one and three: two was never sent


def test_providers_that_cannot_cancel_a_sent_task_say_so(stack: Stack) -> None:
    receiver, simulator = stack(flavor="novicezk")
    faults(simulator, never_finish=True)
    with receiver.client("key-acme") as acme:
        for provider in ("mjproxy", "ohmygpt", "aigc2d"):
            job = submit(acme, provider=provider, prompt="fox")["id"]
            wait_sent(acme, job)
            answer = acme.post(f"/tasks/{job}/cancel")
            assert answer.status_code == 409, answer.text
            assert answer.json()["error"] == "cannot_cancel"
            assert acme.get(f"/tasks/{job}").json()["status"] != "CANCEL"
