"""`receiver.client` against a real `receiver serve --simulator`: what a tenant's backend
imports instead of writing HTTP glue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from receiver.cli.redis_server import free_port
from receiver.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    NotFound,
    Unauthorized,
    WaitTimeout,
)
from tests.conftest import serve_process

KEYS = "acme:key-acme"


class Serve:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = self.start()

    def start(self) -> object:
        self.proc = serve_process(self.port, {
            "RECEIVER_API_KEYS": KEYS, "RECEIVER_DATA_DIR": str(self.root / "data"),
            "SIMULATOR_STEP_INTERVAL": "0.3", "RECONCILE_AFTER": "1"},
            self.root / "serve.log", "--simulator", "--no-access-log", session=True)
        return self.proc

    def stop(self) -> None:
        self.proc.terminate()  # type: ignore[attr-defined]
        self.proc.wait(30)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    serve = Serve(tmp_path_factory.mktemp("client"))
    yield serve
    serve.stop()


def test_submit_wait_get_list_and_the_events_of_a_task(service: Serve) -> None:
    with Client(service.url, api_key="key-acme") as client:
        task = client.submit(prompt="a red fox", provider="mjproxy")
        assert task["status"] == "NOT_START"
        seen = [snapshot["status"] for snapshot in client.events(task["id"])]
        assert seen[-1] == "SUCCESS" and "IN_PROGRESS" in seen  # and the stream ended
        done = client.wait(task["id"], timeout=30)  # ended already: at once
        # an event's snapshot is the task, plus which event it was
        assert {k: v for k, v in done.items() if k not in ("event", "event_id")} == \
            client.get(task["id"])
        assert done["event"] == "task.succeeded" and done["image_url"]
        assert task["id"] in [t["id"] for t in client.list(status="SUCCESS", limit=200)]
        upscale = client.submit(parent_id=task["id"], button="U1")
        assert client.wait(upscale["id"], timeout=30)["action"] == "UPSCALE"


def test_refusals_are_typed(service: Serve) -> None:
    with Client(service.url, api_key="key-acme") as client:
        with pytest.raises(NotFound) as missing:
            client.get("0" * 20)
        assert missing.value.status == 404 and missing.value.code == "task_not_found"
        with pytest.raises(BadRequest):
            client.submit(action="IMAGINE")  # no prompt
        grid = client.submit(prompt="a slow fox", provider="mjproxy")
        with pytest.raises(Conflict) as early:
            client.submit(parent_id=grid["id"], button="U1")
        assert early.value.code == "parent_not_ready"
        with pytest.raises(WaitTimeout):
            client.wait(grid["id"], timeout=0.2)
        client.wait(grid["id"], timeout=30)
        with pytest.raises(Conflict) as ended:
            client.cancel(grid["id"])
        assert ended.value.code == "task_final"
    with Client(service.url, api_key="wrong") as stranger, pytest.raises(Unauthorized):
        stranger.list()


def test_a_minted_url_and_its_callbacks(service: Serve) -> None:
    with Client(service.url, api_key="key-acme") as client:
        minted = client.callback_url("mjproxy", prompt="elsewhere")
        for status, pct in [("IN_PROGRESS", 50), ("SUCCESS", 100)]:
            httpx.post(minted["callback_url"], content=orjson.dumps(
                {"id": f"e-{minted['job_id']}", "status": status, "progress": f"{pct}%"}))
        assert client.wait(minted["job_id"], timeout=10)["status"] == "SUCCESS"


def test_events_resume_across_a_restart_without_a_gap(service: Serve) -> None:
    """Every task's events, while the service is stopped and started again: each stored
    transition once, in order."""
    got: list[dict[str, object]] = []
    with Client(service.url, api_key="key-acme", reconnect_for=60) as client:
        first = client.submit(prompt="before the restart", provider="aigc2d")

        def read() -> None:
            for snapshot in client.events():
                got.append(snapshot)
                if snapshot["prompt"] == "after the restart" and \
                        snapshot["status"] == "SUCCESS":
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        client.wait(first["id"], timeout=30)
        service.stop()
        service.start()
        second = client.submit(prompt="after the restart", provider="aigc2d")
        client.wait(second["id"], timeout=30)
        reader.join(30)
        assert not reader.is_alive()
    ids = [str(s["event_id"]) for s in got]
    assert len(ids) == len(set(ids))  # nothing twice
    mine = [s["status"] for s in got if s["id"] == second["id"]]
    assert mine[0] == "NOT_START" and mine[-1] == "SUCCESS"


def test_the_async_client(service: Serve) -> None:
    async def main() -> list[str]:
        async with AsyncClient(service.url, api_key="key-acme") as client:
            task = await client.submit(prompt="an async fox", provider="ohmygpt")
            seen = [s["status"] async for s in client.events(task["id"])]
            assert (await client.wait(task["id"], timeout=30))["status"] == "SUCCESS"
            assert (await client.get(task["id"]))["id"] == task["id"]
            with pytest.raises(NotFound):
                await client.cancel("0" * 20)
            return seen

    seen = asyncio.run(main())
    assert seen[-1] == "SUCCESS"


def test_a_tasks_archived_images_signed_and_fetched(tmp_path: Path) -> None:
    port = free_port()
    proc = serve_process(port, {
        "RECEIVER_API_KEYS": KEYS, "RECEIVER_DATA_DIR": str(tmp_path / "data"),
        "SIMULATOR_STEP_INTERVAL": "0.05", "IMAGE_STORE": f"file://{tmp_path / 'images'}"},
        tmp_path / "serve.log", "--simulator", "--no-access-log", session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with Client(url, api_key="key-acme") as client:
            task = client.submit(prompt="a red fox", provider="mjproxy")
            client.wait(task["id"], timeout=30)
            deadline = time.monotonic() + 20  # the worker keeps them just after the SUCCESS
            while not (done := client.get(task["id"]))["archived_image_url"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            kept = client.image(done["archived_image_url"])
            assert kept.startswith(b"\x89PNG")
            signed = client.images(task["id"])
            assert httpx.get(signed["image_url"]).content == kept  # no key: the token
            with pytest.raises(NotFound):
                client.image(f"{url}/images/{task['id']}/{'0' * 64}.png")
            with pytest.raises(ValueError, match="not an archived image"):
                client.image(f"{url}/tasks/{task['id']}")

        async def the_async_one() -> bytes:
            async with AsyncClient(url, api_key="key-acme") as client:
                assert (await client.images(task["id"]))["image_url"]
                return await client.image(done["archived_image_url"])

        assert asyncio.run(the_async_one()) == kept
    finally:
        proc.terminate()
        proc.wait(30)
