"""The provider simulator over real sockets: a uvicorn serving it, another serving a recorder
that keeps every callback body, both on loopback.

The first half runs every provider through the same lifecycle and faults; the second half
checks, row by row, that each one behaves as its own source says (midjourney-proxy's two
generations, trueai and novicezk, then OhMyGPT and AIGC2D).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.cli.redis_server import free_port
from receiver.core.models import TaskStatus, Update
from receiver.providers.dialects import DIALECTS
from receiver.simulator import (
    AIGC2D_FIRST_ID,
    DESCRIBE_TEXT,
    DESCRIBE_TEXT_CRLF,
    SimulatorConfig,
    create_simulator,
)
from tests.conftest import TIMEOUT, LiveServer

STEP = 0.02
KEY = "sk-test"
IMG = "data:image/png;base64,iVBORw0KGgo="
Json = dict[str, Any]


class Recorder:
    """Keeps every body POSTed to it, by path."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

        async def record(request: Request) -> JSONResponse:
            body = await request.body()
            with self.lock:
                self.bodies.append((request.url.path, body))
            return JSONResponse({"result": "stored"})

        self.served = LiveServer(app=Starlette(routes=[Route("/{path:path}", record,
                                                     methods=["POST"])])).start()

    def hook(self, name: str) -> str:
        return f"{self.served.url}/cb/{name}?token=abc"

    def of(self, name: str) -> list[bytes]:
        with self.lock:
            return [body for path, body in self.bodies if path == f"/cb/{name}"]

    def wait_final(self, provider: str, name: str, timeout: float = 5.0) -> list[bytes]:
        """The bodies of one hook once a terminal state has come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bodies = self.of(name)
            if any(DIALECTS[provider](b).status.terminal for b in bodies):
                time.sleep(5 * STEP)  # let stragglers (duplicates, reordered) land
                return self.of(name)
            time.sleep(STEP)
        raise AssertionError(f"no final callback on {name}: {self.of(name)}")


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.served.stop()


@pytest.fixture
def make_sim() -> Iterator[Callable[..., httpx.Client]]:
    started: list[LiveServer] = []
    clients: list[httpx.Client] = []

    def make(**config: Any) -> httpx.Client:
        config.setdefault("step_interval", STEP)
        config.setdefault("seed", 7)
        served = LiveServer(app=create_simulator(SimulatorConfig(**config))).start()
        started.append(served)
        client = httpx.Client(base_url=served.url, timeout=TIMEOUT)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    for served in started:
        served.stop()


@pytest.fixture
def sim(make_sim: Callable[..., httpx.Client]) -> httpx.Client:
    return make_sim()


# --- one small client per dialect -----------------------------------------------------------

MJ = {"mj-api-secret": KEY}
BEARER = {"Authorization": f"Bearer {KEY}"}
OMG = "/api/v1/ai/draw/mj"


def submit(sim: httpx.Client, provider: str, kind: str, hook: str | None = None,
           **body: Any) -> httpx.Response:
    """POST one submission in the provider's own words (``kind`` as its endpoint names it)."""
    if provider == "mjproxy":
        mode = body.pop("mode", "")
        return sim.post(f"{mode}/mj/submit/{kind}", headers=MJ,
                        json={**body, **({"notifyHook": hook} if hook else {})})
    if provider == "ohmygpt":
        body.setdefault("type", "NORMAL")
        body.setdefault("model", "midjourney")
        return sim.post(f"{OMG}/{kind}", headers=BEARER,
                        json={**body, **({"webhook": hook} if hook else {})})
    return sim.post(f"/mj/{kind}", headers=BEARER,
                    json={**body, **({"callback_url": hook} if hook else {})})


def task_id(provider: str, response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    body = response.json()
    if provider == "mjproxy":
        assert body["code"] == 1 and body["description"] == "提交成功", body
        assert isinstance(body["result"], str)
        return str(body["result"])
    if provider == "ohmygpt":
        assert body["statusCode"] == 200 and isinstance(body["data"], int), body
        return str(body["data"])
    assert body["code"] == 0 and isinstance(body["task_id"], int), body
    return str(body["task_id"])


def poll(sim: httpx.Client, provider: str, tid: str) -> Json:
    """The task object as the provider shows it when asked."""
    if provider == "mjproxy":
        response = sim.get(f"/mj/task/{tid}/fetch", headers=MJ)
    elif provider == "ohmygpt":
        response = sim.post(f"{OMG}/query", headers=BEARER, json={"taskId": int(tid)})
    else:
        response = sim.get(f"/mj/task/{tid}", headers=BEARER)
    assert response.status_code == 200, response.text
    doc: Json = json.loads(response.content)
    return doc["data"] if provider == "ohmygpt" else doc


def unwrap(provider: str, body: bytes) -> Json:
    doc: Json = json.loads(body)
    return doc["data"] if provider == "ohmygpt" and "data" in doc else doc


def imagine(sim: httpx.Client, provider: str, hook: str | None, prompt: str = "a cat",
            **extra: Any) -> str:
    return task_id(provider, submit(sim, provider, "imagine", hook, prompt=prompt, **extra))


def upscale(sim: httpx.Client, provider: str, parent: str, final: Update,
            hook: str | None = None, **extra: Any) -> httpx.Response:
    """Press U1 of ``parent``."""
    if provider == "aigc2d":
        return submit(sim, provider, "upscale", hook, task_id=int(parent), index=1)
    u1 = next(b["custom_id"] for b in final.buttons or [] if b["label"] == "U1")
    if provider == "mjproxy":
        return submit(sim, provider, "action", hook, taskId=parent, customId=u1, **extra)
    return submit(sim, provider, "action", hook, taskId=int(parent), customId=u1, **extra)


def wait_status(sim: httpx.Client, provider: str, tid: str, status: str) -> Json:
    deadline = time.monotonic() + 5
    while (task := poll(sim, provider, tid))["status"] != status:
        assert time.monotonic() < deadline, task
        time.sleep(STEP)
    return task


def refusal(provider: str, response: httpx.Response) -> str:
    """What a refused submission says, in any dialect."""
    body = response.json()
    if provider == "mjproxy":  # 200, or trueai's 404 for an unknown parent (code 3)
        assert response.status_code in (200, 404) and body["code"] != 1, body
        return f"{body['code']} {body['description']}"
    if provider == "ohmygpt":
        assert response.status_code == body["statusCode"] >= 400, body
        return str(body["message"])
    assert response.status_code >= 400 and body["code"] != 0, body
    return str(body["message"])


PROVIDERS = ["mjproxy", "ohmygpt", "aigc2d"]


# --- lifecycles -----------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_imagine_lifecycle_callbacks_parse_in_order_and_poll_agrees(
        sim: httpx.Client, recorder: Recorder, provider: str) -> None:
    name = f"imagine-{provider}"
    tid = imagine(sim, provider, recorder.hook(name))
    bodies = recorder.wait_final(provider, name)
    updates = [DIALECTS[provider](body) for body in bodies]
    assert [(u.status, u.progress) for u in updates] == [
        (TaskStatus.SUBMITTED, 0), *((TaskStatus.IN_PROGRESS, p) for p in (10, 35, 60, 85)),
        (TaskStatus.SUCCESS, 100)]
    assert {u.provider_task_id for u in updates} == {tid}
    assert all(u.image_url for u in updates[1:])  # previews, then the grid
    final = updates[-1]
    assert final.action == "IMAGINE" and final.prompt == "a cat"
    if provider != "aigc2d":
        labels = [b["label"] for b in final.buttons or []]
        assert labels[:4] == ["U1", "U2", "U3", "U4"] and "V4" in labels
    else:
        assert final.cost == {"amount": 100, "unit": "points"}
    assert final.image_url and final.image_url.startswith(str(sim.base_url))
    png = sim.get(final.image_url)
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert poll(sim, provider, tid) == unwrap(provider, bodies[-1])
    if provider == "ohmygpt":  # bare and wrapped in turn
        assert b'"statusCode"' not in bodies[0] and b'"statusCode"' in bodies[1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_upscale_a_button_and_refuse_an_unknown_parent(
        sim: httpx.Client, recorder: Recorder, provider: str) -> None:
    parent = imagine(sim, provider, recorder.hook(f"grid-{provider}"))
    final = DIALECTS[provider](recorder.wait_final(provider, f"grid-{provider}")[-1])
    name = f"up-{provider}"
    child = task_id(provider, upscale(sim, provider, parent, final, recorder.hook(name)))
    last = DIALECTS[provider](recorder.wait_final(provider, name)[-1])
    assert (last.status, last.action, last.provider_task_id) == (
        TaskStatus.SUCCESS, "UPSCALE", child)
    assert last.image_url and sim.get(last.image_url).status_code == 200
    if provider != "aigc2d":  # an upscale offers vary, zoom and pan
        assert any("Outpaint" in b["custom_id"] for b in last.buttons or [])
    unknown = upscale(sim, provider, "12345", final)
    text = refusal(provider, unknown)
    assert "不存在" in text if provider == "mjproxy" else "not found" in text
    if provider == "aigc2d":
        assert unknown.status_code == 404


def test_ohmygpt_refuses_an_action_in_another_mode(
        sim: httpx.Client, recorder: Recorder) -> None:
    parent = imagine(sim, "ohmygpt", recorder.hook("omg-mode"), type="NORMAL")
    final = DIALECTS["ohmygpt"](recorder.wait_final("ohmygpt", "omg-mode")[-1])
    assert final.mode == "NORMAL"
    response = upscale(sim, "ohmygpt", parent, final, type="FAST")
    assert response.status_code == 400 and "mode" in refusal("ohmygpt", response).lower()
    assert upscale(sim, "ohmygpt", parent, final, type="NORMAL").json()["statusCode"] == 200


def test_mjproxy_action_needs_a_finished_parent_and_discord_refuses_a_foreign_button(
        sim: httpx.Client) -> None:
    """trueai checks the parent's status, not its buttons: a custom id the parent does not
    carry is accepted, and Discord refuses it when the task runs (it was a 4 "no button")."""
    sim.post("/_sim/faults", json={"never_finish": True})
    parent = imagine(sim, "mjproxy", None)
    press = {"taskId": parent, "customId": "MJ::JOB::upsample::1::elsewhere"}
    body = submit(sim, "mjproxy", "action", **press).json()
    assert (body["code"], body["description"]) == (4, "关联任务状态错误")
    sim.post("/_sim/faults", json={"never_finish": False})
    wait_status(sim, "mjproxy", parent, "SUCCESS")
    child = task_id("mjproxy", submit(sim, "mjproxy", "action", **press))
    failed = wait_status(sim, "mjproxy", child, "FAILURE")
    assert (failed["failReason"], failed["startTime"]) == ("Invalid Form Body", None)


# Each provider's image fields: mjproxy and OhMyGPT take data URLs in base64 (describe) and
# base64Array (blend); AIGC2D (our assumption) image and images. Blend takes 2 to 5 images,
# OhMyGPT 2 to 4; both relays want the blend's dimensions.
DESCRIBE_FIELD = {"mjproxy": "base64", "ohmygpt": "base64", "aigc2d": "image"}
BLEND_FIELD = {"mjproxy": "base64Array", "ohmygpt": "base64Array", "aigc2d": "images"}
BLEND_MAX = {"mjproxy": 5, "ohmygpt": 4, "aigc2d": 5}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_describe_gives_prompts_and_blend_takes_two_to_its_most(
        sim: httpx.Client, recorder: Recorder, provider: str) -> None:
    tid = task_id(provider, submit(sim, provider, "describe", recorder.hook(f"d-{provider}"),
                                   **{DESCRIBE_FIELD[provider]: IMG}))
    final = DIALECTS[provider](recorder.wait_final(provider, f"d-{provider}")[-1])
    assert (final.status, final.action, final.provider_task_id) == (
        TaskStatus.SUCCESS, "DESCRIBE", tid)
    text = final.final_prompt  # OhMyGPT and AIGC2D answer in "prompt": the dialects move it
    # trueai joins the four prompts with "\r\n" (the others keep Midjourney's blank lines)
    assert text == (DESCRIBE_TEXT_CRLF if provider == "mjproxy" else DESCRIBE_TEXT)
    assert text.startswith("1️⃣ ") and text.count("2️⃣") == 1
    assert final.image_url is None  # (mjproxy's imageUrl is the input: the dialect drops it)

    blend: Json = {"dimensions": "SQUARE"} if provider == "mjproxy" else {}
    tid = task_id(provider, submit(sim, provider, "blend", recorder.hook(f"b-{provider}"),
                                   **{BLEND_FIELD[provider]: [IMG, IMG], **blend}))
    final = DIALECTS[provider](recorder.wait_final(provider, f"b-{provider}")[-1])
    assert (final.status, final.action, final.provider_task_id) == (
        TaskStatus.SUCCESS, "BLEND", tid)
    for count in (1, BLEND_MAX[provider] + 1):
        refused = refusal(provider, submit(sim, provider, "blend",
                                           **{BLEND_FIELD[provider]: [IMG] * count, **blend}))
        assert ("2~5" in refused) if provider == "mjproxy" else (f"not {count}" in refused)


def test_ohmygpt_accepts_form_encoded_bodies(sim: httpx.Client) -> None:
    response = sim.post(f"{OMG}/blend", headers=BEARER,
                        data={"model": "midjourney", "type": "FAST", "base64Array[]": [IMG, IMG]})
    tid = task_id("ohmygpt", response)
    assert wait_status(sim, "ohmygpt", tid, "SUCCESS")["taskType"] == "FAST"


def test_missing_keys_are_refused_in_each_dialect(sim: httpx.Client) -> None:
    for refused in (sim.post("/mj/submit/imagine", json={"prompt": "x"}),
                    sim.get("/mj/task/1/fetch")):  # trueai's SimpleAuthMiddleware
        assert (refused.status_code, refused.text) == (401, "Authorization header missing.")
    omg = sim.post(f"{OMG}/imagine", json={"prompt": "x", "type": "FAST"})
    assert omg.status_code == 401 and omg.json()["statusCode"] == 401
    a2d = sim.post("/mj/imagine", json={"prompt": "x"}, headers={"Authorization": "Bearer"})
    assert a2d.status_code == 401 and a2d.json()["code"] == 401
    unknown = sim.get("/mj/task/9/fetch", headers=MJ)  # trueai: a null TaskInfo is a 204
    assert (unknown.status_code, unknown.content) == (204, b"")
    assert sim.get("/mj/task/9", headers=BEARER).status_code == 404


def test_mjproxy_records_mode_and_account(sim: httpx.Client) -> None:
    """trueai takes the whole Authorization value as the key: "Bearer other" is recorded as
    sent (it used to be stripped to "other")."""
    imagine(sim, "mjproxy", None, mode="/mj-relax")
    sim.post("/mj-fast/mj/submit/imagine", json={"prompt": "x"},
             headers={"Authorization": "Bearer other"})
    imagine(sim, "ohmygpt", None, type="FAST")
    stats = sim.get("/_sim/stats").json()
    assert stats["by_mode"] == {"mjproxy": {"RELAX": 1, "FAST": 1}, "ohmygpt": {"FAST": 1}}
    assert stats["submitted"] == 3 and stats["max_in_flight"] == {KEY: 2, "Bearer other": 1}
    assert stats["by_route"] == {"mjproxy": {"imagine": 2}, "ohmygpt": {"imagine": 1}}
    tasks = sim.get("/_sim/tasks").json()["tasks"]
    assert {t["account"] for t in tasks} == {KEY, "Bearer other"}


# --- faults -----------------------------------------------------------------------------------


def test_dropped_callbacks_the_task_still_finishes(sim: httpx.Client, recorder: Recorder) -> None:
    assert sim.post("/_sim/faults", json={"drop_callbacks": 1}).json()["drop_callbacks"] == 1
    tid = imagine(sim, "mjproxy", recorder.hook("dropped"))
    wait_status(sim, "mjproxy", tid, "SUCCESS")
    time.sleep(5 * STEP)
    assert recorder.of("dropped") == []
    stats = sim.get("/_sim/stats").json()
    assert stats["callbacks_dropped"] == 6 and stats["callbacks_sent"] == 0
    assert stats["in_flight"] == {KEY: 0}


def test_duplicated_callbacks_come_twice(sim: httpx.Client, recorder: Recorder) -> None:
    sim.post("/_sim/faults", json={"duplicate_callbacks": 1})
    imagine(sim, "aigc2d", recorder.hook("dup"))
    bodies = recorder.wait_final("aigc2d", "dup")
    assert len(bodies) == 12 and bodies[::2] == bodies[1::2]


def test_reordered_callbacks_all_arrive_out_of_order(sim: httpx.Client, recorder: Recorder) -> None:
    sim.post("/_sim/faults", json={"reorder_callbacks": True})
    imagine(sim, "mjproxy", recorder.hook("reorder"))
    recorder.wait_final("mjproxy", "reorder")
    time.sleep(10 * STEP)
    progress = [DIALECTS["mjproxy"](b).progress for b in recorder.of("reorder")]
    assert progress == [10, 0, 60, 35, 100, 85]


def test_delayed_callbacks(sim: httpx.Client, recorder: Recorder) -> None:
    sim.post("/_sim/faults", json={"delay_callbacks": 0.8})
    tid = imagine(sim, "mjproxy", recorder.hook("late"))
    wait_status(sim, "mjproxy", tid, "SUCCESS")
    assert recorder.of("late") == []  # the task ran in ~0.1 s; nothing before 0.8 s
    assert len(recorder.wait_final("mjproxy", "late")) == 6


def test_a_stripped_callback_url_means_no_callbacks(sim: httpx.Client, recorder: Recorder) -> None:
    sim.post("/_sim/faults", json={"strip_callback_url": True})
    tid = imagine(sim, "ohmygpt", recorder.hook("stripped"))
    assert wait_status(sim, "ohmygpt", tid, "SUCCESS")["webhookUrl"] is None
    time.sleep(5 * STEP)
    assert recorder.of("stripped") == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_queue_full_fault(sim: httpx.Client, provider: str) -> None:
    sim.post("/_sim/faults", json={"queue_full": True})
    response = submit(sim, provider, "imagine", prompt="a cat")
    text = refusal(provider, response)
    if provider == "mjproxy":  # trueai: code 9 with "队列已满" (its 23 is unused)
        assert text == "9 提交失败，队列已满，请稍后重试"  # noqa: RUF001
    else:
        assert "queue" in text.lower()
    if provider != "mjproxy":
        assert response.status_code == 429


@pytest.mark.parametrize("provider", PROVIDERS)
def test_submit_errors(sim: httpx.Client, provider: str) -> None:
    sim.post("/_sim/faults", json={"submit_error_rate": 1})
    assert submit(sim, provider, "imagine", prompt="a cat").status_code == 500
    assert sim.get("/_sim/stats").json()["submitted"] == 0


@pytest.mark.parametrize("provider", ["ohmygpt", "aigc2d"])
def test_banned_word_is_refused_and_named(sim: httpx.Client, provider: str) -> None:
    """(midjourney-proxy: novicezk refuses with 24, trueai accepts then fails: below.)"""
    response = submit(sim, provider, "imagine", prompt="a Banned cat")
    assert response.status_code == 400 and '"banned"' in refusal(provider, response)
    assert task_id(provider, submit(sim, provider, "imagine", prompt="unbannedish cat"))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_failing_tasks_end_in_failure_with_a_reason(
        sim: httpx.Client, recorder: Recorder, provider: str) -> None:
    sim.post("/_sim/faults", json={"fail_tasks": 1})
    imagine(sim, provider, recorder.hook(f"fail-{provider}"))
    bodies = recorder.wait_final(provider, f"fail-{provider}")
    final = DIALECTS[provider](bodies[-1])
    assert final.status is TaskStatus.FAILURE and final.fail_reason
    assert [DIALECTS[provider](b).status for b in bodies[:-1]] == [
        TaskStatus.SUBMITTED, TaskStatus.IN_PROGRESS, TaskStatus.IN_PROGRESS]
    if provider == "aigc2d":  # the points come back
        doc = json.loads(bodies[-1])
        assert (doc["point"], doc["refund_point"]) == (0, 100)


def test_never_finish_holds_tasks_in_progress_until_cleared(
        sim: httpx.Client, recorder: Recorder) -> None:
    sim.post("/_sim/faults", json={"never_finish": True})
    tid = imagine(sim, "mjproxy", recorder.hook("stuck"))
    time.sleep(20 * STEP)
    task = poll(sim, "mjproxy", tid)
    assert (task["status"], task["progress"]) == ("IN_PROGRESS", "10%")
    assert sim.get("/_sim/stats").json()["in_flight"] == {KEY: 1}
    sim.post("/_sim/faults", json={"never_finish": False})
    assert len(recorder.wait_final("mjproxy", "stuck")) == 6


def test_slow_stretches_the_steps(sim: httpx.Client) -> None:
    sim.post("/_sim/faults", json={"slow": 20})
    tid = imagine(sim, "aigc2d", None)
    time.sleep(10 * STEP)
    assert poll(sim, "aigc2d", tid)["status"] == "SUBMITTED"


def test_queue_limit_refuses_the_third_unfinished_task(
        make_sim: Callable[..., httpx.Client]) -> None:
    sim = make_sim(queue_limit=2, step_interval=0.2)
    first, _ = (imagine(sim, "ohmygpt", None) for _ in range(2))
    third = submit(sim, "ohmygpt", "imagine", prompt="a cat", type="NORMAL")
    assert third.status_code == 429 and "queue" in refusal("ohmygpt", third).lower()
    wait_status(sim, "ohmygpt", first, "SUCCESS")
    imagine(sim, "ohmygpt", None)  # a slot came free
    stats = sim.get("/_sim/stats").json()
    assert stats["max_in_flight"] == {KEY: 2} and stats["submitted"] == 3


def test_faults_are_validated_listed_and_reset(sim: httpx.Client) -> None:
    assert sim.post("/_sim/faults", json={"drop_callbacks": 2}).status_code == 400
    assert sim.post("/_sim/faults", json={"nope": True}).status_code == 400
    assert sim.post("/_sim/faults", json={"queue_full": 1}).status_code == 400
    imagine(sim, "aigc2d", None)
    sim.post("/_sim/faults", json={"queue_full": True, "slow": 2})
    assert sim.get("/_sim/faults").json()["queue_full"] is True
    reset = sim.post("/_sim/reset").json()
    assert reset["submitted"] == 0 and reset["in_flight"] == {}
    assert sim.get("/_sim/faults").json() == {
        "drop_callbacks": 0.0, "duplicate_callbacks": 0.0, "reorder_callbacks": False,
        "delay_callbacks": 0.0, "strip_callback_url": False, "submit_error_rate": 0.0,
        "queue_full": False, "fail_tasks": 0.0, "never_finish": False, "slow": 1.0,
        "empty_polls": False, "submit_delay": 0.0, "queue_wait": 0.0,
        "transient_errors": 0.0, "rate_limited": False, "logic_error": False,
        "ip_blacklisted": False, "resend_unchanged": 0.0, "expire_images": False}
    assert sim.post("/_sim/faults", json={"resend_unchanged": 1.5}).status_code == 400
    assert sim.post("/_sim/faults", json={"rate_limited": "yes"}).status_code == 400


def test_aigc2d_ids_past_2_53_stay_exact(sim: httpx.Client, recorder: Recorder) -> None:
    response = submit(sim, "aigc2d", "imagine", recorder.hook("big"), prompt="a cat")
    tid = int(task_id("aigc2d", response))
    assert tid >= AIGC2D_FIRST_ID > 2**53
    assert f'"task_id":{tid}' in response.text  # a JSON integer, not a float or a string
    bodies = recorder.wait_final("aigc2d", "big")
    assert all(json.loads(b)["task_id"] == tid for b in bodies)
    assert DIALECTS["aigc2d"](bodies[-1]).provider_task_id == str(tid)
    second = int(task_id("aigc2d", submit(sim, "aigc2d", "imagine", prompt="a dog")))
    assert second == tid + 1
    assert poll(sim, "aigc2d", str(tid))["task_id"] == tid


@pytest.mark.parametrize("flavor", ["trueai", "novicezk"])
def test_receiver_simulate_serves_the_providers(tmp_path: Path, flavor: str) -> None:
    port = free_port()
    log = (tmp_path / "simulate.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "simulate", "--port", str(port),
         "--step-interval", "0.01", "--mjproxy-flavor", flavor],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.get("/_sim/stats")
                    break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline, \
                        (tmp_path / "simulate.log").read_text()
                    time.sleep(0.05)
            stats = client.get("/_sim/stats").json()
            assert stats["mjproxy_flavor"] == flavor
            if flavor == "novicezk":  # no mode prefixes, no buttons
                assert client.post("/mj-turbo/mj/submit/imagine", headers=MJ,
                                   json={"prompt": "x"}).status_code == 404
                tid = imagine(client, "mjproxy", None)
                assert "buttons" not in wait_status(client, "mjproxy", tid, "SUCCESS")
                return
            tid = imagine(client, "mjproxy", None, mode="/mj-turbo")
            assert wait_status(client, "mjproxy", tid, "SUCCESS")["buttons"]
            assert client.get("/_sim/stats").json()["by_mode"] == {"mjproxy": {"TURBO": 1}}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# --- midjourney-proxy, row by row: novicezk and trueai ----------------------------------------

URL_IMAGE = "https://example.com/a.png"
LOGIC = "服务暂不可用，请联系管理员"  # noqa: RUF001 (trueai's words)


def mj(sim: httpx.Client, path: str, headers: dict[str, str] | None = None,
       **body: Any) -> httpx.Response:
    return sim.post(path, headers=MJ if headers is None else headers, json=body)


def code(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    return body["code"], body["description"]


def states(bodies: list[bytes]) -> list[tuple[str, str | None]]:
    return [(d["status"], d["progress"]) for d in map(json.loads, bodies)]


def novicezk(make_sim: Callable[..., httpx.Client], **config: Any) -> httpx.Client:
    return make_sim(mjproxy_flavor="novicezk", **config)


def test_novicezk_routes_auth_and_unknown_tasks(make_sim: Callable[..., httpx.Client]) -> None:
    sim = novicezk(make_sim)
    tid = task_id("mjproxy", mj(sim, "/mj/submit/imagine", prompt="a cat"))
    assert mj(sim, "/mj-fast/mj/submit/imagine", prompt="x").status_code == 404  # no modes
    for kind in ("action", "modal"):  # Spring's 404 body: no such route in the open source
        missing = mj(sim, f"/mj/submit/{kind}", taskId=tid, customId="x")
        assert missing.status_code == 404 and missing.json()["status"] == 404
    assert sim.post(f"/mj/task/{tid}/cancel", headers=MJ).status_code == 404
    # mj-api-secret only: Authorization, raw or Bearer, is no key; 401 with no body at all
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}"}):
        refused = mj(sim, "/mj/submit/imagine", headers=headers, prompt="x")
        assert (refused.status_code, refused.content) == (401, b"")
    assert sim.get(f"/mj/task/{tid}/fetch").status_code == 401
    unknown = sim.get("/mj/task/4242/fetch", headers=MJ)
    assert (unknown.status_code, unknown.content) == (200, b"")  # its fetch returns null
    wait_status(sim, "mjproxy", tid, "SUCCESS")
    listed = mj(sim, "/mj/task/list-by-condition", ids=[tid, "4242"])
    assert [t["id"] for t in listed.json()] == [tid] and "buttons" not in listed.json()[0]
    assert len(tid) == 16 and tid.isdigit()
    sim.post("/_sim/faults", json={"empty_polls": True})  # the relay has forgotten it
    forgotten = sim.get(f"/mj/task/{tid}/fetch", headers=MJ)
    assert (forgotten.status_code, forgotten.content) == (200, b"")
    assert mj(sim, "/mj/task/list-by-condition", ids=[tid]).json() == []


def test_novicezk_callbacks_are_the_whole_task_nulls_written_no_buttons(
        make_sim: Callable[..., httpx.Client], recorder: Recorder) -> None:
    sim = novicezk(make_sim)
    hook = recorder.hook("nz-shape")
    tid = task_id("mjproxy", mj(sim, "/mj/submit/imagine", prompt="一只猫 a cat",
                                notifyHook=hook, state="s1"))
    bodies = recorder.wait_final("mjproxy", "nz-shape")
    # SUBMITTED 0%, the start message (IN_PROGRESS, still 0%), the progress, SUCCESS
    assert states(bodies) == [("SUBMITTED", "0%"), ("IN_PROGRESS", "0%"), *(
        ("IN_PROGRESS", f"{p}%") for p in (10, 35, 60, 85)), ("SUCCESS", "100%")]
    docs = [json.loads(b) for b in bodies]
    assert set(docs[0]) == {"id", "properties", "action", "status", "prompt", "promptEn",
                            "description", "state", "submitTime", "startTime", "finishTime",
                            "imageUrl", "progress", "failReason"}  # no buttons key, ever
    assert all(set(d) == set(docs[0]) for d in docs)
    first = docs[0]
    assert first["startTime"] is not None  # set already at SUBMITTED
    assert (first["finishTime"], first["imageUrl"], first["failReason"]) == (None, None, None)
    assert b'"failReason":null' in bodies[0]  # nulls are written
    assert "一只猫".encode() in bodies[0] and b"\\u" not in bodies[0]  # raw UTF-8
    assert all(d["properties"]["notifyHook"] == hook for d in docs)
    assert {d["id"] for d in docs} == {tid} and docs[-1]["state"] == "s1"
    last = docs[-1]["properties"]
    assert last["messageId"] and last["messageHash"] and last["flags"] == 0
    assert last["finalPrompt"] == "一只猫 a cat" and last["nonce"] and last["discordInstanceId"]


def test_novicezk_change_and_simple_change_with_the_sources_checks(
        make_sim: Callable[..., httpx.Client]) -> None:
    sim = novicezk(make_sim)
    grid = imagine(sim, "mjproxy", None)
    wait_status(sim, "mjproxy", grid, "SUCCESS")
    up = task_id("mjproxy", mj(sim, "/mj/submit/change", taskId=grid, action="UPSCALE",
                               index=1))
    again = mj(sim, "/mj/submit/change", taskId=grid, action="UPSCALE", index=1).json()
    assert (again["code"], again["description"], again["result"]) == (21, "任务已存在", up)
    assert set(again["properties"]) == {"status", "imageUrl"}
    done = wait_status(sim, "mjproxy", up, "SUCCESS")
    assert (done["action"], done["description"]) == ("UPSCALE", f"/up {grid} U1")
    variation = task_id("mjproxy", mj(sim, "/mj/submit/simple-change", content=f"{grid} V2"))
    reroll = task_id("mjproxy", mj(sim, "/mj/submit/simple-change", content=f"{grid} R"))
    assert wait_status(sim, "mjproxy", variation, "SUCCESS")["action"] == "VARIATION"
    assert wait_status(sim, "mjproxy", reroll, "SUCCESS")["action"] == "REROLL"
    # a reroll's grid is a parent too (the latest source: IMAGINE, VARIATION, REROLL, BLEND)
    assert task_id("mjproxy", mj(sim, "/mj/submit/change", taskId=reroll, action="VARIATION",
                                 index=3))
    unknown = mj(sim, "/mj/submit/change", taskId="4242", action="VARIATION", index=1)
    assert unknown.status_code == 200 and code(unknown) == (3, "关联任务不存在或已失效")
    assert code(mj(sim, "/mj/submit/change", taskId=up, action="VARIATION", index=1)) == (
        4, "关联任务不允许执行变化")
    assert code(mj(sim, "/mj/submit/simple-change", content=f"{grid} X9")) == (
        4, "content参数错误")
    assert code(mj(sim, "/mj/submit/change", taskId=grid, action="IMAGINE")) == (
        4, "action参数错误")
    assert mj(sim, "/mj/submit/change", taskId=grid, action="ZOOM").status_code == 400
    sim.post("/_sim/faults", json={"never_finish": True})
    pending = imagine(sim, "mjproxy", None, prompt="a dog")
    assert code(mj(sim, "/mj/submit/change", taskId=pending, action="UPSCALE", index=2)) == (
        4, "关联任务状态错误")
    sim.post("/_sim/faults", json={"never_finish": False})
    by_route = sim.get("/_sim/stats").json()["by_route"]["mjproxy"]
    assert by_route["change"] == 8 and by_route["simple-change"] == 3


def test_novicezk_from_2_6_2_submits_the_same_upscale_again(
        make_sim: Callable[..., httpx.Client]) -> None:
    sim = novicezk(make_sim, novicezk_upscale_exists=False)
    grid = imagine(sim, "mjproxy", None)
    wait_status(sim, "mjproxy", grid, "SUCCESS")
    ids = {task_id("mjproxy", mj(sim, "/mj/submit/change", taskId=grid, action="UPSCALE",
                                 index=1)) for _ in range(2)}
    assert len(ids) == 2


@pytest.mark.parametrize(("flavor", "full"), [
    ("novicezk", (23, "队列已满，请稍后尝试")),  # noqa: RUF001
    ("trueai", (9, "提交失败，队列已满，请稍后重试"))])  # noqa: RUF001
def test_mjproxy_queues_past_its_concurrency_then_is_full(
        make_sim: Callable[..., httpx.Client], flavor: str, full: tuple[int, str]) -> None:
    sim = make_sim(mjproxy_flavor=flavor, queue_limit=1, mjproxy_queue_size=2,
                   step_interval=0.05)
    answers = [mj(sim, "/mj/submit/imagine", prompt=f"cat {n}") for n in range(4)]
    # the relay reads its queue before adding: empty for the 2nd, though it waits
    assert [code(a)[0] for a in answers[:2]] == [1, 1]
    third = answers[2].json()
    assert (third["code"], third["description"]) == (22, "排队中，前面还有1个任务")  # noqa: RUF001
    assert third["properties"]["numberOfQueues"] == 1
    assert code(answers[3]) == full
    waiting = poll(sim, "mjproxy", answers[1].json()["result"])
    assert (waiting["status"], waiting["startTime"], waiting["progress"]) == (
        "NOT_START", None, None)
    assert sim.get("/_sim/stats").json()["waiting"] == {KEY: 2}
    last = wait_status(sim, "mjproxy", third["result"], "SUCCESS")  # accepted and queued: runs
    assert last["startTime"] >= poll(sim, "mjproxy", answers[1].json()["result"])["finishTime"]
    stats = sim.get("/_sim/stats").json()
    assert (stats["answered_queued"], stats["max_in_flight"], stats["in_flight"]) == (
        1, {KEY: 3}, {KEY: 0})


@pytest.mark.parametrize("flavor", ["novicezk", "trueai"])
def test_mjproxy_takes_data_urls_only(make_sim: Callable[..., httpx.Client], flavor: str) -> None:
    sim = make_sim(mjproxy_flavor=flavor)
    for kind, body in (("imagine", {"prompt": "x", "base64Array": [URL_IMAGE]}),
                       ("describe", {"base64": URL_IMAGE}),
                       ("blend", {"base64Array": [IMG, URL_IMAGE], "dimensions": "SQUARE"})):
        assert code(mj(sim, f"/mj/submit/{kind}", **body)) == (4, "base64格式错误")
    assert code(mj(sim, "/mj/submit/blend", base64Array=[IMG, IMG])) == (4, "dimensions参数错误")
    tid = task_id("mjproxy", mj(sim, "/mj/submit/imagine", prompt="a cat", base64Array=[IMG],
                                base64=IMG))
    [task] = sim.get("/_sim/tasks").json()["tasks"]
    # novicezk reads base64 too; trueai's DTO has no such field (ignored). Uploaded images
    # are named in the prompt, as both relays do.
    assert task["images"] == (2 if flavor == "novicezk" else 1)
    assert poll(sim, "mjproxy", tid)["prompt"].endswith(".png a cat")
    if flavor == "novicezk":
        assert code(mj(sim, "/mj/submit/imagine", prompt="x", base64=URL_IMAGE)) == (
            4, "base64格式错误")


@pytest.mark.parametrize("flavor", ["novicezk", "trueai"])
def test_mjproxy_transient_errors_alternate_3_and_9(
        make_sim: Callable[..., httpx.Client], flavor: str) -> None:
    sim = make_sim(mjproxy_flavor=flavor)
    sim.post("/_sim/faults", json={"transient_errors": 1})
    assert [code(mj(sim, "/mj/submit/imagine", prompt="x")) for _ in range(3)] == [
        (3, "无可用的账号实例"), (9, "提交失败，系统异常"), (3, "无可用的账号实例")]  # noqa: RUF001
    assert sim.get("/_sim/stats").json()["submitted"] == 0


@pytest.mark.parametrize("flavor", ["novicezk", "trueai"])
def test_novicezk_resends_unchanged_states_and_trueai_never(
        make_sim: Callable[..., httpx.Client], recorder: Recorder, flavor: str) -> None:
    sim = make_sim(mjproxy_flavor=flavor)
    sim.post("/_sim/faults", json={"resend_unchanged": 1})
    imagine(sim, "mjproxy", recorder.hook(f"resend-{flavor}"))
    seen = states(recorder.wait_final("mjproxy", f"resend-{flavor}"))
    if flavor == "novicezk":  # its notify pool skips only older states
        assert len(seen) == 14 and seen[::2] == seen[1::2]
    else:  # trueai's skips equal ones too
        assert len(seen) == 6 and len(set(seen)) == 6


@pytest.mark.parametrize("flavor", ["novicezk", "trueai"])
def test_mjproxy_describe_gives_the_text_and_the_input_image(
        make_sim: Callable[..., httpx.Client], recorder: Recorder, flavor: str) -> None:
    sim = make_sim(mjproxy_flavor=flavor)
    name = f"describe-{flavor}"
    tid = task_id("mjproxy", mj(sim, "/mj/submit/describe", base64=IMG,
                                notifyHook=recorder.hook(name)))
    final = json.loads(recorder.wait_final("mjproxy", name)[-1])
    assert final["imageUrl"] == f"{sim.base_url}/images/input-{tid}.png"  # the input image
    assert sim.get(final["imageUrl"]).content.startswith(b"\x89PNG")
    if flavor == "novicezk":
        assert final["prompt"] == final["promptEn"] == DESCRIBE_TEXT
        assert final["properties"]["finalPrompt"] == DESCRIBE_TEXT
        assert final["description"] == f"/describe {tid}.png"
        return
    assert final["prompt"] is None and final["promptEn"] == DESCRIBE_TEXT_CRLF
    assert final["properties"]["finalPrompt"] == DESCRIBE_TEXT_CRLF
    assert [b["customId"] for b in final["buttons"]][-1] == "MJ::Picread::Retry"
    linked = task_id("mjproxy", mj(sim, "/mj/submit/describe", link=URL_IMAGE))
    assert wait_status(sim, "mjproxy", linked, "SUCCESS")["imageUrl"] == URL_IMAGE
    assert code(mj(sim, "/mj/submit/describe", link="ftp://example.com/a.png")) == (
        4, "链接格式错误")
    assert code(mj(sim, "/mj/submit/describe")) == (4, "base64或link不能为空")


def upscaled(sim: httpx.Client, prompt: str = "a cat") -> tuple[str, Json]:
    """A trueai grid's U1, finished: (its id, its task)."""
    grid = imagine(sim, "mjproxy", None, prompt=prompt)
    u1 = next(b["customId"] for b in wait_status(sim, "mjproxy", grid, "SUCCESS")["buttons"]
              if b["label"] == "U1")
    up = task_id("mjproxy", mj(sim, "/mj/submit/action", taskId=grid, customId=u1))
    return up, wait_status(sim, "mjproxy", up, "SUCCESS")


def test_trueai_routes_prefixes_and_unknown_tasks(sim: httpx.Client) -> None:
    tid = imagine(sim, "mjproxy", None, mode="/mj-relax")
    for kind in ("change", "simple-change"):  # novicezk's; not trueai's
        missing = mj(sim, f"/mj/submit/{kind}", taskId=tid, action="UPSCALE", index=1)
        assert (missing.status_code, missing.content) == (404, b"")
    assert sim.get(f"/mj-turbo/mj/task/{tid}/fetch", headers=MJ).json()["mode"] == "RELAX"
    wait_status(sim, "mjproxy", tid, "SUCCESS")
    for route in ("list-by-condition", "list-by-ids"):
        listed = mj(sim, f"/mj/task/{route}", ids=[f" {tid} ", "4242"]).json()
        assert [t["id"] for t in listed] == [tid] and listed[0]["buttons"]
    sim.post("/_sim/faults", json={"empty_polls": True})  # forgotten: 204, left out of lists
    forgotten = sim.get(f"/mj/task/{tid}/fetch", headers=MJ)
    assert (forgotten.status_code, forgotten.content) == (204, b"")
    assert mj(sim, "/mj/task/list-by-condition", ids=[tid]).json() == []
    # the whole Authorization value is the key; it wins over mj-api-secret
    mj(sim, "/mj/submit/imagine", headers={"Authorization": "raw-key", **MJ}, prompt="x")
    assert sim.get("/_sim/tasks").json()["tasks"][-1]["account"] == "raw-key"


def test_trueai_custom_zoom_waits_in_modal_then_runs_with_callbacks(
        sim: httpx.Client, recorder: Recorder) -> None:
    up, task = upscaled(sim)
    buttons = {b["label"]: b["customId"] for b in task["buttons"]}
    assert buttons["Custom Zoom"].startswith("MJ::CustomZoom::")
    assert buttons["Vary (Region)"].startswith("MJ::Inpaint::1::")
    hook = recorder.hook("zoom")
    parked = mj(sim, "/mj/submit/action", taskId=up, customId=buttons["Custom Zoom"],
                notifyHook=hook).json()
    assert (parked["code"], parked["description"]) == (21, "Waiting for window confirm")
    assert parked["properties"] == {"finalPrompt": "a cat", "remix": True}
    zoom = parked["result"]
    assert poll(sim, "mjproxy", zoom)["status"] == "MODAL"
    time.sleep(5 * STEP)
    assert recorder.of("zoom") == []  # MODAL is never sent
    confirmed = mj(sim, "/mj/submit/modal", taskId=zoom, prompt="a cat --zoom 1.8").json()
    assert (confirmed["code"], confirmed["result"]) == (1, zoom)
    bodies = recorder.wait_final("mjproxy", "zoom")
    assert [s for s, _ in states(bodies)] == ["SUBMITTED", *["IN_PROGRESS"] * 4, "SUCCESS"]
    final = json.loads(bodies[-1])
    assert (final["action"], final["parentId"], final["prompt"]) == (
        "ZOOM", up, "a cat --zoom 1.8")
    [record] = [t for t in sim.get("/_sim/tasks").json()["tasks"] if t["id"] == zoom]
    assert record["modal"] == {"prompt": "a cat --zoom 1.8", "mask": None}
    assert sim.get("/_sim/stats").json()["by_route"]["mjproxy"]["modal"] == 1


def test_trueai_vary_region_needs_a_mask_and_a_remix_waits_too(sim: httpx.Client) -> None:
    up, task = upscaled(sim)
    region = next(b["customId"] for b in task["buttons"] if b["label"] == "Vary (Region)")
    parked = mj(sim, "/mj/submit/action", taskId=up, customId=region).json()
    assert parked["code"] == 21 and parked["properties"]["finalPrompt"] == ""
    assert code(mj(sim, "/mj/submit/modal", taskId=parked["result"], prompt="a hat")) == (
        4, "maskBase64不能为空")
    # no prompt: the parent's, as the source falls back ("兼容 rix api")
    assert code(mj(sim, "/mj/submit/modal", taskId=parked["result"], maskBase64=IMG))[0] == 1
    done = wait_status(sim, "mjproxy", parked["result"], "SUCCESS")
    assert (done["action"], done["prompt"]) == ("VARIATION", "a cat")
    [record] = [t for t in sim.get("/_sim/tasks").json()["tasks"]
                if t["id"] == parked["result"]]
    assert record["modal"] == {"prompt": "a cat", "mask": IMG}
    grid = task["parentId"]
    v1 = next(b["customId"] for b in poll(sim, "mjproxy", grid)["buttons"] if b["label"] == "V1")
    remix = mj(sim, "/mj/submit/action", taskId=grid, customId=v1, enableRemix=True).json()
    assert remix["code"] == 21
    mj(sim, "/mj/submit/modal", taskId=remix["result"], prompt="a cat in a hat")
    assert wait_status(sim, "mjproxy", remix["result"], "SUCCESS")["action"] == "VARIATION"
    unknown = mj(sim, "/mj/submit/modal", taskId="4242", prompt="x")
    assert unknown.status_code == 404 and code(unknown) == (3, "关联任务不存在或已失效")
    # a reroll repeats its parent's action: an IMAGINE here
    reroll = next(b["customId"] for b in poll(sim, "mjproxy", grid)["buttons"]
                  if b["customId"].startswith("MJ::JOB::reroll::"))
    again = task_id("mjproxy", mj(sim, "/mj/submit/action", taskId=grid, customId=reroll))
    assert wait_status(sim, "mjproxy", again, "SUCCESS")["action"] == "IMAGINE"


def test_trueai_cancel_fails_the_task_without_a_callback(
        sim: httpx.Client, recorder: Recorder) -> None:
    sim.post("/_sim/faults", json={"never_finish": True})
    tid = imagine(sim, "mjproxy", recorder.hook("cancel"))
    wait_status(sim, "mjproxy", tid, "IN_PROGRESS")
    cancelled = sim.post(f"/mj-fast/mj/task/{tid}/cancel", headers=MJ)
    assert (cancelled.status_code, cancelled.content) == (200, b"")
    task = poll(sim, "mjproxy", tid)
    assert (task["status"], task["failReason"], task["isCompleted"]) == (
        "FAILURE", "取消任务", True)
    sim.post("/_sim/faults", json={"never_finish": False})
    time.sleep(10 * STEP)
    assert "FAILURE" not in {s for s, _ in states(recorder.of("cancel"))}
    assert poll(sim, "mjproxy", tid)["status"] == "FAILURE"  # and it stays cancelled
    assert sim.post("/mj/task/4242/cancel", headers=MJ).status_code == 200
    stats = sim.get("/_sim/stats").json()
    assert (stats["cancelled"], stats["in_flight"]) == (1, {KEY: 0})
    assert stats["by_route"]["mjproxy"]["cancel"] == 2


def test_trueai_action_refusals(sim: httpx.Client) -> None:
    unknown = mj(sim, "/mj/submit/action", taskId="4242", customId="MJ::JOB::upsample::1::h")
    assert unknown.status_code == 404  # NotFound(SubmitResultVO), not a 200
    assert unknown.json() == {"code": 3, "description": "关联任务不存在或已失效",
                              "result": None, "properties": {}}
    assert code(mj(sim, "/mj/submit/action", taskId="4242")) == (4, "参数错误")
    grid = imagine(sim, "mjproxy", None)
    wait_status(sim, "mjproxy", grid, "SUCCESS")
    assert code(mj(sim, "/mj/submit/action", taskId=grid, customId="MJ::Nope::1")) == (
        4, "未知的 Action 类型")


def test_trueai_filters_and_logic_exceptions(sim: httpx.Client) -> None:
    for fault, status in (("rate_limited", 429), ("ip_blacklisted", 403)):
        sim.post("/_sim/faults", json={fault: True})
        for response in (mj(sim, "/mj/submit/imagine", prompt="x"),
                         sim.get("/mj/task/1/fetch", headers=MJ)):
            assert (response.status_code, response.content) == (status, b"")
        sim.post("/_sim/faults", json={fault: False})
    sim.post("/_sim/faults", json={"logic_error": True})
    # Imagine() catches the LogicException (code 4); elsewhere its filter answers
    assert code(mj(sim, "/mj/submit/imagine", prompt="x")) == (4, LOGIC)
    for kind, body in (("describe", {"base64": IMG}),
                       ("blend", {"base64Array": [IMG, IMG], "dimensions": "SQUARE"})):
        answer = mj(sim, f"/mj/submit/{kind}", **body)
        doc = answer.json()
        assert answer.status_code == 200 and "description" not in doc
        assert (doc["success"], doc["code"], doc["message"]) == (False, -1, LOGIC)
        assert doc["timestamp"].isdigit()
    assert sim.get("/_sim/stats").json()["submitted"] == 0


def test_trueai_accepts_a_banned_prompt_then_fails_it(
        sim: httpx.Client, recorder: Recorder) -> None:
    tid = imagine(sim, "mjproxy", recorder.hook("banned"), prompt="a Banned cat")
    bodies = recorder.wait_final("mjproxy", "banned")
    assert states(bodies) == [("FAILURE", "")]  # straight from the queue: no SUBMITTED
    task = poll(sim, "mjproxy", tid)
    assert task["failReason"] == "可能包含敏感词" and b"bannedWord" not in bodies[0]  # no word


def test_trueai_callbacks_escape_and_carry_its_extra_fields(
        sim: httpx.Client, recorder: Recorder) -> None:
    hook = recorder.hook("ta-shape")
    tid = imagine(sim, "mjproxy", hook, prompt="一只猫 & <b>")
    bodies = recorder.wait_final("mjproxy", "ta-shape")
    assert all(body.isascii() for body in bodies)  # System.Text.Json escapes non-ASCII...
    assert b"\\u4E00\\u53EA\\u732B \\u0026 \\u003Cb\\u003E" in bodies[0]  # ...and <>&
    seen = states(bodies)
    assert len(set(seen)) == len(seen) == 6  # no state sent twice
    first, final = json.loads(bodies[0]), json.loads(bodies[-1])
    assert (first["status"], first["progress"], first["isCompleted"]) == ("SUBMITTED", "0%", False)
    assert first["startTime"] is not None and first["prompt"] == "一只猫 & <b>"
    for key in ("buttons", "imageUrls", "parentId", "botType", "instanceId", "isCompleted",
                "displays", "useTime", "promptFull", "jobId", "messageIds", "mode", "nonce",
                "accountFilter", "isDiscord", "thumbnailUrl", "properties"):
        assert key in final, key
    assert (final["id"], final["isCompleted"], final["botType"]) == (tid, True, "MID_JOURNEY")
    assert [set(u) for u in final["imageUrls"]] == [{"url", "thumbnail"}] * 4
    assert final["displays"]["status"] == "SUCCESS" and final["useTime"].endswith(" s")
    assert final["properties"]["notifyHook"] == hook
    assert final["buttons"][0] == {"customId": f"MJ::JOB::upsample::1::{final['jobId']}",
                                   "emoji": "", "label": "U1", "style": 2, "type": 2}


# --- OhMyGPT and AIGC2D: their fields and faults -------------------------------------------


def test_ohmygpt_fields(sim: httpx.Client) -> None:
    def post(kind: str, **body: Any) -> httpx.Response:
        return sim.post(f"{OMG}/{kind}", headers=BEARER, json={"type": "FAST", **body})

    missing = post("imagine", prompt="a cat")
    assert missing.status_code == 400 and "model" in missing.json()["message"]
    task_id("ohmygpt", post("imagine", model="midjourney", prompt="a cat", base64Array=[IMG]))
    assert sim.get("/_sim/tasks").json()["tasks"][0]["images"] == 1
    old = post("describe", model="midjourney", image=IMG)  # the old field is not read
    assert old.status_code == 400 and "base64" in old.json()["message"]
    task_id("ohmygpt", post("describe", model="midjourney", base64=IMG))
    assert post("blend", model="midjourney", images=[IMG, IMG]).status_code == 400
    assert post("blend", model="midjourney", base64Array=[IMG] * 5).status_code == 400
    task_id("ohmygpt", post("blend", model="midjourney", base64Array=[IMG] * 4))
    assert sim.post(f"{OMG}/query", headers=BEARER, json={"taskId": 1}).status_code == 200


@pytest.mark.parametrize("provider", ["ohmygpt", "aigc2d"])
def test_ohmygpt_and_aigc2d_transient_errors_and_rate_limits(
        sim: httpx.Client, provider: str) -> None:
    sim.post("/_sim/faults", json={"transient_errors": 1})
    assert submit(sim, provider, "imagine", prompt="a cat").status_code == 503
    sim.post("/_sim/faults", json={"transient_errors": 0, "rate_limited": True})
    limited = submit(sim, provider, "imagine", prompt="a cat")
    assert limited.status_code == 429 and "many" in refusal(provider, limited).lower()
    assert sim.get("/_sim/stats").json()["submitted"] == 0


def test_each_image_is_its_own_png_until_the_links_expire(sim: httpx.Client) -> None:
    one, two = sim.get("/images/a.png"), sim.get("/images/b.png")
    assert one.headers["content-type"] == two.headers["content-type"] == "image/png"
    assert one.content.startswith(b"\x89PNG") and one.content != two.content
    assert sim.get("/images/a.png").content == one.content  # the same name, the same bytes
    sim.post("/_sim/faults", json={"expire_images": True})
    expired = sim.get("/images/a.png")
    assert expired.status_code == 404 and "no longer available" in expired.text
    assert sim.get("/_sim/stats").json()["image_requests"] == 4


@pytest.mark.parametrize(("flavor", "answer"), [
    ("trueai", b"Authorization header missing."),  # SimpleAuthMiddleware: no such user
    ("novicezk", b""),  # ApiAuthorizeInterceptor: the status only
])
def test_a_key_the_relay_does_not_know_is_refused_as_no_key(
        make_sim: Callable[..., httpx.Client], flavor: str, answer: bytes) -> None:
    sim = make_sim(mjproxy_flavor=flavor, api_keys=("good",))
    refused = sim.post("/mj/submit/imagine", json={"prompt": "x"},
                       headers={"mj-api-secret": "wrong"})
    assert (refused.status_code, refused.content) == (401, answer)
    taken = sim.post("/mj/submit/imagine", json={"prompt": "x"},
                     headers={"mj-api-secret": "good"})
    assert taken.status_code == 200 and taken.json()["code"] == 1
    assert sim.get("/_sim/stats").json()["refused_keys"] == 1
    # trueai checks the key before its rate limit (Program.cs: SimpleAuthMiddleware, then
    # RateLimitingMiddleware); novicezk's limit is its reverse proxy's, before the app
    sim.post("/_sim/faults", json={"rate_limited": True})
    limited = sim.post("/mj/submit/imagine", json={"prompt": "x"},
                       headers={"mj-api-secret": "wrong"})
    assert limited.status_code == (401 if flavor == "trueai" else 429)
