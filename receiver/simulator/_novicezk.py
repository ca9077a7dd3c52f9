"""novicezk/midjourney-proxy's actions: ``/mj/submit/change`` and ``/mj/submit/simple-change``.

No buttons: a grid's U1-U4, V1-V4 and reroll are named by action and index, and checked as
SubmitController.change checks them (taskId, action, the same upscale already submitted,
the parent known, SUCCESS, and an IMAGINE, VARIATION, REROLL or BLEND).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver.simulator._engine import Simulator
from receiver.simulator._mjproxy import (
    NOT_FOUND_PARENT,
    place,
    spec_of,
    spring_error,
    vo,
)
from receiver.simulator._tasks import DISCORD_REFUSED

FLAVOR = "novicezk"
TASK_ACTIONS = ("IMAGINE", "UPSCALE", "VARIATION", "REROLL", "DESCRIBE", "BLEND")
CHANGES = ("UPSCALE", "VARIATION", "REROLL")
PARENTS = frozenset({"IMAGINE", "VARIATION", "REROLL", "BLEND"})


def _index(value: Any) -> int | None:
    """Jackson's Integer: a number or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


async def change(request: Request, sim: Simulator, flavor: str, account: str,
                 doc: dict[str, Any]) -> Response:
    task_id = doc.get("taskId")
    if not isinstance(task_id, str) or not task_id.strip():
        return vo(FLAVOR, 4, "taskId不能为空")
    action = doc.get("action")
    if action is not None and action not in TASK_ACTIONS:
        # Jackson cannot read the enum: Spring answers 400 before the controller runs
        return spring_error(400, "Bad Request", request.url.path)
    if action not in CHANGES:
        return vo(FLAVOR, 4, "action参数错误")
    index = _index(doc.get("index"))
    description = f"/up {task_id} " + ("R" if action == "REROLL" else f"{action[0]}{index}")
    if action == "UPSCALE" and sim.config.novicezk_upscale_exists:
        # v2.6.1 and before: the same upscale again is answered with the first one
        for known in sim.tasks.values():
            if known.provider == "mjproxy" and known.description == description:
                return vo(FLAVOR, 21, "任务已存在", known.key, status=known.status,
                          imageUrl=known.image_url)
    parent = sim.find("mjproxy", task_id)
    if parent is None:
        return vo(FLAVOR, 3, NOT_FOUND_PARENT)
    if parent.status != "SUCCESS":
        return vo(FLAVOR, 4, "关联任务状态错误")
    if parent.action not in PARENTS:
        return vo(FLAVOR, 4, "关联任务不允许执行变化")
    if action != "REROLL" and index is None:
        # submitUpscale(..., changeDTO.getIndex(), ...) unboxes a null Integer
        return spring_error(500, "Internal Server Error", request.url.path)
    refused = action != "REROLL" and not 1 <= (index or 0) <= 4  # Discord refuses it
    spec = spec_of(sim, request, account, action, doc, prompt=parent.prompt, parent=parent,
                   description=description, fail_at_start=DISCORD_REFUSED if refused else None)
    return await place(sim, FLAVOR, spec, instance_error=f"账号不可用: {parent.instance_id}")


async def simple_change(request: Request, sim: Simulator, flavor: str, account: str,
                        doc: dict[str, Any]) -> Response:
    """``{content: "<id> U1"}``: ConvertUtils.convertChangeParams, then change()."""
    content = doc.get("content")
    parts = content.split(" ") if isinstance(content, str) else []
    if len(parts) != 2 or not parts[1]:
        return vo(FLAVOR, 4, "content参数错误")
    word = parts[1].lower()
    change_doc: dict[str, Any] = {"taskId": parts[0], "state": doc.get("state"),
                                  "notifyHook": doc.get("notifyHook")}
    if word == "r":
        change_doc["action"] = "REROLL"
    elif word[0] in "uv" and len(word) > 1 and word[1].isdigit() and 1 <= int(word[1]) <= 4:
        change_doc.update(action="UPSCALE" if word[0] == "u" else "VARIATION",
                          index=int(word[1]))  # (its substring(1, 2): "U12" is U1)
    else:
        return vo(FLAVOR, 4, "content参数错误")
    return await change(request, sim, flavor, account, change_doc)


ACTIONS = {"change": change, "simple-change": simple_change}
