"""OhMyGPT: ``/api/v1/ai/draw/mj/{imagine,action,describe,blend,query}``, Bearer keys,
FAST and NORMAL account pools, integer task ids.

Requests carry ``model: "midjourney"`` and ``type``; images are ``base64Array`` (imagine's
references, blend's 2 to 4) and ``base64`` (describe); an action names ``taskId`` and
``customId`` (and ``base64Mask`` for vary region). Its error bodies are not published: ours
are ``{"statusCode", "message"}`` with the HTTP status, worded so a client can match them.
"""

from __future__ import annotations

from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response

from receiver.core.buttons import button_action
from receiver.simulator._config import SimError
from receiver.simulator._http import (
    base_url,
    bearer,
    empty,
    http_url,
    images,
    json_answer,
    read_doc,
    server_error,
    sim_of,
    string_list,
    task_id,
    text,
)
from receiver.simulator._render import render, wrap_ohmygpt
from receiver.simulator._tasks import Submission

PREFIX = "/api/v1/ai/draw/mj"
SUBMITS = ("imagine", "action", "describe", "blend")


def _error(err: SimError) -> Response:
    status = {"not_found": 404, "queue_full": 429}.get(err.kind, 400)
    message = {
        "queue_full": "Queue full: too many unfinished tasks for this account, try later",
        "banned": f'Banned prompt: the word "{err.word}" is not allowed',
    }.get(err.kind, err.message)
    return json_answer({"statusCode": status, "message": message}, status)


def _model(doc: dict[str, object]) -> None:
    # Our reading: every public third-party client sends model "midjourney" with each
    # submission, so the API is taken to require it; the query is not held to it.
    if doc.get("model") != "midjourney":
        raise SimError("invalid", 'model is required and must be "midjourney"')


async def ohmygpt(request: Request) -> Response:
    sim, kind = sim_of(request), request.path_params["kind"]
    if sim.faults.rate_limited:
        return json_answer({"statusCode": 429, "message": "Too Many Requests"}, 429)
    account = bearer(request)
    if account is None:
        return json_answer({"statusCode": 401, "message": "Unauthorized: no API key"}, 401)
    if kind != "query" and kind not in SUBMITS:
        return json_answer({"statusCode": 404, "message": "Not Found"}, 404)
    sim.hit("ohmygpt", kind)
    try:
        doc = await read_doc(request, form_ok=True)
        if kind == "query":
            task = sim.find("ohmygpt", task_id(doc, "taskId"))
            if task is None:
                raise SimError("not_found", f"task {doc.get('taskId')} not found")
            return empty(200) if sim.faults.empty_polls else json_answer(
                wrap_ohmygpt(render(task)))
        if sim.chance(sim.faults.submit_error_rate):
            return server_error()
        if sim.transient() is not None:
            return json_answer({"statusCode": 503, "message": "Service temporarily "
                                "unavailable, please try again later"}, 503)
        _model(doc)
        mode = str(doc.get("type") or "FAST").upper()
        if mode not in ("FAST", "NORMAL"):
            raise SimError("invalid", "type must be FAST or NORMAL")
        spec = Submission("ohmygpt", account, mode, kind.upper(), base_url(sim, request),
                          callback_url=http_url(doc, "webhook"))
        if kind == "imagine":
            prompt = text(doc, "prompt")
            word = sim.banned_word(prompt)
            if word is not None:
                raise SimError("banned", f'banned prompt: "{word}"', word)
            spec = replace(spec, prompt=prompt, images=len(string_list(doc, "base64Array")))
        elif kind == "describe":
            text(doc, "base64")
            spec = replace(spec, images=1)
        elif kind == "blend":
            spec = replace(spec, images=len(images(doc, "base64Array", 2, 4)))
        else:
            text(doc, "base64Mask", required=False)
            parent, button = sim.parent("ohmygpt", task_id(doc, "taskId"),
                                        custom_id=text(doc, "customId"))
            if parent.mode != mode:  # FAST and NORMAL are separate account pools
                raise SimError("mode", f"Mode mismatch: task {parent.key} ran in the "
                                       f"{parent.mode} pool, so its actions must be {parent.mode}")
            spec = replace(spec, action=button_action(button.custom_id) or "UNKNOWN",
                           parent=parent, button=button)
        task = sim.submit(spec)
        await sim.answer_delay()
    except SimError as err:
        return _error(err)
    return json_answer({"statusCode": 200, "message": "Success", "data": task.id})
