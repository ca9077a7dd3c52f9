"""A provider simulator: midjourney-proxy, OhMyGPT and AIGC2D over real HTTP.

The service and its tests run whole task lifecycles against it instead of the real hosts:
submit, a callback per state in the provider's dialect, polling, button actions, and the
faults real relays have (lost, repeated, reordered or late callbacks, a dropped callback
URL, full queues, failures, tasks that never end). Any non-empty key is accepted and
recorded as the account; ``/_sim/*`` switches faults and reports what was received.
The engine (tasks, lifecycle, callbacks) is `receiver.simulator_tasks`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.providers import button_action
from receiver.simulator_tasks import (
    Button,
    Faults,
    SimError,
    SimTask,
    Simulator,
    SimulatorConfig,
    Submission,
    render,
    wrap_ohmygpt,
)

__all__ = ["Faults", "SimulatorConfig", "create_simulator"]

MJ_MODES = {"": "DEFAULT", "/mj-fast": "FAST", "/mj-relax": "RELAX", "/mj-turbo": "TURBO"}
OHMYGPT = "/api/v1/ai/draw/mj"
DIMENSIONS = ("PORTRAIT", "SQUARE", "LANDSCAPE")


def _png(width: int = 4, height: int = 4, rgb: bytes = b"\x5b\x8d\xef") -> bytes:
    """A tiny valid PNG, so clients that fetch and decode an image URL get an image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + rgb * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


PNG = _png()


# What midjourney-proxy answers a poll for a task it has forgotten: 200, no body.
_EMPTY = Response(b"", 200, media_type="application/json")


def _json(doc: Any, status: int = 200) -> Response:
    # orjson keeps integers past 2**53 exact, as AIGC2D's ids need.
    return Response(orjson.dumps(doc), status, media_type="application/json")


# --- request reading: every complaint is a SimError("invalid") --------------------------


async def _doc(request: Request, form_ok: bool = False) -> dict[str, Any]:
    body = await request.body()
    # curl -d labels JSON as a form: the body's first byte decides.
    if form_ok and not body.lstrip().startswith(b"{") and request.headers.get(
            "content-type", "").startswith("application/x-www-form-urlencoded"):
        pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k.removesuffix("[]"): v if k.endswith("[]") or k == "images" else v[-1]
                for k, v in pairs.items()}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SimError("invalid", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise SimError("invalid", "the body is not a JSON object")
    return doc


def _text(doc: dict[str, Any], key: str, required: bool = True) -> str:
    value = doc.get(key)
    if value is None or value == "":
        if required:
            raise SimError("invalid", f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise SimError("invalid", f"{key} must be a string")
    return value


def _url(doc: dict[str, Any], key: str) -> str | None:
    url = _text(doc, key, required=False)
    if url and not url.startswith(("http://", "https://")):
        raise SimError("invalid", f"{key} must be an http(s) URL")
    return url or None


def _task_id(doc: dict[str, Any], key: str) -> str:
    """An id given as a JSON integer or a decimal string (JavaScript clients send those)."""
    value = doc.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise SimError("invalid", f"{key} is required (an integer or a string)")


def _images(doc: dict[str, Any], key: str, low: int, high: int) -> list[str]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SimError("invalid", f"{key} must be a list of images")
    if not low <= len(value) <= high:
        raise SimError("invalid", f"{key} must hold {low} to {high} images, not {len(value)}")
    return value


def _dimensions(doc: dict[str, Any]) -> None:
    value = doc.get("dimensions")
    if value is not None and value not in DIMENSIONS:
        raise SimError("invalid", f"dimensions must be one of {', '.join(DIMENSIONS)}")


def _bearer(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def _base_url(sim: Simulator, request: Request) -> str:
    return (sim.config.public_url or str(request.base_url)).rstrip("/")


def _sim(request: Request) -> Simulator:
    sim: Simulator = request.app.state.sim
    return sim


def _server_error() -> Response:
    return Response("Internal Server Error", 500, media_type="text/plain")


# --- midjourney-proxy ----------------------------------------------------------------------


def _mj_error(err: SimError) -> Response:
    """midjourney-proxy answers refusals with HTTP 200 and a code (ReturnCode)."""
    if err.kind == "queue_full":
        return _json({"code": 23, "description": "队列已满，请稍后尝试", "result": None,  # noqa: RUF001
                      "properties": {}})
    if err.kind == "banned":
        return _json({"code": 24, "description": "可能包含敏感词", "result": None,
                      "properties": {"bannedWord": err.word}})
    if err.kind == "not_found":
        return _json({"code": 4, "description": "关联任务不存在或已失效", "result": None,
                      "properties": {}})
    return _json({"code": 4, "description": err.message, "result": None, "properties": {}})


def _mj_account(request: Request) -> str | None:
    return request.headers.get("mj-api-secret", "").strip() or _bearer(request)


async def mj_submit(request: Request) -> Response:
    sim, kind = _sim(request), request.path_params["kind"]
    account = _mj_account(request)
    if account is None:
        return Response(status_code=401)
    if kind not in ("imagine", "action", "describe", "blend"):
        return Response("Not Found", 404, media_type="text/plain")
    if sim.chance(sim.faults.submit_error_rate):
        return _server_error()
    mode = MJ_MODES[request.url.path.partition("/mj/")[0]]
    try:
        doc = await _doc(request)
        spec = Submission("mjproxy", account, mode, kind.upper(), _base_url(sim, request),
                          callback_url=_url(doc, "notifyHook"),
                          state=_text(doc, "state", required=False))
        if kind == "imagine":
            _images(doc, "base64Array", 0, 5)
            spec = replace(spec, prompt=_text(doc, "prompt"))
        elif kind == "describe":
            _text(doc, "base64")
        elif kind == "blend":
            _images(doc, "base64Array", 2, 5)
            _dimensions(doc)
        else:
            parent, button = sim.parent("mjproxy", _task_id(doc, "taskId"),
                                        custom_id=_text(doc, "customId"))
            spec = _action(spec, parent, button)
        task = sim.submit(spec)
        await sim.answer_delay()
    except SimError as err:
        return _mj_error(err)
    return _json({"code": 1, "description": "提交成功", "result": task.key, "properties": {}})


async def mj_fetch(request: Request) -> Response:
    if _mj_account(request) is None:
        return Response(status_code=401)
    sim = _sim(request)
    task = sim.find("mjproxy", request.path_params["task_id"])
    if task is None:
        return Response(status_code=404)
    return _EMPTY if sim.faults.empty_polls else _json(render(task))


# --- OhMyGPT ---------------------------------------------------------------------------


def _omg_error(err: SimError) -> Response:
    status = {"not_found": 404, "queue_full": 429}.get(err.kind, 400)
    message = {
        "queue_full": "Queue full: too many unfinished tasks for this account, try later",
        "banned": f'Banned prompt: the word "{err.word}" is not allowed',
    }.get(err.kind, err.message)
    return _json({"statusCode": status, "message": message}, status)


async def ohmygpt(request: Request) -> Response:
    sim, kind = _sim(request), request.path_params["kind"]
    account = _bearer(request)
    if account is None:
        return _json({"statusCode": 401, "message": "Unauthorized: no API key"}, 401)
    try:
        doc = await _doc(request, form_ok=True)
        if kind == "query":
            task = sim.find("ohmygpt", _task_id(doc, "taskId"))
            if task is None:
                raise SimError("not_found", f"task {doc.get('taskId')} not found")
            return _EMPTY if sim.faults.empty_polls else _json(wrap_ohmygpt(render(task)))
        if kind not in ("imagine", "action", "describe", "blend"):
            return _json({"statusCode": 404, "message": "Not Found"}, 404)
        if sim.chance(sim.faults.submit_error_rate):
            return _server_error()
        mode = str(doc.get("type") or "").upper()
        if mode not in ("FAST", "NORMAL"):
            raise SimError("invalid", "type must be FAST or NORMAL")
        spec = Submission("ohmygpt", account, mode, kind.upper(), _base_url(sim, request),
                          callback_url=_url(doc, "webhook"))
        if kind == "imagine":
            spec = replace(spec, prompt=_text(doc, "prompt"))
        elif kind == "describe":
            _text(doc, "image")
        elif kind == "blend":
            _images(doc, "images", 2, 5)
            _dimensions(doc)
        else:
            parent, button = sim.parent("ohmygpt", _task_id(doc, "taskId"),
                                        custom_id=_text(doc, "customId"))
            if parent.mode != mode:  # FAST and NORMAL are separate account pools
                raise SimError("mode", f"Mode mismatch: task {parent.key} ran in the "
                                       f"{parent.mode} pool, so its actions must be {parent.mode}")
            spec = _action(spec, parent, button)
        task = sim.submit(spec)
        await sim.answer_delay()
    except SimError as err:
        return _omg_error(err)
    return _json({"statusCode": 200, "message": "Success", "data": task.id})


# --- AIGC2D ------------------------------------------------------------------------------


def _a2d_error(err: SimError) -> Response:
    status = {"not_found": 404, "queue_full": 429}.get(err.kind, 400)
    return _json({"code": status, "message": err.message}, status)


async def aigc2d_submit(request: Request) -> Response:
    sim, kind = _sim(request), request.path_params["kind"]
    account = _bearer(request)
    if account is None:
        return _json({"code": 401, "message": "unauthorized: no API key"}, 401)
    if kind not in ("imagine", "upscale", "variation", "describe", "blend"):
        return _json({"code": 404, "message": "not found"}, 404)
    if sim.chance(sim.faults.submit_error_rate):
        return _server_error()
    try:
        doc = await _doc(request)
        spec = Submission("aigc2d", account, "DEFAULT", kind.upper(), _base_url(sim, request),
                          callback_url=_url(doc, "callback_url"),
                          state=_text(doc, "state", required=False))
        if kind == "imagine":
            spec = replace(spec, prompt=_text(doc, "prompt"))
        elif kind == "describe":
            _text(doc, "image")
        elif kind == "blend":
            _images(doc, "images", 2, 5)
        else:
            index = doc.get("index")
            if isinstance(index, bool) or index not in (1, 2, 3, 4):
                raise SimError("invalid", "index must be 1, 2, 3 or 4")
            label = f"{'U' if kind == 'upscale' else 'V'}{index}"
            parent, button = sim.parent("aigc2d", _task_id(doc, "task_id"), label=label)
            spec = _action(spec, parent, button)
        task = sim.submit(spec)
        await sim.answer_delay()
    except SimError as err:
        return _a2d_error(err)
    return _json({"code": 0, "message": "success", "task_id": task.id})


async def aigc2d_task(request: Request) -> Response:
    if _bearer(request) is None:
        return _json({"code": 401, "message": "unauthorized: no API key"}, 401)
    task_id = request.path_params["task_id"]
    sim = _sim(request)
    task = sim.find("aigc2d", task_id)
    if task is None:
        return _json({"code": 404, "message": f"task {task_id} not found"}, 404)
    return _EMPTY if sim.faults.empty_polls else _json(render(task))


def _action(spec: Submission, parent: SimTask, button: Button) -> Submission:
    action = button_action(button.custom_id) or "UNKNOWN"
    return replace(spec, action=action, parent=parent, button=button)


# --- images and the control routes ---------------------------------------------------------


async def image(request: Request) -> Response:
    name: str = request.path_params["name"]
    if not name.endswith(".png"):
        return Response("Not Found", 404, media_type="text/plain")
    return Response(PNG, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


async def faults(request: Request) -> Response:
    sim = _sim(request)
    if request.method == "POST":
        try:
            changes = orjson.loads(await request.body() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object of faults")
            sim.set_faults(sim.faults.updated(changes))
        except (ValueError, TypeError) as exc:
            return _json({"error": "bad_fault", "detail": str(exc)}, 400)
    return _json(asdict(sim.faults))


async def stats(request: Request) -> Response:
    return _json(_sim(request).stats())


async def tasks(request: Request) -> Response:
    return _json({"tasks": _sim(request).snapshot()})


async def reset(request: Request) -> Response:
    await _sim(request).reset()
    return _json(_sim(request).stats())


def create_simulator(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator app; `app.state.sim` is its engine (tasks, faults, counters)."""
    sim = Simulator(config or SimulatorConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sim.stop()

    routes = [
        *(route for prefix in MJ_MODES for route in (
            Route(f"{prefix}/mj/submit/{{kind}}", mj_submit, methods=["POST"]),
            Route(f"{prefix}/mj/task/{{task_id}}/fetch", mj_fetch, methods=["GET"]))),
        Route(f"{OHMYGPT}/{{kind}}", ohmygpt, methods=["POST"]),
        Route("/mj/task/{task_id}", aigc2d_task, methods=["GET"]),
        Route("/mj/{kind}", aigc2d_submit, methods=["POST"]),
        Route("/images/{name}", image, methods=["GET"]),
        Route("/_sim/faults", faults, methods=["GET", "POST"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/tasks", tasks, methods=["GET"]),
        Route("/_sim/reset", reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sim = sim
    return app
