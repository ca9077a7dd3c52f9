"""The same promises on a real 3-master Redis Cluster (REDIS_CLUSTER=true): callbacks stored
once, live events, admission and the ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot
from starlette.datastructures import Secret

from receiver.cli.redis_server import free_port
from receiver.core.settings import PROVIDERS, ProviderAccount
from receiver.simulator import SimulatorConfig, create_simulator
from tests.conftest import (
    KEYS,
    LiveServer,
    RedisClusterNodes,
    base_settings,
    mint,
    sim_stats,
    submit,
    wait_final,
)
from tests.live.test_sse import Reader, progress, start, success


@pytest.fixture
def cluster_server(redis_cluster: RedisClusterNodes) -> Iterator[LiveServer]:
    server = LiveServer(base_settings(redis_cluster.url, redis_cluster=True)).start()
    yield server
    server.stop()


def test_the_tenants_live_on_different_masters(redis_cluster: RedisClusterNodes) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    owners = {client.get_node_from_key(KEYS.stream(t)).name for t in ("acme", "beta", "gamma")}
    client.close()
    assert len(owners) >= 2  # else the tests below would not cross nodes
    assert key_slot(KEYS.task("acme", "x").encode()) == key_slot(KEYS.stream("acme").encode())


def test_callbacks_are_stored_once_on_a_cluster(
        cluster_server: LiveServer, redis_cluster: RedisClusterNodes) -> None:
    results = {}
    for key, tenant in (("key-acme", "acme"), ("key-beta", "beta")):
        with cluster_server.client(key) as client:
            job, url = mint(client)
            results[tenant] = [client.post(url, content=body).json()["result"] for body in (
                progress(f"p-{tenant}", 40), progress(f"p-{tenant}", 40),
                progress(f"p-{tenant}", 20), success(f"p-{tenant}"))]
            task = client.get(f"/tasks/{job}").json()
            assert task["status"] == "SUCCESS" and task["version"] == 3
            assert [t["id"] for t in client.get("/tasks").json()["tasks"]] == [job]
    assert results == {t: ["stored", "duplicate", "stale", "stored"] for t in ("acme", "beta")}
    check = RedisCluster.from_url(redis_cluster.url)
    assert check.xlen(KEYS.stream("acme")) == 3 and check.xlen(KEYS.stream("beta")) == 3
    check.close()


def test_live_events_on_a_cluster(cluster_server: LiveServer) -> None:
    with cluster_server.client("key-acme") as acme:
        job, url = mint(acme)
        reader = start(Reader(cluster_server, f"/tasks/{job}/events"))
        for body in (progress("p1", 30), progress("p1", 70), success("p1")):
            assert acme.post(url, content=body).status_code == 200
        reader.wait()
    assert reader.ended
    assert [e.event for e in reader.events] == [
        "task.created", "task.progress", "task.progress", "task.succeeded"]
    assert [orjson.loads(e.data)["progress"] for e in reader.events] == [0, 30, 70, 100]


def test_admission_and_the_ledger_on_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    simulator = LiveServer(app=create_simulator(
        SimulatorConfig(step_interval=0.03, seed=11))).start()
    port = free_port()
    receiver = LiveServer(base_settings(
        redis_cluster.url, redis_cluster=True, embedded_worker=True,
        public_base_url=f"http://127.0.0.1:{port}", reconcile_after=0.5,
        reconcile_interval=0.1,
        accounts={p: ProviderAccount(p, simulator.url, Secret(f"sk-{p}"), 2)
                  for p in PROVIDERS}), port=port).start()
    try:
        with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
            jobs = [(client, submit(client, provider=provider, prompt=f"fox {i}")["id"])
                    for i in range(6) for client, provider in (
                        (acme, "ohmygpt"), (beta, "aigc2d"))]
            done = [wait_final(client, job, timeout=60) for client, job in jobs]
            usage = {t: c.get("/usage").json()["totals"] for t, c in (("acme", acme),
                                                                        ("beta", beta))}
        stats = sim_stats(simulator)
    finally:
        receiver.stop()
        simulator.stop()
    assert [t["status"] for t in done] == ["SUCCESS"] * 12
    assert stats["submitted"] == 12
    assert all(1 <= n <= 2 for n in stats["max_in_flight"].values()), stats
    assert usage == {
        "acme": {"tokens": {"tasks": 6, "spent": 84000, "refunded": 0, "net": 84000}},
        "beta": {"points": {"tasks": 6, "spent": 600, "refunded": 0, "net": 600}}}


def test_readiness_on_a_cluster(cluster_server: LiveServer) -> None:
    assert httpx.get(f"{cluster_server.url}/readyz").json() == {"status": "ready"}


def test_a_finished_tasks_history_is_compacted_on_a_cluster(
        cluster_server: LiveServer, redis_cluster: RedisClusterNodes) -> None:
    check = RedisCluster.from_url(redis_cluster.url)
    bodies = [progress("p-hist", 30), success("p-hist")]
    with cluster_server.client("key-beta") as client:
        job, url = mint(client)
        for body in bodies:
            assert client.post(url, content=body).json()["result"] == "stored"
        deadline = time.monotonic() + 10
        while check.exists(KEYS.history("beta", job)):  # compacted into the task's hash
            assert time.monotonic() < deadline, "not compacted"
            time.sleep(0.02)
        transitions = client.get(f"/tasks/{job}/history").json()["transitions"]
    assert check.hget(KEYS.task("beta", job), "hl") is not None
    check.close()
    assert [t["event"] for t in transitions] == [
        "task.created", "task.progress", "task.succeeded"]
    assert [t["raw"].encode() for t in transitions[1:]] == bodies


def test_a_pool_of_accounts_on_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    """Two accounts of one provider, each its own simulator: tasks of two tenants (on
    different masters) spread over both, each within its limit; an action goes to its
    parent's account."""
    sims = [LiveServer(app=create_simulator(SimulatorConfig(step_interval=0.03, seed=n)))
            .start() for n in (12, 13)]
    port = free_port()
    accounts = {name: ProviderAccount("ohmygpt", sim.url, Secret("sk"), 2, name=name)
                for name, sim in zip(("first", "second"), sims, strict=True)}
    receiver = LiveServer(base_settings(
        redis_cluster.url, redis_cluster=True, embedded_worker=True,
        public_base_url=f"http://127.0.0.1:{port}", reconcile_after=0.5,
        reconcile_interval=0.1, accounts=accounts), port=port).start()
    cluster = RedisCluster.from_url(redis_cluster.url)
    try:
        with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
            jobs = [(client, tenant, submit(client, provider="ohmygpt", prompt=f"fox {i}")["id"])
                    for i in range(4) for client, tenant in ((acme, "acme"), (beta, "beta"))]
            done = [wait_final(client, job, timeout=60) for client, _, job in jobs]
            sent_by = [cluster.hget(KEYS.task(t, job), "a").decode() for _, t, job in jobs]
            grid = done[0]
            child = wait_final(acme, submit(acme, provider="ohmygpt", parent_id=grid["id"],
                                            action="UPSCALE", index=1)["id"], timeout=60)
            child_by = cluster.hget(KEYS.task("acme", child["id"]), "a").decode()
        stats = [sim_stats(sim) for sim in sims]
    finally:
        receiver.stop()
        cluster.close()
        for sim in sims:
            sim.stop()
    assert [t["status"] for t in done] == ["SUCCESS"] * 8 and child["status"] == "SUCCESS"
    assert sorted(set(sent_by)) == ["first", "second"]
    assert all(max(s["max_in_flight"].values()) <= 2 for s in stats), stats
    assert sum(s["submitted"] for s in stats) == 9
    assert child_by == sent_by[0]
