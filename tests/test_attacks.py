"""The outside security test's attacks, rerun against real `receiver serve` processes.

Each test is one attack that once worked (issue: hardening); the slow-head attacks are in
tests/server/test_slow_clients.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from receiver.cli.redis_server import RedisServer, free_port
from tests.conftest import KEYS, serve_process

TENANTS = ("alice", "mallory", "carol", "dave", "erin", "frank", "grace")
API_KEYS = ",".join(f"{t}:key-{t}" for t in TENANTS)
SSE_CAP = 50


class Service:
    def __init__(self, port: int, log: Path, redis_url: str) -> None:
        self.port, self.log, self.redis_url = port, log, redis_url
        self.url = f"http://127.0.0.1:{port}"

    def client(self, tenant: str, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={
            "Authorization": f"Bearer key-{tenant}", **headers})


Start = Callable[..., Service]


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Start]:
    """`receiver serve` with these settings, on a Redis of its own; stopped at the end."""
    procs: list[Any] = []
    redises: list[RedisServer] = []

    def run(*args: str, policy: str = "noeviction", **env: str) -> Service:
        root = tmp_path_factory.mktemp("serve")
        store = RedisServer(root / "redis").start()
        redises.append(store)
        redis.Redis.from_url(store.url).config_set("maxmemory-policy", policy)
        port = free_port()
        proc = serve_process(port, {
            "RECEIVER_API_KEYS": API_KEYS, "REDIS_URL": store.url,
            "RECEIVER_SECRET_KEYS": "attack-test-key", "RECEIVER_DATA_DIR": str(root),
            **env}, root / "serve.log", *args)
        procs.append(proc)
        return Service(port, root / "serve.log", store.url)

    yield run
    for proc in procs:
        proc.terminate()
        proc.wait(20)
    for store in redises:
        store.stop()


@pytest.fixture(scope="module")
def service(start: Start) -> Service:
    """The service as `make run` starts it (providers simulated), SSE_MAX_PER_TENANT=50."""
    return start("--simulator", "--no-access-log", SSE_MAX_PER_TENANT=str(SSE_CAP),
                 RECONCILE_AFTER="1", RECONCILE_INTERVAL="0.2")


@pytest.fixture(scope="module")
def strict(start: Start) -> Service:
    """Small quotas and mint rates, a trusted proxy, a metrics token, an evicting Redis."""
    return start("--no-access-log", policy="allkeys-lru", TENANT_MAX_TASKS="8",
                 TENANT_MAX_BYTES="120000", MINT_RATE="2", MINT_BURST="10",
                 TRUSTED_PROXIES="127.0.0.1", METRICS_TOKEN="metrics-secret")


def wait_status(client: httpx.Client, job: str, status: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while (task := client.get(f"/tasks/{job}").json())["status"] != status:
        assert task["status"] not in ("FAILURE", "CANCEL"), task
        assert time.monotonic() < deadline, task
        time.sleep(0.1)
    return task


def mjproxy_success(ptid: str, prompt: str) -> bytes:
    return orjson.dumps({
        "id": ptid, "action": "IMAGINE", "status": "SUCCESS", "progress": "100%",
        "prompt": prompt, "promptEn": prompt, "imageUrl": "http://127.0.0.1:9/grid.png",
        "buttons": [{"customId": f"MJ::JOB::upsample::1::{ptid}", "label": "U1"}],
    })


def test_a_provider_task_id_is_the_first_tasks_alone(service: Service) -> None:
    """Mallory names Alice's provider task id: at mint (409), in a callback to her own URL
    (409, nothing stored), and as the parent of an action (refused: only a task this
    service submitted is acted on). Alice's own actions still work."""
    with service.client("alice") as alice, service.client("mallory") as mallory:
        own = alice.post("/tasks", json={"prompt": "alice's secret fox"})
        assert own.status_code == 202, own.text
        job = own.json()["id"]
        ptid = wait_status(alice, job, "SUCCESS")["provider_task_id"]

        taken = mallory.post("/callback-urls", json={"provider": "mjproxy",
                                                     "provider_task_id": ptid})
        assert taken.status_code == 409, taken.text
        assert taken.json()["error"] == "provider_task_claimed"

        minted = mallory.post("/callback-urls", json={"provider": "mjproxy"}).json()
        bound = mallory.post(minted["callback_url"].replace(service.url, ""),
                             content=mjproxy_success(ptid, "mallory"))
        assert bound.status_code == 409 and bound.json()["error"] == "provider_task_claimed"
        task = mallory.get(f"/tasks/{minted['job_id']}").json()
        assert (task["status"], task["provider_task_id"], task["version"]) == \
            ("NOT_START", None, 1)

        # A task of her own, bound to an id nobody holds, is still not a parent here.
        fake = mallory.post("/callback-urls", json={"provider": "mjproxy"}).json()
        stored = mallory.post(fake["callback_url"].replace(service.url, ""),
                              content=mjproxy_success("mallory-1", "mallory"))
        assert stored.json()["result"] == "stored"
        action = mallory.post("/tasks", json={"parent_id": fake["job_id"], "button": "U1"})
        assert action.status_code == 409, action.text
        assert action.json()["error"] == "parent_not_submitted_here"
        assert len(mallory.get("/tasks").json()["tasks"]) == 2  # nothing was queued

        upscale = alice.post("/tasks", json={"parent_id": job, "button": "U1"})
        assert upscale.status_code == 202, upscale.text
        done = wait_status(alice, upscale.json()["id"], "SUCCESS")
        assert done["action"] == "UPSCALE" and done["parent_id"] == job


def test_our_submit_answer_outranks_an_earlier_claim(service: Service) -> None:
    """Mallory claims an id before the provider hands it to Alice (AIGC2D's ids count up):
    the provider's answer to our key wins, and Alice's task gets its callbacks."""
    r = redis.Redis.from_url(service.redis_url)
    with service.client("alice") as alice, service.client("mallory") as mallory:
        fox = {"provider": "aigc2d", "prompt": "a first fox"}
        first = alice.post("/tasks", json=fox).json()["id"]
        ptid = wait_status(alice, first, "SUCCESS")["provider_task_id"]
        guess = str(int(ptid) + 1)  # as AIGC2D's, the simulator's ids count up
        ahead = mallory.post("/callback-urls", json={"provider": "aigc2d",
                                                     "provider_task_id": guess})
        assert ahead.status_code == 201
        second = alice.post("/tasks", json={**fox, "prompt": "a second fox"}).json()["id"]
        task = wait_status(alice, second, "SUCCESS")
        assert task["provider_task_id"] == guess
        assert task["progress"] == 100  # its callbacks were stored
        assert r.get(KEYS.claim("aigc2d", guess)) == f"alice/{second}".encode()


def test_the_stream_cap_holds_under_concurrency(service: Service) -> None:
    """10x SSE_MAX_PER_TENANT requests at once: exactly the cap is served (the check and
    the count once had an await between them, and 6,000 of 6,000 got through)."""
    with service.client("carol") as carol:
        job = carol.post("/callback-urls", json={"provider": "mjproxy"}).json()["job_id"]

    async def attempt(opened: list[asyncio.StreamWriter]) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(f"GET /tasks/{job}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Authorization: Bearer key-carol\r\n\r\n".encode())
        status = (await asyncio.wait_for(reader.readline(), 30)).split(b" ")[1]
        opened.append(writer)
        return status

    async def storm(count: int) -> list[bytes]:
        opened: list[asyncio.StreamWriter] = []
        try:
            return list(await asyncio.gather(*(attempt(opened) for _ in range(count))))
        finally:
            for writer in opened:
                writer.close()

    statuses = asyncio.run(storm(10 * SSE_CAP))
    assert statuses.count(b"200") == SSE_CAP
    assert statuses.count(b"429") == 9 * SSE_CAP
    time.sleep(0.5)  # the server sees the closes
    again = asyncio.run(storm(SSE_CAP))  # every place was given back
    assert again.count(b"200") == SSE_CAP


def test_callback_urls_are_not_formed_from_an_untrusted_host(service: Service,
                                                             strict: Service) -> None:
    with service.client("alice", Host="evil.example") as evil:
        refused = evil.post("/callback-urls", json={"provider": "mjproxy"})
        assert refused.status_code == 400
        assert refused.json()["error"] == "untrusted_host"
        assert "PUBLIC_BASE_URL" in refused.json()["detail"]
    with service.client("alice", **{"X-Forwarded-Proto": "https"}) as spoof:
        minted = spoof.post("/callback-urls", json={"provider": "mjproxy"}).json()
        # not from a trusted proxy: ignored
        assert minted["callback_url"].startswith(f"http://127.0.0.1:{service.port}/")
    with strict.client("alice", **{"X-Forwarded-Proto": "https"}) as proxied:
        minted = proxied.post("/callback-urls", json={"provider": "mjproxy"}).json()
        # TRUSTED_PROXIES=127.0.0.1: believed
        assert minted["callback_url"].startswith(f"https://127.0.0.1:{strict.port}/")


def test_a_tenant_cannot_fill_redis(strict: Service) -> None:
    """TENANT_MAX_TASKS=8, TENANT_MAX_BYTES=120000: the 9th task is a 429, the write past
    the bytes a 507; other tenants are untouched."""
    with strict.client("dave") as dave, strict.client("erin") as erin, \
            strict.client("frank") as frank:
        answers = [dave.post("/callback-urls", json={"provider": "mjproxy"})
                   for _ in range(9)]
        assert [a.status_code for a in answers] == [201] * 8 + [429]
        assert answers[-1].json()["error"] == "task_quota"
        assert int(answers[-1].headers["retry-after"]) >= 1

        prompt = "p" * 8000  # three copies stored (snapshot, task history, tenant stream)
        answers = [erin.post("/callback-urls", json={"provider": "mjproxy", "prompt": prompt})
                   for _ in range(6)]
        assert [a.status_code for a in answers[:4]] == [201] * 4
        assert answers[-1].status_code == 507
        assert answers[-1].json()["error"] == "storage_quota"
        # callbacks count too: a big one to a task erin holds is refused, and not stored
        url = answers[0].json()["callback_url"].replace(strict.url, "")
        big = orjson.dumps({"id": "e-1", "status": "IN_PROGRESS", "prompt": "q" * 60_000})
        refused = erin.post(url, content=big)
        assert refused.status_code == 507, refused.text
        assert erin.get(f"/tasks/{answers[0].json()['job_id']}").json()["version"] == 1

        assert frank.post("/callback-urls", json={"provider": "mjproxy"}).status_code == 201


def test_mints_are_rate_limited_and_small(strict: Service) -> None:
    with strict.client("grace") as grace:
        statuses = [grace.post("/subscribe-tokens", json={}).status_code for _ in range(14)]
        assert statuses[:10] == [201] * 10 and statuses[-1] == 429
    with strict.client("alice") as alice:
        big = alice.post("/callback-urls", json={"provider": "mjproxy", "x": "y" * 40_000})
        assert big.status_code == 413


def test_heavy_json_is_refused_before_any_parse(service: Service) -> None:
    """87,000 empty arrays in 261 KB (one level deep, but 5 ms of allocations to parse) are
    a 413, counted in C; so is the same body nested past MAX_JSON_DEPTH. A flat body of the
    same size is stored (cost figures: bench/json_cost.py, BENCHMARKS.md)."""
    with service.client("alice") as alice:
        minted = alice.post("/callback-urls", json={"provider": "mjproxy"}).json()
        url = minted["callback_url"].replace(service.url, "")
        head = b'{"id":"heavy-1","status":"IN_PROGRESS","x":'
        arrays = head + b"[" + b",".join([b"[]"] * 87_000) + b"]}"
        refused = alice.post(url, content=arrays)
        assert refused.status_code == 413 and refused.json()["error"] == "json_too_complex"
        deep = alice.post(url, content=head + b"[" * 40 + b"]" * 40 + b"}")
        assert deep.status_code == 413 and deep.json()["error"] == "json_too_deep"
        flat = alice.post(url, content=head + b'"' + b"[" * (len(arrays) - len(head) - 3)
                          + b'"}')
        assert flat.json()["result"] == "stored"
        assert alice.get(f"/tasks/{minted['job_id']}").json()["version"] == 2


def test_metrics_can_be_protected(service: Service, strict: Service) -> None:
    assert httpx.get(f"{service.url}/metrics").status_code == 200  # no METRICS_TOKEN
    refused = httpx.get(f"{strict.url}/metrics")
    assert refused.status_code == 401 and refused.json()["error"] == "metrics_token_required"
    wrong = httpx.get(f"{strict.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = httpx.get(f"{strict.url}/metrics",
                   headers={"Authorization": "Bearer metrics-secret"})
    assert ok.status_code == 200 and "receiver_callbacks_total" in ok.text


def test_an_evicting_redis_is_named_at_startup(service: Service, strict: Service) -> None:
    assert "maxmemory-policy is 'allkeys-lru'" in strict.log.read_text()
    assert "maxmemory-policy" not in service.log.read_text()
