"""The canonical task's vocabulary: statuses, their order, event kinds, and an update."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    # We know of the task (URL minted, or queued by the submitter); the provider has not
    # acknowledged it yet.
    NOT_START = "NOT_START"
    # The provider accepted it into its queue.
    SUBMITTED = "SUBMITTED"
    # Running; ordered among themselves by progress 0..100.
    IN_PROGRESS = "IN_PROGRESS"
    # Waiting for a remix or inpaint dialog; ranks with IN_PROGRESS.
    MODAL = "MODAL"
    # Done, with images. Final.
    SUCCESS = "SUCCESS"
    # Failed. Final when the provider says so; not when we inferred it (a timeout).
    FAILURE = "FAILURE"
    # Canceled. Final.
    CANCEL = "CANCEL"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCEL)


class EventKind(StrEnum):
    CREATED = "task.created"
    SUBMITTED = "task.submitted"
    PROGRESS = "task.progress"
    SUCCEEDED = "task.succeeded"
    FAILED = "task.failed"
    CANCELED = "task.canceled"
    # After task.succeeded: the task's images are archived (`archived_image_url(s)` set).
    ARCHIVED = "task.archived"


EVENT_OF_STATUS: dict[TaskStatus, EventKind] = {
    TaskStatus.NOT_START: EventKind.CREATED,
    TaskStatus.SUBMITTED: EventKind.SUBMITTED,
    TaskStatus.IN_PROGRESS: EventKind.PROGRESS,
    TaskStatus.MODAL: EventKind.PROGRESS,
    TaskStatus.SUCCESS: EventKind.SUCCEEDED,
    TaskStatus.FAILURE: EventKind.FAILED,
    TaskStatus.CANCEL: EventKind.CANCELED,
}
def event_key(event_id: str | bytes) -> tuple[int, int]:
    """Event ids (``ms-seq``, ours: the tenant stream's and a task history's) in order."""
    text = event_id.decode() if isinstance(event_id, bytes) else event_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


# The events that end a task's event stream: its final state's, or (for a stream opened
# after its images were kept) the archive's, which only a SUCCESS has after it.
TERMINAL_EVENTS = frozenset({*(EVENT_OF_STATUS[s].value for s in TaskStatus if s.terminal),
                             EventKind.ARCHIVED.value})

# Ranks decide monotonicity: an update is stored only if it ranks above what is stored.
# IN_PROGRESS and MODAL take 200 + progress; an inferred failure ranks below every provider
# final, so a late provider SUCCESS (or FAILURE) still replaces it.
RANK_INFERRED_FAILURE = 900
RANK_FINAL = 1000


def rank(status: TaskStatus, progress: int | None, inferred: bool = False) -> int:
    """Where an update stands in a task's life: only a higher rank is stored."""
    if status is TaskStatus.NOT_START:
        return 0
    if status is TaskStatus.SUBMITTED:
        return 100
    if status in (TaskStatus.IN_PROGRESS, TaskStatus.MODAL):
        return 200 + (progress or 0)
    return RANK_INFERRED_FAILURE if inferred else RANK_FINAL


@dataclass(slots=True)
class Update:
    """What one provider payload says about a task, in canonical terms.

    ``None`` means "the payload did not say": the stored value is kept.
    """

    status: TaskStatus
    progress: int | None = None
    provider_task_id: str | None = None
    action: str | None = None
    mode: str | None = None
    prompt: str | None = None
    final_prompt: str | None = None
    image_url: str | None = None
    image_urls: list[str] | None = None
    buttons: list[dict[str, str]] | None = None
    fail_reason: str | None = None
    cost: dict[str, Any] | None = None
    submitted_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    inferred: bool = False
    # The provider's body as received, kept in the history so no field is ever dropped.
    raw: bytes = b""

    @property
    def rank(self) -> int:
        return rank(self.status, self.progress, self.inferred)

    def fields(self) -> dict[str, Any]:
        """The canonical fields this update sets (those it has a value for)."""
        out: dict[str, Any] = {"status": self.status.value}
        if self.status is TaskStatus.SUCCESS:
            # also over an inferred failure this replaces: its reason no longer holds
            out.update(progress=100, fail_reason=None)
        for name in UPDATE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.status.terminal and self.finished_at is None:
            out["finished_at"] = now_iso()
        return out


# The canonical fields an `Update` may carry, besides its status.
UPDATE_FIELDS = (
    "progress", "provider_task_id", "action", "mode", "prompt", "final_prompt",
    "image_url", "image_urls", "buttons", "fail_reason", "cost",
    "submitted_at", "started_at", "finished_at",
)


def iso(dt: datetime) -> str | None:
    """ISO 8601 UTC with milliseconds and a ``Z``: one format for every time we emit. None for
    a time that has no UTC form (year 1 in UTC+8, say)."""
    try:
        utc = dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    return (f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
            f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z")


def now_ms() -> int:
    """Epoch milliseconds."""
    return time.time_ns() // 1_000_000


def now_iso() -> str:
    """Formatted at most once per millisecond: every callback asks for it."""
    ms = now_ms()
    if ms != _now[0]:
        _now[:] = [ms, str(iso(datetime.fromtimestamp(ms / 1000, UTC)))]
    return str(_now[1])


_now: list[int | str] = [0, ""]


_last_id = [0, 0]  # the milliseconds and the random part of this process's newest job id


def new_job_id() -> str:
    """20 hex digits: 12 of milliseconds, 8 random. Sorting them sorts by creation time, and
    ids one process makes within a millisecond in the order it made them (the random part
    counts up from the millisecond's first, as in a monotonic ULID): listings are newest
    first even for tasks minted in one millisecond."""
    ms = int(time.time() * 1000)
    last_ms, last = _last_id
    if ms <= last_ms and last < 0xFFFFFFFF:
        ms, rand = last_ms, last + 1
    else:
        rand = secrets.randbits(31)  # room to count up within the millisecond
    _last_id[:] = [ms, rand]
    return f"{ms:012x}{rand:08x}"
