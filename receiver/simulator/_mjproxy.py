# ruff: noqa: RUF001 (the relays' own words, with their full-width commas)
"""midjourney-proxy, both generations: what they share (imagine, describe, blend, fetch,
list-by-condition, auth, answers), with each one's own words where they differ.

- ``novicezk`` (novicezk/midjourney-proxy 2.x, Java): no mode prefixes, ``mj-api-secret``
  only, refusals in ``{code, description, result, properties}``, a banned prompt refused at
  submit (24), queue full 23, unknown task: 200 with no body. Actions: `_novicezk`.
- ``trueai`` (trueai-org/midjourney-proxy, C#): ``/mj-fast``, ``/mj-relax``, ``/mj-turbo``,
  ``Authorization`` taken raw, a banned prompt accepted then failed, queue full is code 9,
  unknown task 204, LogicException bodies ``{success, code: -1, message, timestamp}``, a
  rate limiter (429) and an IP blacklist (403). Actions, dialogs, cancel: `_trueai`.

Each fact names its source file (SubmitController, TaskController, TaskServiceImpl,
DiscordInstanceImpl / DiscordService.RedisEnqueue, WorkContext, SimpleAuthMiddleware,
RateLimitingMiddleware, CustomLogicExceptionFilterAttribute).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from receiver.simulator._config import SimError
from receiver.simulator._engine import Simulator
from receiver.simulator._http import (
    DIMENSIONS,
    base_url,
    empty,
    is_data_url,
    optional,
    read_doc,
    sim_of,
    string_list,
)
from receiver.simulator._render import DOTNET_JSON, dotnet_json, encode, render
from receiver.simulator._tasks import SimTask, Submission

MODES = {"": "DEFAULT", "/mj-fast": "FAST", "/mj-relax": "RELAX", "/mj-turbo": "TURBO"}
NO_ACCOUNT = "无可用的账号实例"  # TaskService: no Discord account instance free
SYSTEM_ERROR = "提交失败，系统异常"  # DiscordInstanceImpl.submitTask / RedisEnqueue: exception
QUEUE_FULL = {"novicezk": (23, "队列已满，请稍后尝试"),
              "trueai": (9, "提交失败，队列已满，请稍后重试")}
NOT_FOUND_PARENT = "关联任务不存在或已失效"
# trueai's LogicException for the logic_error fault (SubmitController.NewTask's first check).
LOGIC_MESSAGE = "服务暂不可用，请联系管理员"


# --- answers -------------------------------------------------------------------------------


def answer(flavor: str, doc: Any, status: int = 200) -> Response:
    """JSON as each relay writes it: Jackson (raw UTF-8) or System.Text.Json (escaped)."""
    if flavor == "trueai":
        return Response(dotnet_json(doc), status, media_type=DOTNET_JSON)
    return Response(orjson.dumps(doc), status, media_type="application/json")


def vo(flavor: str, code: int, description: str, result: str | None = None,
       http_status: int = 200, **properties: Any) -> Response:
    """SubmitResultVO: {code, description, result, properties}."""
    return answer(flavor, {"code": code, "description": description, "result": result,
                           "properties": properties}, http_status)


def logic(message: str, status: int = 200) -> Response:
    """trueai's Result.Fail: a LogicException (HTTP 200) or another exception (HTTP 500)."""
    ticks = int((time.time() + 62135596800) * 10**7)  # DateTime.Now.Ticks, as a string
    return answer("trueai", {"success": False, "code": -1, "message": message,
                             "timestamp": str(ticks)}, status)


def spring_error(status: int, error: str, path: str) -> Response:
    """Spring Boot's error body (novicezk: an exception or an unparsable body)."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "+0000")
    return answer("novicezk", {"timestamp": stamp, "status": status, "error": error,
                               "path": path}, status)


def refused(flavor: str, err: SimError) -> Response:
    if err.kind == "queue_full":
        code, text = QUEUE_FULL[flavor]
        return vo(flavor, code, text)
    return vo(flavor, 4, err.message)


def server_error(sim: Simulator, request: Request) -> Response:
    if sim.config.mjproxy_flavor == "trueai":
        return logic("操作失败", 500)
    return spring_error(500, "Internal Server Error", request.url.path)


# --- every request: the key and the filters, in each generation's order ----------------


def account_of(request: Request, flavor: str) -> str | None:
    """novicezk: the ``mj-api-secret`` header (ApiAuthorizeInterceptor). trueai: the whole
    ``Authorization`` value if the header is there, else ``mj-api-secret`` (WorkContext:
    no "Bearer " is stripped, so the key recorded is exactly what was sent)."""
    if flavor == "trueai" and "authorization" in request.headers:
        return request.headers["authorization"] or None
    return request.headers.get("mj-api-secret") or None


def gate(request: Request, route: str) -> tuple[Simulator, str, str] | Response:
    """(simulator, flavor, account), or the answer of a filter that stopped the request."""
    sim = sim_of(request)
    flavor, faults = sim.config.mjproxy_flavor, sim.faults
    if flavor == "novicezk" and faults.rate_limited:
        return empty(429)  # its reverse proxy's, before the app
    account = account_of(request, flavor)
    if account is not None and sim.config.api_keys and account not in sim.config.api_keys:
        sim.refused_keys += 1
        account = None  # answered as no key at all, in both generations
    if account is None:
        # trueai's SimpleAuthMiddleware: no user for the token (none sent, or unknown) is a
        # 401 with this text; novicezk's ApiAuthorizeInterceptor: the status only
        if flavor == "trueai":
            return Response("Authorization header missing.", 401, media_type="text/plain")
        return empty(401)
    # trueai's Program.cs runs RateLimitingMiddleware after SimpleAuthMiddleware
    if flavor == "trueai" and faults.ip_blacklisted:
        return empty(403)  # blacklisted, no body
    if flavor == "trueai" and faults.rate_limited:
        return empty(429)
    sim.hit("mjproxy", route)
    return sim, flavor, account


async def body_of(request: Request, flavor: str) -> dict[str, Any] | Response:
    try:
        return await read_doc(request)
    except SimError:
        if flavor == "trueai":  # its InvalidModelStateResponseFactory: a Result, HTTP 200
            return logic("参数异常")
        return spring_error(400, "Bad Request", request.url.path)


def mode_of(request: Request) -> str:
    return MODES.get(request.url.path.partition("/mj/")[0], "DEFAULT")


def new_task_logic(sim: Simulator, doc: dict[str, Any]) -> str | None:
    """trueai's SubmitController.NewTask checks: a LogicException's message, or None."""
    if sim.faults.logic_error:
        return LOGIC_MESSAGE
    state, hook = doc.get("state"), doc.get("notifyHook")
    if isinstance(state, str) and len(state) > 255:
        return "State参数过长，最大255字符"
    if isinstance(hook, str) and len(hook) > 2000:
        return "NotifyHook参数过长，最大2000字符"
    return None


def spec_of(sim: Simulator, request: Request, account: str, action: str,
            doc: dict[str, Any], **fields: Any) -> Submission:
    try:
        state, hook = optional(doc, "state"), optional(doc, "notifyHook")
    except SimError:
        state = hook = None
    return Submission("mjproxy", account, mode_of(request), action, base_url(sim, request),
                      callback_url=hook or None, state=state, **fields)


async def place(sim: Simulator, flavor: str, spec: Submission, exempt: bool = False,
                describe: Callable[[SimTask], str] | None = None,
                instance_error: str = NO_ACCOUNT) -> Response:
    """Hand the task to an account: no account (3), a failed hand-over (9), a full queue, or
    accepted: 1 "提交成功", or 22 when others wait ahead of it (read before it joins)."""
    code = sim.transient()
    if code is not None:
        return vo(flavor, code, instance_error if code == 3 else SYSTEM_ERROR)
    try:
        ahead = sim.admit("mjproxy", spec.account, exempt=exempt)
    except SimError as err:
        return refused(flavor, err)
    task = sim.create(spec)
    if describe is not None:
        task.description = describe(task)
    return await enqueued(sim, flavor, task, ahead)


async def enqueued(sim: Simulator, flavor: str, task: SimTask, ahead: int) -> Response:
    """Queue an admitted task and say so: 1, or 22 with the number waiting ahead of it."""
    sim.queue(task)
    await sim.answer_delay()
    if ahead == 0:
        return vo(flavor, 1, "提交成功", task.key, discordInstanceId=task.instance_id)
    sim.answered_queued += 1
    return vo(flavor, 22, f"排队中，前面还有{ahead}个任务", task.key,
              numberOfQueues=ahead, discordInstanceId=task.instance_id)


def data_urls(doc: dict[str, Any], key: str) -> list[str] | None:
    """The list's images if every one is a data URL; None if one is not ("base64格式错误")."""
    try:
        values = string_list(doc, key)
    except SimError:
        return None
    return values if all(is_data_url(v) for v in values) else None


# --- imagine, describe, blend ------------------------------------------------------------


async def imagine(request: Request, sim: Simulator, flavor: str, account: str,
                  doc: dict[str, Any]) -> Response:
    prompt = doc.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return vo(flavor, 4, "prompt不能为空")
    prompt = prompt.strip()
    if flavor == "novicezk":
        word = sim.banned_word(prompt)
        if word is not None:  # BannedPromptUtils.checkBanned, before anything is queued
            return vo(flavor, 24, "可能包含敏感词", promptEn=prompt, bannedWord=word)
        images = data_urls(doc, "base64Array")
        single = doc.get("base64")
        if single not in (None, ""):  # SubmitImagineDTO.base64: one more image
            images = None if images is None or not is_data_url(single) else [*images, single]
    else:
        message = new_task_logic(sim, doc)
        if message is not None:  # Imagine() catches it: code 4 with the message
            return vo(flavor, 4, message)
        images = data_urls(doc, "base64Array")  # its DTO has no "base64": ignored
    if images is None:
        return vo(flavor, 4, "base64格式错误")
    spec = spec_of(sim, request, account, "IMAGINE", doc, prompt=prompt, images=len(images),
                   description=f"/imagine {prompt}")
    return await place(sim, flavor, spec)


async def describe(request: Request, sim: Simulator, flavor: str, account: str,
                   doc: dict[str, Any]) -> Response:
    image, link = doc.get("base64"), doc.get("link") if flavor == "trueai" else None
    has_image = isinstance(image, str) and bool(image.strip())
    has_link = isinstance(link, str) and bool(link.strip())
    if flavor == "novicezk" and not has_image:
        return vo(flavor, 4, "base64不能为空")
    if flavor == "trueai":
        if not has_image and not has_link:
            return vo(flavor, 4, "base64或link不能为空")
        if has_link and not str(link).startswith(("http://", "https://")):
            return vo(flavor, 4, "链接格式错误")
    if has_image and not is_data_url(image):
        return vo(flavor, 4, "base64格式错误")
    if flavor == "trueai" and (message := new_task_logic(sim, doc)) is not None:
        return logic(message)
    spec = spec_of(sim, request, account, "DESCRIBE", doc, images=1,
                   link=None if has_image else str(link))
    return await place(sim, flavor, spec, describe=(
        (lambda t: f"/describe {t.key}.png") if flavor == "novicezk" else (lambda t: "/describe")))


async def blend(request: Request, sim: Simulator, flavor: str, account: str,
                doc: dict[str, Any]) -> Response:
    raw = doc.get("base64Array")
    if not isinstance(raw, list) or not 2 <= len(raw) <= 5:
        return vo(flavor, 4, "base64List参数错误" if flavor == "novicezk"
                  else "图片参数错误，2~5张图片")
    if doc.get("dimensions") not in DIMENSIONS:
        return vo(flavor, 4, "dimensions参数错误")
    images = data_urls(doc, "base64Array")
    if images is None:
        return vo(flavor, 4, "base64格式错误")
    if flavor == "trueai" and (message := new_task_logic(sim, doc)) is not None:
        return logic(message)
    spec = spec_of(sim, request, account, "BLEND", doc, images=len(images))
    return await place(sim, flavor, spec,
                       describe=lambda t: f"/blend {t.key} {len(images)}")


SUBMITS = {"imagine": imagine, "describe": describe, "blend": blend}


async def submit(request: Request) -> Response:
    """``POST [/mj-<mode>]/mj/submit/{kind}``: the shared kinds here, the actions in the
    flavor's module (given to `create_simulator` as ``actions``)."""
    kind = request.path_params["kind"]
    gated = gate(request, kind)
    if isinstance(gated, Response):
        return gated
    sim, flavor, account = gated
    handler = SUBMITS.get(kind) or request.app.state.mj_actions.get(kind)
    if handler is None:
        if flavor == "trueai":
            return empty(404)
        return spring_error(404, "Not Found", request.url.path)
    if sim.chance(sim.faults.submit_error_rate):
        return server_error(sim, request)
    doc = await body_of(request, flavor)
    if isinstance(doc, Response):
        return doc
    response: Response = await handler(request, sim, flavor, account, doc)
    return response


# --- what a client reads: fetch, list-by-condition ----------------------------------------


def _unknown(flavor: str) -> Response:
    # novicezk's fetch returns null: 200, no body. trueai's ActionResult<TaskInfo> of null: 204.
    return empty(204) if flavor == "trueai" else empty(200)


async def fetch(request: Request) -> Response:
    gated = gate(request, "fetch")
    if isinstance(gated, Response):
        return gated
    sim, flavor, _ = gated
    task = sim.find("mjproxy", request.path_params["task_id"])
    if task is None or sim.faults.empty_polls:
        return _unknown(flavor)
    body, content_type = encode(task, render(task))
    return Response(body, 200, media_type=content_type)


async def list_by_condition(request: Request) -> Response:
    """``POST /mj/task/list-by-condition {ids}``: the known tasks among ``ids``, as a list."""
    gated = gate(request, "list-by-condition")
    if isinstance(gated, Response):
        return gated
    sim, flavor, _ = gated
    doc = await body_of(request, flavor)
    if isinstance(doc, Response):
        return doc
    ids = doc.get("ids")
    listed: list[dict[str, Any]] = []
    if isinstance(ids, list) and not sim.faults.empty_polls:
        for each in dict.fromkeys(str(i).strip() for i in ids if i is not None):
            task = sim.find("mjproxy", each)
            if task is not None:
                listed.append(render(task))
    return answer(flavor, listed)
