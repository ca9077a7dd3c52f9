"""Provider dialects: each turns one provider's task payload into a canonical `Update`.

The three dialects differ in casing, id types, time formats and wrapping; everything the
canonical task does not name is still stored, since the raw body goes into the history.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import orjson

from receiver.core.errors import InvalidPayload
from receiver.core.models import TaskStatus, Update, iso

_UTC8 = timezone(timedelta(hours=8))
Parser = Callable[[bytes], Update]


def parse_mjproxy(body: bytes) -> Update:
    """midjourney-proxy's task (both generations, and relays)."""
    doc = _object(body)
    props = doc.get("properties")
    props = props if isinstance(props, dict) else {}
    status = _status(doc.get("status"))
    provider_task_id = _task_id(doc, "id", body)
    action = _upper(doc.get("action"))
    fail_reason = _str(doc.get("failReason"))
    if status is TaskStatus.FAILURE and fail_reason == _TRUEAI_CANCELED:
        status = TaskStatus.CANCEL  # trueai's POST /mj/task/{id}/cancel
    final_prompt = _str(props.get("finalPrompt")) or _str(doc.get("promptEn"))
    if action == "DESCRIBE":
        # The described text is the output; imageUrl is the image that was described.
        prompt, image_url, image_urls = None, None, None
        final_prompt = final_prompt or _str(doc.get("prompt"))
    else:
        prompt, image_url = _str(doc.get("prompt")), _str(doc.get("imageUrl"))
        image_urls = _urls(doc.get("imageUrls"), image_url)
    if "buttons" in doc:
        buttons = _buttons(doc["buttons"])
    elif status is TaskStatus.SUCCESS and action in _GRID_ACTIONS:
        buttons = _grid_buttons(provider_task_id)  # novicezk: its Task has no buttons
    else:
        buttons = None
    return Update(
        status=status,
        progress=_progress(doc.get("progress")),
        provider_task_id=provider_task_id,
        action=action,
        prompt=prompt,
        final_prompt=final_prompt,
        image_url=image_url,
        image_urls=image_urls,
        buttons=buttons,
        fail_reason=fail_reason,
        submitted_at=_epoch_ms(doc.get("submitTime")),
        started_at=_epoch_ms(doc.get("startTime")),
        finished_at=_epoch_ms(doc.get("finishTime")),
        raw=body,
    )


# trueai's cancel fails the task with exactly this reason (TaskController.Cancel).
_TRUEAI_CANCELED = "取消任务"
# The actions whose SUCCESS is a grid novicezk's /mj/submit/change accepts as a parent
# (SubmitController.change: IMAGINE, VARIATION, REROLL, BLEND).
_GRID_ACTIONS = frozenset({"IMAGINE", "VARIATION", "REROLL", "BLEND"})


def _grid_buttons(task_id: str) -> list[dict[str, str]]:
    """The grid's buttons in Midjourney's order (U1-U4, reroll, V1-V4), in the custom-id
    format trueai passes on from Discord (``MJ::JOB::upsample::1::<hash>``) with novicezk's
    task id in the hash's place, so a novicezk grid is pressed like a trueai one. Copies of
    the cached ones (the caller owns them); they are built once per id."""
    return [button.copy() for button in _grid_button_parts(task_id)]


@lru_cache(maxsize=1024)  # a grid's SUCCESS may be re-sent and re-fetched
def _grid_button_parts(task_id: str) -> tuple[dict[str, str], ...]:
    def button(custom_id: str, label: str, emoji: str = "") -> dict[str, str]:
        return {"custom_id": custom_id, "label": label, "emoji": emoji}

    return (
        *(button(f"MJ::JOB::upsample::{i}::{task_id}", f"U{i}") for i in range(1, 5)),
        button(f"MJ::JOB::reroll::0::{task_id}::SOLO", "", "\U0001f504"),  # 🔄
        *(button(f"MJ::JOB::variation::{i}::{task_id}", f"V{i}") for i in range(1, 5)),
    )


def parse_ohmygpt(body: bytes) -> Update:
    """OhMyGPT's task, bare or wrapped in ``data``."""
    doc = _object(body)
    # A callback may carry the task bare or wrapped like a query answer: {"data": {...}}.
    if "taskId" not in doc and isinstance(doc.get("data"), dict):
        doc = doc["data"]
    dc, s3 = _str(doc.get("imageDcUrl")), _str(doc.get("imageS3Url"))
    image_url = s3 or dc
    return _described(Update(
        status=_status(doc.get("status")),
        progress=_progress(doc.get("progress")),
        provider_task_id=_task_id(doc, "taskId", body, wrapped="data"),
        action=_upper(doc.get("action")),
        mode=_upper(doc.get("taskType")),
        prompt=_str(doc.get("prompt")),
        final_prompt=_str(doc.get("finalPrompt")),
        image_url=image_url,
        image_urls=[u for u in (s3, dc) if u] or None,
        buttons=_buttons(doc.get("actions")),
        fail_reason=_str(doc.get("failReason")),
        submitted_at=_iso_time(doc.get("submitTime")),
        started_at=_iso_time(doc.get("startTime")),
        finished_at=_iso_time(doc.get("finishTime")),
        raw=body,
    ))


def _described(update: Update) -> Update:
    """OhMyGPT and AIGC2D answer a DESCRIBE in ``prompt``: it is the output, not the input,
    and the image they name is the one that was described, not a result."""
    if update.action == "DESCRIBE":
        update.final_prompt = update.prompt or update.final_prompt
        update.prompt = update.image_url = update.image_urls = None
    return update


def parse_aigc2d(body: bytes) -> Update:
    """AIGC2D's task (times in UTC+8)."""
    doc = _object(body)
    status = _status(doc.get("status"))
    image_url = _str(doc.get("image_url")) or None  # "" means no image (yet)
    fail_reason = _str(doc.get("fail_reason")) or _str(doc.get("failReason"))
    if status is TaskStatus.FAILURE and not fail_reason:
        message = _str(doc.get("message"))
        fail_reason = message if message and message.lower() != "success" else None
    point = doc.get("point")
    cost = (
        {"amount": point, "unit": "points"}
        if isinstance(point, int | float) and not isinstance(point, bool)
        else None
    )
    return _described(Update(
        status=status,
        progress=_progress(doc.get("progress")),
        provider_task_id=_task_id(doc, "task_id", body),
        action=_upper(doc.get("action")),
        prompt=_str(doc.get("prompt")),
        image_url=image_url,
        image_urls=[image_url] if image_url else None,
        fail_reason=fail_reason,
        cost=cost,
        submitted_at=_utc8_time(doc.get("submit_time")),
        started_at=_utc8_time(doc.get("start_time")),
        finished_at=_utc8_time(doc.get("finish_time")),
        raw=body,
    ))


DIALECTS: dict[str, Parser] = {
    "mjproxy": parse_mjproxy,
    "ohmygpt": parse_ohmygpt,
    "aigc2d": parse_aigc2d,
}


# --- field helpers ---------------------------------------------------------------------


def _object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"the body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidPayload("the body is not a JSON object")
    return doc


def _status(value: Any) -> TaskStatus:
    if not isinstance(value, str):
        raise InvalidPayload("the task has no status")
    status = _STATUSES.get(value) or _STATUSES.get(value.strip().upper())
    if status is None:
        raise InvalidPayload(f"unknown task status {value[:40]!r}")
    return status


_STATUSES = {s.value: s for s in TaskStatus}


def _task_id(doc: dict[str, Any], key: str, body: bytes, wrapped: str | None = None) -> str:
    """The provider's id as an exact decimal string, however large the integer."""
    value = doc.get(key)
    if isinstance(value, float):
        # orjson turns integers past 64 bits into floats; the stdlib keeps them exact.
        try:
            exact = json.loads(body)
        except (RecursionError, ValueError) as exc:  # nested past the stdlib's limit
            raise InvalidPayload(f"the body cannot be read exactly: {exc}") from None
        if wrapped and key not in exact and isinstance(exact.get(wrapped), dict):
            exact = exact[wrapped]
        value = exact.get(key)
    if isinstance(value, bool) or value is None:
        raise InvalidPayload(f"the task has no {key}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= 128:
        return value.strip()
    raise InvalidPayload(f"{key} must be an integer or a non-empty string (not a fraction)")


def _str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _upper(value: Any) -> str | None:
    text = _str(value)
    return text.strip().upper() if text else None


def _progress(value: Any) -> int | None:
    """``"45%"``, ``45`` or ``"45"`` -> 45; ``""`` or nonsense -> None (keep the stored)."""
    if isinstance(value, str) and 1 < len(value) <= 5 and value[:-1].isascii() \
            and value[:-1].isdigit() and value[-1] == "%":
        return min(100, int(value[:-1]))  # the usual "45%"
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return max(0, min(100, value))  # also past what a float holds
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip().rstrip("%") or "nan")
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(number):
        return None  # out of range: the stored value stays
    return max(0, min(100, int(number)))


def _buttons(value: Any) -> list[dict[str, str]] | None:
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("customId"), str):
            out.append({
                "custom_id": item["customId"],
                "label": _str(item.get("label")) or "",
                "emoji": _str(item.get("emoji")) or "",
            })
    return out


def _urls(value: Any, first: str | None) -> list[str] | None:
    urls = [first] if first else []
    if isinstance(value, list):
        for item in value:
            url = item.get("url") if isinstance(item, dict) else item
            if isinstance(url, str) and url not in urls:
                urls.append(url)
    return urls or None


def _epoch_ms(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return _format_epoch_ms(value)


@lru_cache(maxsize=4096)  # a task's callbacks repeat its submit and start times
def _format_epoch_ms(value: float) -> str | None:
    try:
        return iso(datetime.fromtimestamp(value / 1000, UTC))
    except (OverflowError, OSError, ValueError):
        return None


def _iso_time(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return iso(dt if dt.tzinfo else dt.replace(tzinfo=UTC))


def _utc8_time(value: Any) -> str | None:
    """AIGC2D writes ``YYYY-MM-DD HH:MM:SS`` in Beijing time (UTC+8)."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.strptime(value.strip(), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    return iso(dt.replace(tzinfo=_UTC8))
