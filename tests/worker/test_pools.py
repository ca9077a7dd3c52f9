"""Pools of accounts end to end: three simulators as one provider's accounts (one of them
given a key it refuses), the receiver's worker choosing among them, Redis."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import redis
from starlette.datastructures import Secret

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.settings import ProviderAccount
from receiver.services.container import Services
from receiver.simulator import SimulatorConfig, create_simulator
from receiver.worker.dispatcher import Dispatcher
from tests.conftest import KEYS, LiveServer, base_settings, sim_stats, submit, wait_final


@pytest.fixture
def simulators() -> Iterator[list[LiveServer]]:
    """Three mjproxy (trueai) accounts' hosts; each takes the key "good" only."""
    started = [LiveServer(app=create_simulator(SimulatorConfig(
        step_interval=0.05, seed=n, api_keys=("good",)))).start() for n in range(3)]
    yield started
    for sim in started:
        sim.stop()


def test_a_pool_sends_within_each_limit_benches_a_refused_key_and_keeps_affinity(
        redis_server: RedisServer, r: redis.Redis, simulators: list[LiveServer]) -> None:
    one, two, bad = simulators
    port = free_port()
    accounts = {
        "one": ProviderAccount("mjproxy", one.url, Secret("good"), 2, name="one"),
        "two": ProviderAccount("mjproxy", two.url, Secret("good"), 3, name="two"),
        "bad": ProviderAccount("mjproxy", bad.url, Secret("wrong"), 3, name="bad"),
    }
    receiver = LiveServer(base_settings(
        redis_server.url, public_base_url=f"http://127.0.0.1:{port}", accounts=accounts,
        embedded_worker=True, reconcile_after=0.5, reconcile_interval=0.1,
        admin_keys=(Secret("admin-key"),)), port=port).start()
    try:
        with receiver.client("key-acme") as acme:
            jobs = [submit(acme, provider="mjproxy", prompt=f"fox {n}")["id"]
                    for n in range(10)]
            tasks = [wait_final(acme, job, timeout=60) for job in jobs]
            assert [t["status"] for t in tasks] == ["SUCCESS"] * 10
            sent_by = {job: r.hget(KEYS.task("acme", job), "a").decode() for job in jobs}
            assert set(sent_by.values()) <= {"one", "two"}
            assert sim_stats(one)["max_in_flight"] and max(
                sim_stats(one)["max_in_flight"].values()) <= 2
            assert max(sim_stats(two)["max_in_flight"].values()) <= 3
            assert sim_stats(bad)["submitted"] == 0  # it refused our key every time
            assert sim_stats(bad)["refused_keys"] >= 1
            view = {a["name"]: a for a in httpx.get(
                f"{receiver.url}/admin/accounts",
                headers={"Authorization": "Bearer admin-key"}).json()["accounts"]}
            assert "provider_auth" in view["bad"]["last_error"]
            assert view["one"]["last_error"] is None and view["two"]["health"] == "ok"
            assert view["one"]["tasks_sent"] + view["two"]["tasks_sent"] == 10

            # U1 on a grid goes to the account that made the grid, whatever is free
            for grid in tasks[:4]:
                child = wait_final(acme, submit(acme, provider="mjproxy",
                                                parent_id=grid["id"], button="U1")["id"])
                assert child["status"] == "SUCCESS", child
                assert r.hget(KEYS.task("acme", child["id"]), "a").decode() == \
                    sent_by[grid["id"]]
            upscales = {name: sim_stats(sim)["by_action"].get("mjproxy", {}).get("UPSCALE", 0)
                        for name, sim in (("one", one), ("two", two))}
            made = {name: list(sent_by[t["id"]] for t in tasks[:4]).count(name)
                    for name in ("one", "two")}
            assert upscales == made
    finally:
        receiver.stop()

    # "one" is disabled: an action on a grid it made has nowhere to go, and says so
    grid = next(t for t in tasks if sent_by[t["id"]] == "one")
    accounts["one"] = replace(accounts["one"], enabled=False)
    again = LiveServer(base_settings(redis_server.url, accounts=accounts)).start()
    try:
        with again.client("key-acme") as acme:
            refused = acme.post("/tasks", json={"provider": "mjproxy", "parent_id": grid["id"],
                                                "button": "U2"})
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"] == "parent_account_gone"
            assert "'one', which is disabled" in refused.json()["detail"]
    finally:
        again.stop()


def test_an_action_queued_before_pools_still_goes_to_its_parents_account(
        redis_server: RedisServer, r: redis.Redis, simulators: list[LiveServer]) -> None:
    """Queued by a version without routes, an action has none: the account the script picks
    (here the other, weighted far ahead) puts it back bound to its parent's account."""
    sims = {"one": simulators[0], "two": simulators[1]}
    accounts = {name: ProviderAccount("mjproxy", sim.url, Secret("good"), 3, name=name)
                for name, sim in sims.items()}
    port = free_port()
    settings = base_settings(redis_server.url, public_base_url=f"http://127.0.0.1:{port}",
                             accounts=accounts, embedded_worker=True)
    first = LiveServer(settings, port=port).start()
    try:
        with first.client("key-acme") as acme:
            grid = wait_final(acme, submit(acme, provider="mjproxy", prompt="fox")["id"])
    finally:
        first.stop()
    owner = r.hget(KEYS.task("acme", grid["id"]), "a").decode()
    other = next(name for name in sims if name != owner)
    web = LiveServer(replace(settings, embedded_worker=False), port=port).start()
    try:
        with web.client("key-acme") as acme:
            child = submit(acme, provider="mjproxy", parent_id=grid["id"], button="U1")["id"]
    finally:
        web.stop()
    assert r.hdel(KEYS.routes("mjproxy"), f"acme/{child}") == 1  # as before pools: no route
    weighted = {**accounts, owner: replace(accounts[owner], weight=0.01),
                other: replace(accounts[other], weight=100.0)}
    worker = LiveServer(replace(settings, accounts=weighted), port=port).start()
    try:
        with worker.client("key-acme") as acme:
            assert wait_final(acme, child)["status"] == "SUCCESS"
        assert r.hget(KEYS.task("acme", child), "a").decode() == owner
        assert sim_stats(sims[other])["by_action"].get("mjproxy", {}).get("UPSCALE", 0) == 0
    finally:
        worker.stop()


def test_each_account_is_admitted_for_the_modes_it_serves(redis_server: RedisServer) -> None:
    """An account's modes are its flavour's, narrowed to its own list: a novicezk account
    (no modes) in a pool with a trueai one is never handed a FAST task."""
    def account(name: str, flavor: str, modes: tuple[str, ...] = ()) -> ProviderAccount:
        return ProviderAccount("mjproxy", "http://127.0.0.1:9", Secret("k"), 2, flavor=flavor,
                               name=name, modes=modes)
    settings = replace(base_settings(redis_server.url), accounts={
        "all": account("all", "trueai"), "fast": account("fast", "trueai", ("FAST",)),
        "nz": account("nz", "novicezk")})
    svc = Services.build(settings)
    admitted = Dispatcher(svc)._admitted["mjproxy"]
    assert [(a.name, a.modes) for a in admitted] == [
        ("all", ("FAST", "RELAX", "TURBO")), ("fast", ("FAST",)), ("nz", ())]
