"""GET /admin/accounts: operators see each account's slots and who waits, with an admin key
only."""

from __future__ import annotations

import time

import httpx
from starlette.datastructures import Secret

from tests.conftest import Stack, faults, submit, wait_final


def test_operators_see_slots_and_the_tenants_waiting_and_nobody_else_does(
        stack: Stack) -> None:
    receiver, simulator = stack(limit=1, admin_keys=(Secret("op-old"), Secret("op-new")))
    faults(simulator, never_finish=True)  # the first task keeps the only slot
    with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
        for _ in range(3):
            submit(acme, provider="mjproxy", prompt="a fox")
        submit(beta, provider="mjproxy", prompt="an owl")
        assert acme.get("/admin/accounts").status_code == 401  # a tenant's key is not one
    base = receiver.url
    answer = httpx.get(f"{base}/admin/accounts", headers={"Authorization": "Bearer op-new"})
    assert answer.status_code == 200
    account = next(a for a in answer.json()["accounts"] if a["name"] == "mjproxy")
    assert account["queue_limit"] == 1 and account["slots_in_use"] == 1
    assert account["waiting"] == 3 and account["waiting_by_tenant"] == {"acme": 2, "beta": 1}
    nobody = httpx.get(f"{base}/admin/accounts")
    assert nobody.status_code == 401 and nobody.json()["error"] == "admin_key_required"


def test_without_admin_keys_there_are_no_admin_routes(stack: Stack) -> None:
    receiver, _ = stack()
    answer = httpx.get(f"{receiver.url}/admin/accounts",
                       headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 403 and answer.json()["error"] == "admin_disabled"


def test_a_paused_account_shows_why_and_recovers(stack: Stack) -> None:
    receiver, simulator = stack(admin_keys=(Secret("op"),))
    admin = {"Authorization": "Bearer op"}
    faults(simulator, queue_full=True)  # every submission refused: the account pauses
    with receiver.client("key-acme") as acme:
        job = submit(acme, provider="aigc2d", prompt="a fox")["id"]
        deadline = time.monotonic() + 10
        while True:
            state = next(a for a in httpx.get(f"{receiver.url}/admin/accounts",
                                              headers=admin).json()["accounts"]
                         if a["name"] == "aigc2d")
            if state["health"] == "paused":
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert state["last_error"].startswith("provider_queue_full")
        assert state["paused_until"] and state["tasks_sent"] == 0
        faults(simulator, queue_full=False)
        assert wait_final(acme, job)["status"] == "SUCCESS"
    state = next(a for a in httpx.get(f"{receiver.url}/admin/accounts",
                                      headers=admin).json()["accounts"]
                 if a["name"] == "aigc2d")
    assert state["tasks_sent"] == 1 and state["health"] == "ok" and state["waiting"] == 0
