"""AIGC2D: Bearer keys; IMAGINE, UPSCALE, VARIATION, DESCRIBE, BLEND; snake_case; integer
task ids past 2^53; a callback per change whose body is the query answer.

Most of its API is not published anywhere we can read. Every guess the simulator makes is
in `ASSUMPTIONS` below, one row per fact with why we guessed it, so the day the real API is
known there is one place to change (the service's client keeps the same table).
"""

from __future__ import annotations

from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response

from receiver.simulator._config import SimError
from receiver.simulator._http import (
    base_url,
    bearer,
    empty,
    http_url,
    images,
    json_answer,
    optional,
    read_doc,
    server_error,
    sim_of,
    task_id,
    text,
)
from receiver.simulator._render import render
from receiver.simulator._tasks import Submission

ASSUMPTIONS = {
    # the five actions it sells, one path each, under the /mj prefix midjourney relays use
    "submit path": "POST /mj/{imagine,upscale,variation,describe,blend}",
    # a REST read of one task; its answer is the callback body (which is published)
    "query path": "GET /mj/task/{task_id}",
    # the callback's own field names, snake_case as the rest of its API
    "request fields": "prompt; image (describe); images (blend, 2 to 5); task_id + index 1-4 "
                      "(upscale, variation); callback_url; state",
    # the published callback starts with code and message: a submit answer does too
    "submit answer": '{"code": 0, "message": "success", "task_id": <integer>}',
    # the same two fields; the HTTP status says what (401, 404, 429 queue full or rate
    # limit, 400 refused, 503 no capacity)
    "error bodies": '{"code": <HTTP status>, "message": ...}',
    # a Chinese service: its times are local, UTC+8, "YYYY-MM-DD HH:MM:SS"
    "times": "YYYY-MM-DD HH:MM:SS in UTC+8",
    # the callback publishes no reason field; snake_case like the rest
    "failure reason": "fail_reason",
    # a describe has no image: its text takes the prompt's place
    "describe text": "prompt",
    # the published field; refund_point named on failure (points come back)
    "points": "point, 0 and refund_point on FAILURE",
}
ACTIONS = ("imagine", "upscale", "variation", "describe", "blend")


def _error(status: int, message: str) -> Response:
    return json_answer({"code": status, "message": message}, status)


def _refusal(err: SimError) -> Response:
    return _error({"not_found": 404, "queue_full": 429}.get(err.kind, 400), err.message)


async def aigc2d_submit(request: Request) -> Response:
    sim, kind = sim_of(request), request.path_params["kind"]
    if sim.faults.rate_limited:
        return _error(429, "too many requests")
    account = bearer(request)
    if account is None:
        return _error(401, "unauthorized: no API key")
    if kind not in ACTIONS:
        return _error(404, "not found")
    sim.hit("aigc2d", kind)
    if sim.chance(sim.faults.submit_error_rate):
        return server_error()
    if sim.transient() is not None:
        return _error(503, "service unavailable, please try again later")
    try:
        doc = await read_doc(request)
        spec = Submission("aigc2d", account, "DEFAULT", kind.upper(), base_url(sim, request),
                          callback_url=http_url(doc, "callback_url"),
                          state=optional(doc, "state"))
        if kind == "imagine":
            prompt = text(doc, "prompt")
            word = sim.banned_word(prompt)
            if word is not None:
                raise SimError("banned", f'banned prompt: the word "{word}" is not allowed',
                               word)
            spec = replace(spec, prompt=prompt)
        elif kind == "describe":
            text(doc, "image")
            spec = replace(spec, images=1)
        elif kind == "blend":
            spec = replace(spec, images=len(images(doc, "images", 2, 5)))
        else:
            index = doc.get("index")
            if isinstance(index, bool) or index not in (1, 2, 3, 4):
                raise SimError("invalid", "index must be 1, 2, 3 or 4")
            label = f"{'U' if kind == 'upscale' else 'V'}{index}"
            parent, button = sim.parent("aigc2d", task_id(doc, "task_id"), label=label)
            spec = replace(spec, action=kind.upper(), parent=parent, button=button)
        task = sim.submit(spec)
        await sim.answer_delay()
    except SimError as err:
        return _refusal(err)
    return json_answer({"code": 0, "message": "success", "task_id": task.id})


async def aigc2d_task(request: Request) -> Response:
    sim = sim_of(request)
    if sim.faults.rate_limited:
        return _error(429, "too many requests")
    if bearer(request) is None:
        return _error(401, "unauthorized: no API key")
    sim.hit("aigc2d", "task")
    key = request.path_params["task_id"]
    task = sim.find("aigc2d", key)
    if task is None:
        return _error(404, f"task {key} not found")
    return empty(200) if sim.faults.empty_polls else json_answer(render(task))
