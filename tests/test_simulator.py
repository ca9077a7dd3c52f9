"""The provider simulator over real sockets: a uvicorn serving it, another serving a recorder
that keeps every callback body, both on loopback."""

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

from receiver.dialects import parse
from receiver.models import TaskStatus, Update
from receiver.redis_server import free_port
from receiver.simulator import SimulatorConfig, create_simulator
from receiver.simulator_tasks import AIGC2D_FIRST_ID, DESCRIBE_TEXT
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
            if any(parse(provider, b).status.terminal for b in bodies):
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
    if provider == "mjproxy":
        assert response.status_code == 200 and body["code"] != 1, body
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
    updates = [parse(provider, body) for body in bodies]
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
    final = parse(provider, recorder.wait_final(provider, f"grid-{provider}")[-1])
    name = f"up-{provider}"
    child = task_id(provider, upscale(sim, provider, parent, final, recorder.hook(name)))
    last = parse(provider, recorder.wait_final(provider, name)[-1])
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
    final = parse("ohmygpt", recorder.wait_final("ohmygpt", "omg-mode")[-1])
    assert final.mode == "NORMAL"
    response = upscale(sim, "ohmygpt", parent, final, type="FAST")
    assert response.status_code == 400 and "mode" in refusal("ohmygpt", response).lower()
    assert upscale(sim, "ohmygpt", parent, final, type="NORMAL").json()["statusCode"] == 200


def test_mjproxy_action_needs_a_finished_parent_and_one_of_its_buttons(
        sim: httpx.Client) -> None:
    sim.post("/_sim/faults", json={"never_finish": True})
    parent = imagine(sim, "mjproxy", None)
    press = {"taskId": parent, "customId": "MJ::JOB::upsample::1::elsewhere"}
    body = submit(sim, "mjproxy", "action", **press).json()
    assert body["code"] == 4 and "not SUCCESS" in body["description"]
    sim.post("/_sim/faults", json={"never_finish": False})
    wait_status(sim, "mjproxy", parent, "SUCCESS")
    body = submit(sim, "mjproxy", "action", **press).json()
    assert body["code"] == 4 and "no button" in body["description"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_describe_gives_prompts_and_blend_takes_two_to_five(
        sim: httpx.Client, recorder: Recorder, provider: str) -> None:
    image_key = {"mjproxy": "base64", "ohmygpt": "image", "aigc2d": "image"}[provider]
    images_key = "base64Array" if provider == "mjproxy" else "images"
    tid = task_id(provider, submit(sim, provider, "describe", recorder.hook(f"d-{provider}"),
                                   **{image_key: IMG}))
    final = parse(provider, recorder.wait_final(provider, f"d-{provider}")[-1])
    assert (final.status, final.action, final.provider_task_id) == (
        TaskStatus.SUCCESS, "DESCRIBE", tid)
    text = final.final_prompt  # OhMyGPT and AIGC2D answer in "prompt": the dialects move it
    assert text is not None and text == DESCRIBE_TEXT
    assert text.startswith("1️⃣ ") and text.count("\n\n") == 3
    assert final.image_url is None

    tid = task_id(provider, submit(sim, provider, "blend", recorder.hook(f"b-{provider}"),
                                   **{images_key: [IMG, IMG]}))
    final = parse(provider, recorder.wait_final(provider, f"b-{provider}")[-1])
    assert (final.status, final.action, final.provider_task_id) == (
        TaskStatus.SUCCESS, "BLEND", tid)
    for count in (1, 6):
        refused = submit(sim, provider, "blend", **{images_key: [IMG] * count})
        assert f"not {count}" in refusal(provider, refused)


def test_ohmygpt_accepts_form_encoded_bodies(sim: httpx.Client) -> None:
    response = sim.post(f"{OMG}/blend", headers=BEARER,
                        data={"type": "FAST", "images[]": [IMG, IMG]})
    tid = task_id("ohmygpt", response)
    assert wait_status(sim, "ohmygpt", tid, "SUCCESS")["taskType"] == "FAST"


def test_missing_keys_are_refused_in_each_dialect(sim: httpx.Client) -> None:
    assert sim.post("/mj/submit/imagine", json={"prompt": "x"}).status_code == 401
    assert sim.get("/mj/task/1/fetch").status_code == 401
    omg = sim.post(f"{OMG}/imagine", json={"prompt": "x", "type": "FAST"})
    assert omg.status_code == 401 and omg.json()["statusCode"] == 401
    a2d = sim.post("/mj/imagine", json={"prompt": "x"}, headers={"Authorization": "Bearer"})
    assert a2d.status_code == 401 and a2d.json()["code"] == 401
    assert sim.get("/mj/task/9/fetch", headers=MJ).status_code == 404
    assert sim.get("/mj/task/9", headers=BEARER).status_code == 404


def test_mjproxy_records_mode_and_account(sim: httpx.Client) -> None:
    imagine(sim, "mjproxy", None, mode="/mj-relax")
    sim.post("/mj-fast/mj/submit/imagine", json={"prompt": "x"},
             headers={"Authorization": "Bearer other"})
    imagine(sim, "ohmygpt", None, type="FAST")
    stats = sim.get("/_sim/stats").json()
    assert stats["by_mode"] == {"mjproxy": {"RELAX": 1, "FAST": 1}, "ohmygpt": {"FAST": 1}}
    assert stats["submitted"] == 3 and stats["max_in_flight"] == {KEY: 2, "other": 1}
    assert {t["account"] for t in sim.get("/_sim/tasks").json()["tasks"]} == {KEY, "other"}


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
    progress = [parse("mjproxy", b).progress for b in recorder.of("reorder")]
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
    assert text.startswith("23 ") if provider == "mjproxy" else "queue" in text.lower()
    if provider != "mjproxy":
        assert response.status_code == 429


@pytest.mark.parametrize("provider", PROVIDERS)
def test_submit_errors(sim: httpx.Client, provider: str) -> None:
    sim.post("/_sim/faults", json={"submit_error_rate": 1})
    assert submit(sim, provider, "imagine", prompt="a cat").status_code == 500
    assert sim.get("/_sim/stats").json()["submitted"] == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_banned_word_is_refused_and_named(sim: httpx.Client, provider: str) -> None:
    response = submit(sim, provider, "imagine", prompt="a Banned cat")
    if provider == "mjproxy":
        body = response.json()
        assert (body["code"], body["description"]) == (24, "可能包含敏感词")
        assert body["properties"]["bannedWord"] == "banned"
    else:
        assert response.status_code == 400 and '"banned"' in refusal(provider, response)
    assert task_id(provider, submit(sim, provider, "imagine", prompt="unbannedish cat"))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_failing_tasks_end_in_failure_with_a_reason(
        sim: httpx.Client, recorder: Recorder, provider: str) -> None:
    sim.post("/_sim/faults", json={"fail_tasks": 1})
    imagine(sim, provider, recorder.hook(f"fail-{provider}"))
    bodies = recorder.wait_final(provider, f"fail-{provider}")
    final = parse(provider, bodies[-1])
    assert final.status is TaskStatus.FAILURE and final.fail_reason
    assert [parse(provider, b).status for b in bodies[:-1]] == [
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
        "empty_polls": False, "submit_delay": 0.0,
        "queue_wait": 0.0}


def test_aigc2d_ids_past_2_53_stay_exact(sim: httpx.Client, recorder: Recorder) -> None:
    response = submit(sim, "aigc2d", "imagine", recorder.hook("big"), prompt="a cat")
    tid = int(task_id("aigc2d", response))
    assert tid >= AIGC2D_FIRST_ID > 2**53
    assert f'"task_id":{tid}' in response.text  # a JSON integer, not a float or a string
    bodies = recorder.wait_final("aigc2d", "big")
    assert all(json.loads(b)["task_id"] == tid for b in bodies)
    assert parse("aigc2d", bodies[-1]).provider_task_id == str(tid)
    second = int(task_id("aigc2d", submit(sim, "aigc2d", "imagine", prompt="a dog")))
    assert second == tid + 1
    assert poll(sim, "aigc2d", str(tid))["task_id"] == tid


def test_receiver_simulate_serves_the_providers(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "simulate.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "simulate", "--port", str(port),
         "--step-interval", "0.01"], stdout=log, stderr=subprocess.STDOUT)
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
            tid = imagine(client, "mjproxy", None, mode="/mj-turbo")
            assert wait_status(client, "mjproxy", tid, "SUCCESS")["buttons"]
            assert client.get("/_sim/stats").json()["by_mode"] == {"mjproxy": {"TURBO": 1}}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
