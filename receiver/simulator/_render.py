"""One task, four shapes: each provider's task object, in its callbacks and poll answers.

The two midjourney-proxy generations serialise differently, and receivers trip on exactly
that: novicezk's Jackson writes every field (nulls too) in raw UTF-8 and has no buttons;
trueai's System.Text.Json writes ~70 camelCase fields and escapes every non-ASCII and
HTML-sensitive character as ``\\uXXXX`` (its default JavaScriptEncoder).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from receiver.simulator._tasks import DESCRIBE_TEXT, DESCRIBE_TEXT_CRLF, SimTask

# Points charged per action (the AIGC2D seed's price table); refunded on failure.
AIGC2D_POINTS = {"IMAGINE": 100, "UPSCALE": 10, "VARIATION": 50, "DESCRIBE": 50, "BLEND": 100}
UTC8 = timezone(timedelta(hours=8))
JAVA_JSON = "application/json"
DOTNET_JSON = "application/json; charset=utf-8"


def render(task: SimTask) -> dict[str, Any]:
    """The task object as its provider shows it, in callbacks and in answers to a poll."""
    if task.provider == "mjproxy":
        return _trueai(task) if task.flavor == "trueai" else _novicezk(task)
    return _ohmygpt(task) if task.provider == "ohmygpt" else _aigc2d(task)


def encode(task: SimTask, doc: dict[str, Any] | list[Any]) -> tuple[bytes, str]:
    """The bytes and content type the provider sends ``doc`` with."""
    if task.provider == "mjproxy" and task.flavor == "trueai":
        return dotnet_json(doc), DOTNET_JSON
    return orjson.dumps(doc), JAVA_JSON  # orjson: raw UTF-8, ints past 2**53 exact


# System.Text.Json's default encoder: non-ASCII, controls and <>&'+`" as \uXXXX (upper-case
# hex, astral characters as surrogate pairs); \n \r \t \b \f and \\ stay short.
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_ESCAPE = frozenset("<>&'+`\"")


def _dotnet_str(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif 0x20 <= code < 0x7F and ch not in _ESCAPE:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
        else:
            out.append(f"\\u{code:04X}")
    out.append('"')
    return "".join(out)


def _dotnet(value: Any) -> str:
    if isinstance(value, str):
        return _dotnet_str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_dotnet_str(str(k))}:{_dotnet(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_dotnet(v) for v in value) + "]"
    return json.dumps(value)  # numbers, true, false, null


def dotnet_json(doc: Any) -> bytes:
    return _dotnet(doc).encode("ascii")


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def utc8(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC8).strftime("%Y-%m-%d %H:%M:%S")


def _mj_progress(t: SimTask) -> str | None:
    """Task.progress: unset while queued or parked, "0%" once SUBMITTED, "" on failure."""
    if t.status in ("NOT_START", "MODAL"):
        return None
    if t.status == "FAILURE":
        return ""
    return "100%" if t.status == "SUCCESS" else f"{t.progress}%"


def _properties(t: SimTask) -> dict[str, Any]:
    """The Task's properties map, filled as the relay fills it (SubmitController.newTask,
    the progress and success handlers); a key set to null is written as null."""
    props: dict[str, Any] = {"notifyHook": t.callback_url, "nonce": t.nonce,
                             "discordInstanceId": t.instance_id}
    if t.flavor == "trueai":
        props.update(discordChannelId=t.instance_id, botType="MID_JOURNEY")
        if t.custom_id:
            props["custom_id"] = t.custom_id
    if t.flavor == "novicezk" and t.referenced_message_id is not None:
        props["referencedMessageId"] = t.referenced_message_id  # the parent's message
    if t.final_prompt is not None or t.parent_final_prompt is not None:
        props["finalPrompt"] = t.final_prompt if t.final_prompt is not None \
            else t.parent_final_prompt
    if t.progress_message_id is not None:
        props["progressMessageId"] = t.progress_message_id
    if t.job is not None and t.status in ("IN_PROGRESS", "SUCCESS"):
        props["messageHash"] = t.job
    if t.status == "SUCCESS" and t.message_id is not None:
        props.update(messageId=t.message_id, flags=0)
    return props


def _prompts(t: SimTask) -> tuple[str | None, str | None]:
    """prompt and promptEn. A describe's text is the output: novicezk writes it in both,
    trueai only in promptEn (prompt stays null)."""
    if t.action == "DESCRIBE" and t.status == "SUCCESS":
        if t.flavor == "trueai":
            return None, DESCRIBE_TEXT_CRLF
        return DESCRIBE_TEXT, DESCRIBE_TEXT
    return t.prompt or None, t.prompt or None


def _novicezk(t: SimTask) -> dict[str, Any]:
    prompt, prompt_en = _prompts(t)
    # support/Task.java: these fields and no others (no buttons); Jackson writes nulls.
    return {
        "id": t.key, "properties": _properties(t), "action": t.action, "status": t.status,
        "prompt": prompt, "promptEn": prompt_en, "description": t.description,
        "state": t.state, "submitTime": _ms(t.submitted_at), "startTime": _ms(t.started_at),
        "finishTime": _ms(t.finished_at), "imageUrl": t.image_url,
        "progress": _mj_progress(t), "failReason": t.fail_reason,
    }


def _image_urls(t: SimTask) -> list[dict[str, str]] | None:
    if t.status != "SUCCESS" or t.action == "DESCRIBE" or t.image_url is None:
        return None
    count = 1 if t.action == "UPSCALE" else 4
    return [{"url": t.image(f"-{n}"), "thumbnail": t.image(f"-{n}-thumb")}
            for n in range(1, count + 1)]


def _trueai(t: SimTask) -> dict[str, Any]:
    """TaskInfo.cs as System.Text.Json writes it (its Newtonsoft [JsonIgnore] does not apply:
    computed isCompleted, displays, useTime... are written too)."""
    prompt, prompt_en = _prompts(t)
    mode = None if t.mode == "DEFAULT" else t.mode
    size = (1024, 1024) if t.status == "SUCCESS" and t.action != "DESCRIBE" else (None, None)
    use_time = "-" if t.started_at is None or t.finished_at is None else \
        f"{max(0.0, t.finished_at - t.started_at):.2f} s"
    return {
        "id": t.key, "parentId": t.parent_id, "botType": "MID_JOURNEY", "realBotType": None,
        "userId": None, "isWhite": False, "nonce": t.nonce, "interactionMetadataId": None,
        "messageId": t.message_id if t.status == "SUCCESS" else None,
        "remixModalMessageId": None, "remixAutoSubmit": t.modal is not None,
        "remixModaling": False, "instanceId": t.instance_id, "subInstanceId": None,
        "messageIds": [m for m in (t.progress_message_id,) if m], "action": t.action,
        "status": t.status, "isCompleted": t.status in ("SUCCESS", "FAILURE", "CANCEL"),
        "prompt": prompt, "promptEn": prompt_en,
        "promptFull": t.final_prompt if t.status == "SUCCESS" else None,
        "description": t.description, "language": None, "state": t.state,
        "submitTime": _ms(t.submitted_at), "startTime": _ms(t.started_at),
        "finishTime": _ms(t.finished_at), "imageUrl": t.image_url, "baseImageUrl": None,
        "imageUrls": _image_urls(t),
        "thumbnailUrl": t.image("-thumb") if t.status == "SUCCESS" and t.image_url else None,
        "progress": _mj_progress(t), "failReason": t.fail_reason,
        "hasAIReviewRetried": False, "isThirdParty": False, "isPartner": False,
        "isPartnerRelax": False, "partnerTaskId": None, "partnerTaskInfo": None,
        "isOfficial": False, "officialTaskId": None, "officialTaskInfo": None,
        "isDiscord": True,
        "buttons": [{"customId": b.custom_id, "emoji": b.emoji, "label": b.label,
                     "style": 2, "type": 2} for b in t.buttons],
        "displays": {"status": t.status, "submitTime": utc8(t.submitted_at),
                     "startTime": utc8(t.started_at), "finishTime": utc8(t.finished_at),
                     "action": t.action, "discordInstanceId": t.instance_id},
        "seed": None, "seedError": None, "seedMessageId": None, "clientIp": "127.0.0.1",
        "jobId": t.job if t.status == "SUCCESS" else None, "isReplicate": False,
        "replicateSource": None, "replicateTarget": None, "mode": mode, "requestMode": mode,
        "accountFilter": {"instanceId": None, "modes": [mode] if mode else [], "remix": None,
                          "nijiRemix": None, "remixAutoConsidered": None, "remark": None},
        "url": None, "proxyUrl": None, "height": size[1], "width": size[0], "size": None,
        "contentType": "image/png" if size[0] else None, "imageHeight": size[1],
        "imageWidth": size[0], "videoGenOriginImageUrl": None, "videoDuration": None,
        "frameCount": None, "videoUrl": None, "videoUrls": None, "useTime": use_time,
        "version": "v 7", "storageOption": None, "videoType": None, "isHdVideo": False,
        "properties": _properties(t),
    }


def _ohmygpt(t: SimTask) -> dict[str, Any]:
    return {
        "taskId": t.id, "taskType": t.mode, "status": t.status, "action": t.action,
        "progress": f"{t.progress}%", "description": t.description,
        "prompt": t.final_prompt or t.prompt, "failReason": t.fail_reason,
        "submitTime": _iso(t.submitted_at), "startTime": _iso(t.started_at),
        "finishTime": _iso(t.finished_at), "webhookUrl": t.callback_url,
        "imageDcUrl": t.image_url, "imageS3Url": None,
        "actions": [{"customId": b.custom_id, "emoji": b.emoji, "label": b.label}
                    for b in t.buttons],
    }


def _aigc2d(t: SimTask) -> dict[str, Any]:
    price = AIGC2D_POINTS.get(t.action, 0)
    doc: dict[str, Any] = {
        "code": 0, "message": "success", "task_id": t.id, "action": t.action,
        "prompt": t.final_prompt or t.prompt, "state": t.state or "",
        "submit_time": utc8(t.submitted_at), "start_time": utc8(t.started_at),
        "finish_time": utc8(t.finished_at), "status": t.status,
        "progress": f"{t.progress}%", "image_url": t.image_url, "point": price,
    }
    if t.status == "FAILURE":  # points are refunded: nothing charged, the refund named
        doc.update(point=0, refund_point=price, fail_reason=t.fail_reason)
    return doc


def wrap_ohmygpt(task: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "message": "Success", "data": task}
