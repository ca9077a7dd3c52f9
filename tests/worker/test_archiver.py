"""The archive end to end: receiver with its worker, the simulator as the provider and its
CDN, Redis, and a directory or a real S3-compatible server (moto's) as the image store."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.images import ImageStore, image_name
from receiver.services.container import Services
from receiver.simulator._http import _png
from receiver.worker.archiver import Archiver
from tests.conftest import (
    KEYS,
    LiveServer,
    RedisClusterNodes,
    S3Server,
    Stack,
    faults,
    mint,
    sample,
    sim_stats,
    submit,
    wait_final,
)


def wait_archived(client: httpx.Client, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = client.get(f"/tasks/{job_id}").json()
        if task["archived_image_url"]:
            return task
        assert time.monotonic() < deadline, f"not archived: {task}"
        time.sleep(0.05)


def wait_queue_empty(r: redis.Redis, tenant: str = "acme", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while r.zcard(KEYS.archive(tenant)):
        assert time.monotonic() < deadline, "the archive queue did not empty"
        time.sleep(0.05)


def success(job_url: str, image_url: str, ptid: str, client: httpx.Client,
            image_urls: list[str] | None = None) -> None:
    """The provider's SUCCESS callback, its image at ``image_url``."""
    body = json.loads(sample("mjproxy-success.json", ptid))
    body["imageUrl"] = image_url
    if image_urls is not None:
        body["imageUrls"] = [{"url": url} for url in image_urls]
    assert client.post(job_url, content=json.dumps(body)).status_code == 200


def test_a_success_image_outlives_its_provider_and_only_its_tenant_reads_it(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    receiver, simulator = stack(image_store=f"file://{tmp_path}")
    with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
        task = wait_final(acme, submit(acme, provider="mjproxy", prompt="a red fox")["id"])
        assert task["status"] == "SUCCESS" and task["archived_image_url"] is None
        archived = wait_archived(acme, task["id"])
        sources = [httpx.get(url).content for url in [task["image_url"], *task["image_urls"]]]
        url = archived["archived_image_url"]
        assert url.startswith(f"{receiver.url}/images/{task['id']}/")
        # the relay's imageUrls: the grid first (as midjourney-proxy lists it), its four
        assert len(archived["archived_image_urls"]) == len(task["image_urls"]) == 5
        assert archived["status"] == "SUCCESS" and archived["version"] == task["version"] + 1
        assert len(list(tmp_path.glob("*/*.png"))) == 5  # the grid once, and its four

        # the provider and its CDN go away: links expired, then no server at all
        faults(simulator, expire_images=True)
        assert httpx.get(task["image_url"]).status_code == 404
        simulator.stop()

        got = acme.get(url)
        assert got.status_code == 200 and got.content == sources[0]
        assert got.headers["content-type"] == "image/png"
        assert got.headers["cache-control"] == "private, max-age=31536000, immutable"
        assert [acme.get(u).content for u in archived["archived_image_urls"]] == sources[1:]
        assert acme.get(url, headers={"If-None-Match": got.headers["etag"]}).status_code == 304
        assert acme.get(f"{url}?token=").status_code == 200  # an empty token: none given

        # another tenant, nobody, a name the task does not have
        refused = beta.get(url)
        assert refused.status_code == 404 and refused.json()["error"] == "task_not_found"
        assert httpx.get(url).status_code == 401
        other_name = archived["archived_image_urls"][0].rpartition("/")[2]
        job_b, _ = mint(beta)
        stray = acme.get(f"/images/{job_b}/{other_name}")
        assert stray.status_code == 404

        # signed URLs for <img>: this task's images only
        signed = acme.get(f"/tasks/{task['id']}/images").json()
        assert signed["expires_in"] == 3600
        assert httpx.get(signed["image_url"]).content == sources[0]
        token = signed["image_url"].partition("?")[2]
        assert httpx.get(f"{receiver.url}/images/{job_b}/{other_name}?{token}").json()[
            "error"] == "image_not_found"
        value = token.removeprefix("token=")
        middle = len(value) - 10  # in the signature, clear of base64's spare bits at the end
        flipped = "A" if value[middle] != "A" else "B"
        forged = httpx.get(f"{url}?token={value[:middle]}{flipped}{value[middle + 1:]}")
        assert forged.status_code == 401 and forged.json()["error"] == "invalid_token"
        assert beta.get(f"/tasks/{task['id']}/images").status_code == 404

        events = [t["event"] for t in acme.get(f"/tasks/{task['id']}/history").json()[
            "transitions"]]
        assert events[-2:] == ["task.succeeded", "task.archived"]
        # a task stream opened now starts at the archive, and ends there
        with acme.stream("GET", f"/tasks/{task['id']}/events") as stream:
            body = stream.read()
        assert b"event: task.archived" in body and b"event: task.succeeded" not in body


def test_an_s3_compatible_store_holds_the_images(
        stack: Stack, r: redis.Redis, s3_server: S3Server) -> None:
    bucket = s3_server.bucket(f"archive-{uuid.uuid4().hex[:8]}")
    receiver, simulator = stack(image_store=f"s3://{bucket}/receiver", aws=s3_server.aws())
    with receiver.client("key-acme") as acme:
        task = wait_final(acme, submit(acme, provider="ohmygpt", prompt="a blue heron")["id"])
        archived = wait_archived(acme, task["id"])
        name = archived["archived_image_url"].rpartition("/")[2]
        assert f"receiver/{name[:2]}/{name}" in s3_server.keys(bucket)
        simulator.stop()
        got = acme.get(archived["archived_image_url"])
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG")


def test_an_image_at_a_private_address_nobody_allowed_is_never_fetched(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.setblocking(False)
    port = trap.getsockname()[1]
    receiver, _ = stack(image_store=f"file://{tmp_path}")
    with receiver.client("key-acme") as acme, trap:
        job, url = mint(acme)
        success(url, f"http://127.0.0.1:{port}/grid.png", "trap-1", acme, image_urls=[
            f"http://[::ffff:127.0.0.1]:{port}/1.png", f"http://localhost:{port}/2.png",
            "http://169.254.169.254/latest/meta-data/x.png", "file:///etc/passwd"])
        wait_queue_empty(r)
        try:
            trap.accept()
            raise AssertionError("the archive connected to a private address")
        except BlockingIOError:
            pass
        task = acme.get(f"/tasks/{job}").json()
        assert task["status"] == "SUCCESS" and task["archived_image_url"] is None
        assert task["version"] == 2  # created, succeeded: the archive changed nothing
        metrics = acme.get("/metrics").text
        assert 'receiver_archive_failures_total{result="refused"} 5.0' in metrics
    assert not list(tmp_path.iterdir())


def test_links_expired_before_the_archive_leave_the_task_as_it_was(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    receiver, simulator = stack(image_store=f"file://{tmp_path}")
    faults(simulator, expire_images=True)
    with receiver.client("key-acme") as acme:
        task = wait_final(acme, submit(acme, provider="mjproxy", prompt="gone")["id"])
        wait_queue_empty(r)
        after = acme.get(f"/tasks/{task['id']}").json()
        assert after == task  # SUCCESS, nothing archived, no new version
        assert sim_stats(simulator)["image_requests"] == 5  # each link asked once: a 404
        assert not list(tmp_path.iterdir())


class FlakyCdn:
    """An image host that answers 503 ``failures`` times, then the image."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests = 0
        self.server = LiveServer(app=Starlette(routes=[Route("/{name}", self.image)]))

    async def image(self, request: Request) -> Response:
        self.requests += 1
        if self.requests <= self.failures:
            return Response("busy", 503)
        return Response(_png(rgb=b"\x10\x20\x30"), media_type="image/png")


def test_a_transient_failure_is_tried_again_and_a_lasting_one_given_up(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    flaky, down = FlakyCdn(2), FlakyCdn(1000)
    flaky.server.start()
    down.server.start()
    try:
        receiver, _ = stack(
            image_store=f"file://{tmp_path}", archive_backoff=0.1, archive_attempts=3,
            fetch_allow_hosts=(f"127.0.0.1:{flaky.server.port}", f"127.0.0.1:{down.server.port}"))
        with receiver.client("key-acme") as acme:
            job, url = mint(acme)
            success(url, f"{flaky.server.url}/grid.png", "flaky-1", acme)
            job2, url2 = mint(acme)
            success(url2, f"{down.server.url}/grid.png", "down-1", acme)
            archived = wait_archived(acme, job)
            wait_queue_empty(r)
            assert flaky.requests == 3  # 503, 503 (0.1 s, then 0.2 s later), the image
            assert acme.get(archived["archived_image_url"]).content == _png(rgb=b"\x10\x20\x30")
            assert down.requests == 3  # ARCHIVE_ATTEMPTS, then given up
            assert acme.get(f"/tasks/{job2}").json()["archived_image_url"] is None
            metrics = acme.get("/metrics").text
            assert 'receiver_archive_failures_total{result="retry"} 4.0' in metrics
            assert 'receiver_archive_failures_total{result="exhausted"} 1.0' in metrics
    finally:
        flaky.server.stop()
        down.server.stop()


def test_one_image_is_kept_once_and_goes_when_its_last_task_expires(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    receiver, simulator = stack(image_store=f"file://{tmp_path}", task_ttl=3)
    shared = f"{simulator.url}/images/shared.png"
    with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
        jobs = []
        for n, client in enumerate((acme, beta)):
            job, url = mint(client)
            success(url, shared, f"shared-{n}", client)
            jobs.append(wait_archived(client, job))
        names = {task["archived_image_url"].rpartition("/")[2] for task in jobs}
        assert len(names) == 1 and len(list(tmp_path.glob("*/*.png"))) == 1
        # each tenant reads it through its own task
        assert acme.get(jobs[0]["archived_image_url"]).status_code == 200
        assert beta.get(jobs[1]["archived_image_url"]).status_code == 200
        time.sleep(3.2)  # TASK_TTL: the tasks are gone, so the image is no longer needed
        assert acme.get(f"/tasks/{jobs[0]['id']}").status_code == 404

    async def sweep() -> int:
        svc = Services.build(replace(receiver.settings))
        await svc.start()
        try:
            assert svc.images is not None
            return await Archiver(svc, svc.images).sweep()
        finally:
            await svc.close()

    assert asyncio.run(sweep()) == 1
    assert not list(tmp_path.glob("*/*.png"))
    assert r.zcard(KEYS.images()) == 0
    assert isinstance(ImageStore(f"file://{tmp_path}"), ImageStore)


def test_the_archive_works_on_a_redis_cluster(
        stack: Stack, redis_cluster: RedisClusterNodes, tmp_path: Path) -> None:
    receiver, simulator = stack(image_store=f"file://{tmp_path}", redis_url=redis_cluster.url,
                                redis_cluster=True)
    archived = []
    with receiver.client("key-acme") as acme, receiver.client("key-beta") as beta:
        for n, client in enumerate((acme, beta)):  # tenants on different masters
            job, url = mint(client)
            success(url, f"{simulator.url}/images/cluster-{n}.png", f"cluster-{n}", client)
            archived.append(wait_archived(client, job))
        assert acme.get(archived[0]["archived_image_url"]).status_code == 200
        assert beta.get(archived[1]["archived_image_url"]).status_code == 200
        assert beta.get(archived[0]["archived_image_url"]).status_code == 404
    cluster = RedisCluster.from_url(redis_cluster.url)
    try:
        assert cluster.zcard(KEYS.images()) == 2
        assert not cluster.zcard(KEYS.archive("acme")) and not cluster.zcard(KEYS.archive("beta"))
    finally:
        cluster.close()


class GatedCdn:
    """An image host: ``/slow/*`` answers only once the test opens the gate; every request
    is counted by path."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.gate = asyncio.Event()
        self.server = LiveServer(app=Starlette(routes=[Route("/{kind}/{name}", self.image)]))

    async def image(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        if request.path_params["kind"] == "slow":
            self.loop = asyncio.get_running_loop()
            await self.gate.wait()
        return Response(_png(rgb=request.url.path.encode()[-3:]), media_type="image/png")


def test_one_slow_task_holds_up_no_other_and_a_task_fetches_eight_images_at_most(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    cdn = GatedCdn()
    cdn.server.start()
    try:
        receiver, _ = stack(image_store=f"file://{tmp_path}",
                            fetch_allow_hosts=(f"127.0.0.1:{cdn.server.port}",))
        with receiver.client("key-acme") as acme:
            slow, slow_url = mint(acme)
            success(slow_url, f"{cdn.server.url}/slow/grid.png", "slow-1", acme)
            deadline = time.monotonic() + 10
            while "/slow/grid.png" not in cdn.paths:  # the archiver is stuck in it
                assert time.monotonic() < deadline
                time.sleep(0.02)
            many, many_url = mint(acme)
            success(many_url, f"{cdn.server.url}/fast/grid.png", "many-1", acme,
                    image_urls=[f"{cdn.server.url}/fast/{n}.png" for n in range(20)])
            archived = wait_archived(acme, many)  # while the slow one still waits
            assert acme.get(f"/tasks/{slow}").json()["archived_image_url"] is None
            fast = [p for p in cdn.paths if p.startswith("/fast/")]
            assert len(fast) == 8  # the grid and the first seven of its list
            kept = archived["archived_image_urls"]  # the grid (listed first), its first 7
            assert len(kept) == 21 and None not in kept[:8] and kept[8:] == [None] * 13
            cdn.loop.call_soon_threadsafe(cdn.gate.set)
            assert wait_archived(acme, slow)["archived_image_url"]
    finally:
        cdn.server.stop()


def test_a_sweep_goes_on_until_no_expired_image_is_left(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    receiver, _ = stack(image_store=f"file://{tmp_path}")
    store = ImageStore(f"file://{tmp_path}")
    names = []
    for n in range(5):
        png = _png(rgb=bytes([n, n, n]))
        names.append(image_name(png, "image/png"))
        asyncio.run(store.put(names[-1], png))
        r.zadd(KEYS.images(), {names[-1]: n})  # long expired

    async def sweep() -> int:
        svc = Services.build(replace(receiver.settings))
        await svc.start()
        try:
            assert svc.images is not None
            return await Archiver(svc, svc.images).sweep(batch=2)
        finally:
            await svc.close()

    assert asyncio.run(sweep()) == 5
    assert not list(tmp_path.glob("*/*.png")) and r.zcard(KEYS.images()) == 0


def test_a_store_that_is_down_is_a_503(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    s3 = S3Server().start()
    try:
        bucket = s3.bucket("down")
        receiver, simulator = stack(image_store=f"s3://{bucket}", aws=s3.aws())
        with receiver.client("key-acme") as acme:
            job, url = mint(acme)
            success(url, f"{simulator.url}/images/down.png", "down-1", acme)
            archived = wait_archived(acme, job)["archived_image_url"]
            assert acme.get(archived).status_code == 200
            s3.stop()  # the bucket's host is gone
            gone = acme.get(archived, timeout=30)
            assert gone.status_code == 503, gone.text
            assert gone.json()["error"] == "image_store_unavailable"
            assert gone.headers["retry-after"] == "5"
    finally:
        s3.stop()
