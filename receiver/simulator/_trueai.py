"""trueai-org/midjourney-proxy's actions: buttons, dialogs (MODAL) and cancel.

``/mj/submit/action`` presses a button by its custom id (SubmitController.Action names the
action by the id's prefix); custom zoom, vary region and a remix park the new task in MODAL
and answer code 21 "Waiting for window confirm" (TaskService.SubmitAction, ~line 1700) until
``/mj/submit/modal`` brings the prompt (or mask). ``/mj/task/{id}/cancel`` fails a task
"取消任务" without a callback (TaskController.Cancel; the relay lets only its admins cancel,
and the simulator takes every key for one).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver.simulator._config import SimError
from receiver.simulator._engine import Simulator
from receiver.simulator._http import empty, is_data_url
from receiver.simulator._mjproxy import (
    NO_ACCOUNT,
    NOT_FOUND_PARENT,
    SYSTEM_ERROR,
    enqueued,
    gate,
    logic,
    new_task_logic,
    place,
    refused,
    spec_of,
    vo,
)
from receiver.simulator._tasks import DISCORD_REFUSED, SimTask

FLAVOR = "trueai"
WAITING = "Waiting for window confirm"
# SubmitController.Action: the custom id's prefix names the task's action, in this order.
PREFIXES = (
    ("MJ::JOB::upsample::", "UPSCALE"), ("MJ::JOB::video_virtual_upscale", "UPSCALE"),
    ("MJ::JOB::variation::", "VARIATION"), ("MJ::JOB::reroll::", "REROLL"),
    ("MJ::JOB::high_variation::", "VARIATION"), ("MJ::JOB::low_variation::", "VARIATION"),
    ("MJ::Outpaint::", "ZOOM"), ("MJ::JOB::pan_", "PAN"), ("MJ::JOB::upsample_", "UPSCALE_HD"),
    ("MJ::CustomZoom::", "ZOOM"), ("MJ::Inpaint::", "VARIATION"),
    ("MJ::JOB::animate_", "VIDEO"), ("MJ::Job::PicReader", "IMAGINE"),
)
# A reroll repeats its parent's action (an upscale's: a new imagine); these refuse it.
REROLLABLE = frozenset({"IMAGINE", "VARIATION", "DESCRIBE", "BLEND", "PAN", "ZOOM", "SHORTEN",
                        "VIDEO", "EDIT", "UPSCALE_HD", "RETEXTURE"})
DIALOGS = {"MJ::CustomZoom::": "prompt", "MJ::Inpaint::": "mask"}


def _action_of(custom_id: str, parent: SimTask) -> str | None:
    if "MJ::Picread::Retry" in custom_id:
        return "DESCRIBE"
    action = next((a for prefix, a in PREFIXES if custom_id.startswith(prefix)), None)
    if action == "REROLL":
        if parent.action == "UPSCALE":
            return "IMAGINE"
        return parent.action if parent.action in REROLLABLE else ""
    return action


def _speedless(prompt: str | None) -> str:
    """TaskService.SubmitAction: the parent's final prompt without its speed flags."""
    for flag in ("--fast", "--relax", "--turbo"):
        prompt = (prompt or "").replace(flag, "")
    return (prompt or "").strip()


async def action(request: Request, sim: Simulator, flavor: str, account: str,
                 doc: dict[str, Any]) -> Response:
    task_id, custom_id = doc.get("taskId"), doc.get("customId")
    if not isinstance(task_id, str | int) or not str(task_id).strip() \
            or not isinstance(custom_id, str) or not custom_id.strip():
        return vo(FLAVOR, 4, "参数错误")
    parent = sim.find("mjproxy", str(task_id).strip())
    if parent is None:
        return vo(FLAVOR, 3, NOT_FOUND_PARENT, http_status=404)  # NotFound(SubmitResultVO)
    if parent.status != "SUCCESS":
        return vo(FLAVOR, 4, "关联任务状态错误")
    message = new_task_logic(sim, doc)
    if message is not None:  # NewTask is outside any try here: the exception filter answers
        return logic(message)
    task_action = _action_of(custom_id, parent)
    if task_action == "":
        return vo(FLAVOR, 4, "该任务不支持重新生成")
    if task_action is None:
        return vo(FLAVOR, 4, "未知的 Action 类型")
    # The relay does not check the id against the parent's buttons; Discord does, later.
    foreign = custom_id not in {b.custom_id for b in parent.buttons}
    dialog = next((need for prefix, need in DIALOGS.items() if custom_id.startswith(prefix)),
                  None)
    if dialog is None and doc.get("enableRemix") is True and (
            task_action in ("PAN", "VARIATION") or custom_id.startswith("MJ::JOB::reroll")):
        dialog = "prompt"  # a remix: the new prompt comes through the dialog
    prompt = "" if dialog == "mask" else parent.prompt  # vary region starts without one
    spec = spec_of(sim, request, account, task_action, doc, prompt=prompt, parent=parent,
                   custom_id=custom_id, modal=dialog,
                   description=WAITING if custom_id.startswith("MJ::CustomZoom::") else None,
                   fail_at_start=DISCORD_REFUSED if foreign else None)
    if dialog is None:  # the upscale queue may overflow (RedisEnqueue: ignoreFull)
        return await place(sim, FLAVOR, spec, exempt=task_action == "UPSCALE")
    code = sim.transient()
    if code is not None:
        return vo(FLAVOR, code, NO_ACCOUNT if code == 3 else SYSTEM_ERROR)
    task = sim.create(spec)  # parked in MODAL: not queued, no callbacks
    await sim.answer_delay()
    final = "" if dialog == "mask" else _speedless(parent.final_prompt) or parent.prompt
    return vo(FLAVOR, 21, WAITING, task.key, finalPrompt=final, remix=True)


async def modal(request: Request, sim: Simulator, flavor: str, account: str,
                doc: dict[str, Any]) -> Response:
    """``{taskId, prompt, maskBase64}``: the dialog of a MODAL task; then it runs."""
    task_id = doc.get("taskId")
    if not isinstance(task_id, str | int) or not str(task_id).strip():
        return vo(FLAVOR, 4, "参数错误")
    task = sim.find("mjproxy", str(task_id).strip())
    if task is None:
        return vo(FLAVOR, 3, NOT_FOUND_PARENT, http_status=404)
    prompt = doc.get("prompt") if isinstance(doc.get("prompt"), str) else None
    if not (prompt or "").strip() and task.parent_id is not None:
        parent = sim.find("mjproxy", task.parent_id)  # "兼容 rix api": the parent's prompt
        if parent is not None:
            prompt = parent.prompt or parent.final_prompt
    if not (prompt or "").strip():
        return vo(FLAVOR, 4, "prompt不能为空")
    mask = doc.get("maskBase64")
    # Our reading: the relay forwards the mask unchecked ("不检查"), but a vary region
    # without one cannot be drawn by Midjourney; we refuse it here, with code 4.
    if task.needs == "mask" and not (isinstance(mask, str) and is_data_url(mask)):
        return vo(FLAVOR, 4, "maskBase64不能为空")
    task.prompt = str(prompt)
    code = sim.transient()
    if code is not None:
        return vo(FLAVOR, code, NO_ACCOUNT if code == 3 else SYSTEM_ERROR)
    if task.status != "MODAL":
        # Enqueued again, and skipped by the queue: only a task still waiting runs.
        return vo(FLAVOR, 1, "提交成功", task.key, discordInstanceId=task.instance_id)
    try:
        ahead = sim.admit("mjproxy", task.account, exempt=task.action == "UPSCALE")
    except SimError as err:
        return refused(FLAVOR, err)
    task.modal = {"prompt": task.prompt, "mask": mask if isinstance(mask, str) else None}
    return await enqueued(sim, FLAVOR, task, ahead)


async def cancel(request: Request) -> Response:
    """``POST [/mj-<mode>]/mj/task/{id}/cancel``: 200 with no body, known task or not."""
    gated = gate(request, "cancel")
    if isinstance(gated, Response):
        return gated
    sim, _, _ = gated
    task = sim.find("mjproxy", request.path_params["task_id"])
    if task is not None:
        sim.cancel(task)
    return empty(200)


ACTIONS = {"action": action, "modal": modal}
