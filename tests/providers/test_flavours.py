"""The submitter against both midjourney-proxy generations and OhMyGPT's real fields, end to
end over real sockets: POST /tasks, the dispatcher, the simulator playing the provider as its
source code does, callbacks and polls."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.settings import ProviderAccount
from tests.conftest import (
    LiveServer,
    Stack,
    base_settings,
    every_value,
    faults,
    sim_stats,
    sim_tasks,
    submit,
    wait_final,
)

PNG_DATA_URL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
                "nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==")


@pytest.mark.parametrize("flavor", ["trueai", "novicezk"])
def test_imagine_then_every_grid_button_describe_and_blend(
        stack: Stack, r: redis.Redis, flavor: str) -> None:
    receiver, simulator = stack(flavor=flavor)
    image = f"{simulator.url}/images/input.png"  # fetched and sent as a data URL
    with receiver.client("key-acme") as acme:
        grid = wait_final(acme, submit(acme, provider="mjproxy", prompt="a red fox")["id"])
        assert grid["status"] == "SUCCESS", grid
        labels = [b["label"] for b in grid["buttons"]]
        assert labels[:4] == ["U1", "U2", "U3", "U4"] and "V1" in labels
        jobs = {
            "UPSCALE": submit(acme, provider="mjproxy", parent_id=grid["id"], button="U1"),
            "VARIATION": submit(acme, provider="mjproxy", parent_id=grid["id"], button="V1"),
            "REROLL": submit(acme, provider="mjproxy", parent_id=grid["id"], action="REROLL"),
            "DESCRIBE": submit(acme, provider="mjproxy", action="DESCRIBE", images=[image]),
            "BLEND": submit(acme, provider="mjproxy", action="BLEND", images=[image, image],
                            dimensions="PORTRAIT"),
        }
        done = {action: wait_final(acme, task["id"]) for action, task in jobs.items()}
    for task in done.values():
        assert task["status"] == "SUCCESS", task
    assert done["UPSCALE"]["action"] == "UPSCALE" and done["UPSCALE"]["image_url"]
    describe = done["DESCRIBE"]
    assert "1️⃣" in describe["final_prompt"]  # the described text
    assert describe["image_url"] is None and describe["prompt"] is None  # not the input image
    sent = sim_tasks(simulator)
    assert {"IMAGINE", "UPSCALE", "VARIATION", "DESCRIBE", "BLEND"} <= {t["action"] for t in sent}
    # every callback echoed its URL (properties.notifyHook): no token reached Redis
    tokens = {t["callback_url"].partition("token=")[2].encode() for t in sent}
    assert len(tokens) == len(sent) and all(tokens)
    blob = every_value(r)
    assert b"token=[redacted]" in blob and not any(token in blob for token in tokens)


def test_novicezk_has_no_modes(stack: Stack) -> None:
    receiver, simulator = stack(flavor="novicezk")
    with receiver.client("key-acme") as acme:
        answer = acme.post("/tasks", json={"provider": "mjproxy", "prompt": "x", "mode": "FAST"})
        assert answer.status_code == 400 and "novicezk" in answer.json()["detail"]
        providers = acme.get("/providers").json()["providers"]
    mjproxy = next(p for p in providers if p["name"] == "mjproxy")
    assert mjproxy["modes"] == [] and mjproxy["flavor"] == "novicezk"
    assert sim_stats(simulator)["submitted"] == 0


def test_trueai_custom_zoom_and_vary_region_go_through_the_dialog(stack: Stack) -> None:
    receiver, simulator = stack()
    with receiver.client("key-acme") as acme:
        grid = wait_final(acme, submit(acme, provider="mjproxy", prompt="a red fox")["id"])
        upscaled = wait_final(acme, submit(acme, provider="mjproxy", parent_id=grid["id"],
                                           button="U2")["id"])
        zoom_id = next(b["custom_id"] for b in upscaled["buttons"]
                       if b["custom_id"].startswith("MJ::CustomZoom::"))
        region_id = next(b["custom_id"] for b in upscaled["buttons"]
                         if b["custom_id"].startswith("MJ::Inpaint::"))
        before = sim_stats(simulator)["submitted"]
        # a dialog without its input: 400, nothing sent
        for body in ({"custom_id": zoom_id}, {"custom_id": region_id, "prompt": "snow"}):
            answer = acme.post("/tasks", json={"provider": "mjproxy",
                                               "parent_id": upscaled["id"], **body})
            assert answer.status_code == 400, answer.text
            assert "dialog" in answer.json()["detail"]
        assert sim_stats(simulator)["submitted"] == before
        zoom = wait_final(acme, submit(acme, provider="mjproxy", parent_id=upscaled["id"],
                                       custom_id=zoom_id, prompt="a red fox --zoom 1.5")["id"])
        region = wait_final(acme, submit(acme, provider="mjproxy", parent_id=upscaled["id"],
                                         custom_id=region_id, mask=PNG_DATA_URL)["id"])
    assert zoom["status"] == "SUCCESS" and zoom["action"] == "ZOOM", zoom
    assert region["status"] == "SUCCESS", region
    by_id = {t["id"]: t for t in sim_tasks(simulator)}
    assert by_id[zoom["provider_task_id"]]["modal"]["prompt"] == "a red fox --zoom 1.5"
    assert by_id[region["provider_task_id"]]["modal"]["mask"] == PNG_DATA_URL


@pytest.mark.parametrize("flavor", ["trueai", "novicezk"])
@pytest.mark.parametrize("fault", ["queue_full", "transient_errors"])
def test_queue_full_and_busy_answers_are_retried_then_succeed(
        stack: Stack, flavor: str, fault: str) -> None:
    receiver, simulator = stack(flavor=flavor)
    faults(simulator, **{fault: True if fault == "queue_full" else 1.0})
    with receiver.client("key-acme") as acme:
        job = submit(acme, provider="mjproxy", prompt="a patient fox")["id"]
        time.sleep(1.5)  # refused at least once, and waiting in its place
        assert acme.get(f"/tasks/{job}").json()["status"] == "NOT_START"
        faults(simulator, **{fault: False if fault == "queue_full" else 0.0})
        task = wait_final(acme, job, timeout=40)  # the account's pause is at most 30 s
        metrics = acme.get("/metrics").text
    assert task["status"] == "SUCCESS", task
    assert sim_stats(simulator)["submitted"] == 1
    result = "queue_full" if fault == "queue_full" else "busy"
    assert f'receiver_submissions_total{{provider="mjproxy",result="{result}"}}' in metrics


def test_ohmygpt_blend_of_five_is_a_400_that_reaches_no_provider(stack: Stack) -> None:
    receiver, simulator = stack()
    with receiver.client("key-acme") as acme:
        answer = acme.post("/tasks", json={"provider": "ohmygpt", "action": "BLEND",
                                           "images": [PNG_DATA_URL] * 5})
        assert answer.status_code == 400 and "2 to 4" in answer.json()["detail"]
        blend = wait_final(acme, submit(acme, provider="ohmygpt", action="BLEND",
                                        images=[PNG_DATA_URL] * 4)["id"])
    assert blend["status"] == "SUCCESS", blend
    assert sim_stats(simulator)["submitted"] == 1


def test_an_image_at_an_address_nobody_allowed_is_refused_without_a_connection(
        stack: Stack) -> None:
    accepted: list[int] = []

    async def serve() -> asyncio.AbstractServer:
        return await asyncio.start_server(lambda r, w: accepted.append(1) or w.close(),
                                          "127.0.0.1", 0)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(serve())
    port = server.sockets[0].getsockname()[1]
    receiver, simulator = stack()
    try:
        with receiver.client("key-acme") as acme:
            for url in (f"http://127.0.0.1:{port}/cat.png", f"http://localhost:{port}/cat.png",
                        "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
                answer = acme.post("/tasks", json={"provider": "mjproxy",
                                                   "action": "DESCRIBE", "images": [url]})
                assert answer.status_code == 400, answer.text
                assert answer.json()["error"] == "image_refused"
        loop.run_until_complete(asyncio.sleep(0.1))
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
    assert accepted == []  # not one connection reached it
    assert sim_stats(simulator)["submitted"] == 0


def test_a_refused_key_pauses_the_account_and_the_task_waits(
        redis_server: RedisServer, r: redis.Redis) -> None:
    refused: list[str] = []

    async def provider(request: Request) -> Response:
        refused.append(request.url.path)
        return Response(status_code=401)  # midjourney-proxy's answer to a wrong key

    fake = LiveServer(app=Starlette(routes=[Route("/{path:path}", provider,
                                                  methods=["POST", "GET"])])).start()
    port = free_port()
    receiver = LiveServer(base_settings(
        redis_server.url, public_base_url=f"http://127.0.0.1:{port}", embedded_worker=True,
        accounts={"mjproxy": ProviderAccount("mjproxy", fake.url, Secret("wrong"), 1)}),
        port=port).start()
    try:
        with receiver.client("key-acme") as acme:
            job = submit(acme, provider="mjproxy", prompt="fox")["id"]
            deadline = time.monotonic() + 10
            while not refused:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
            task = acme.get(f"/tasks/{job}").json()
            metrics = acme.get("/metrics").text
    finally:
        receiver.stop()
        fake.stop()
    assert task["status"] == "NOT_START"  # waits in its place: nothing was queued there
    assert 'receiver_submissions_total{provider="mjproxy",result="auth"}' in metrics
    assert len(refused) <= 2  # paused (1 s, doubling), not hammered
