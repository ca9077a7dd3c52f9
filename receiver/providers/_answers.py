"""Every documented answer of every provider, classified in one table per provider.

A row matches an answer by its code (the provider's ``code``/``statusCode``, or the HTTP
status where the body has none) and, where one code means several things, by words of its
message. The first matching row decides. The sources of each row are in ../shared/PROVIDERS.md;
OhMyGPT's and AIGC2D's error bodies are not published, so theirs match by status and words.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from receiver.providers._errors import (
    BadProviderKey,
    BannedPrompt,
    InvalidRequest,
    ModeMismatch,
    ProviderError,
    QueueFull,
    Transient,
    UnknownParent,
)


class Outcome(StrEnum):
    # Accepted: the answer carries the provider's task id.
    SUBMITTED = "submitted"
    # Accepted into the provider's own wait queue (midjourney-proxy code 22).
    QUEUED = "queued"
    # The same change was submitted already (novicezk code 21): the answer names that task.
    EXISTS = "exists"
    # Parked until a dialog is completed (trueai code 21: POST /mj/submit/modal).
    DIALOG = "dialog"
    # The account's queue is full: retry later, in the task's place.
    QUEUE_FULL = "queue_full"
    # Refused for now (no account instance, a system error, a rate limit): retry with backoff.
    TRANSIENT = "transient"
    # Refused for good: the prompt has a banned word.
    BANNED = "banned"
    # Refused for good: the parent task is unknown to the provider.
    UNKNOWN_PARENT = "unknown_parent"
    # Refused for good: an action in another mode than its parent's.
    MODE_MISMATCH = "mode_mismatch"
    # Refused for good, for the reason the provider gives.
    REFUSED = "refused"
    # Our key (or address) is refused: pause the account.
    AUTH = "auth"


ACCEPTED = frozenset({Outcome.SUBMITTED, Outcome.QUEUED, Outcome.EXISTS, Outcome.DIALOG})


@dataclass(frozen=True)
class Row:
    code: int | None  # None: any code
    outcome: Outcome
    words: tuple[str, ...] = ()  # any of them, in the lowercased message; () matches all


MJPROXY: dict[str, tuple[Row, ...]] = {
    # novicezk ReturnCode.java, SubmitController.java, DiscordInstanceImpl.submitTask,
    # TaskServiceImpl.java
    "novicezk": (
        Row(1, Outcome.SUBMITTED),
        Row(22, Outcome.QUEUED),  # 排队中: properties.numberOfQueues
        Row(21, Outcome.EXISTS),  # 任务已存在: result is the existing task's id
        Row(23, Outcome.QUEUE_FULL),  # 队列已满, 请稍后尝试
        Row(24, Outcome.BANNED),  # 可能包含敏感词, properties.bannedWord
        # no account instance, or the parent's instance is down (账号不可用): for now
        Row(3, Outcome.TRANSIENT, ("无可用的账号实例", "账号不可用")),
        Row(3, Outcome.UNKNOWN_PARENT),  # 关联任务不存在或已失效
        Row(9, Outcome.TRANSIENT),  # 提交失败, 系统异常: the executor refused, nothing queued
        Row(401, Outcome.AUTH),  # ApiAuthorizeInterceptor: 401, empty body
        Row(403, Outcome.AUTH),
        Row(429, Outcome.TRANSIENT),
        Row(None, Outcome.REFUSED),  # 4 validation, and anything else
    ),
    # trueai ReturnCode.cs, SubmitController.cs, TaskService.cs (21 ~line 1700),
    # DiscordService.cs (queue full), CustomLogicExceptionFilterAttribute.cs, WorkContext.cs
    "trueai": (
        Row(1, Outcome.SUBMITTED),
        Row(22, Outcome.QUEUED),
        Row(21, Outcome.DIALOG),  # Waiting for window confirm: the task is MODAL
        Row(9, Outcome.QUEUE_FULL, ("队列已满", "queue full")),  # 提交失败, 队列已满, 请稍后重试
        Row(23, Outcome.QUEUE_FULL),  # unused by trueai, kept for the plus edition
        Row(24, Outcome.BANNED),
        Row(3, Outcome.TRANSIENT, ("无可用的账号实例", "账号不可用")),
        Row(3, Outcome.UNKNOWN_PARENT),  # HTTP 404 {code: 3, 关联任务不存在或已失效}
        Row(9, Outcome.TRANSIENT),  # 提交失败, 系统异常
        Row(401, Outcome.AUTH),
        Row(403, Outcome.AUTH),  # IP blacklist: 403, empty body
        Row(429, Outcome.TRANSIENT),  # rate limit: 429, empty body
        # SubmitController.cs NewTask: the relay user's (or a guest's) CoreSize and QueueSize
        # are full; a LogicException like the others below, but over once a task ends
        Row(-1, Outcome.QUEUE_FULL, ("并发数已达上限", "队列数已达上限")),
        Row(-1, Outcome.REFUSED),  # LogicException {success: false, code: -1, message}
        Row(None, Outcome.REFUSED),
    ),
}

# OhMyGPT: {"statusCode", "message", "data"}; its error bodies are not published (only the
# status and the words can be matched: PROVIDERS.md).
OHMYGPT: tuple[Row, ...] = (
    Row(200, Outcome.SUBMITTED),
    Row(401, Outcome.AUTH),
    Row(403, Outcome.AUTH),
    Row(None, Outcome.QUEUE_FULL, ("queue full", "queue is full", "too many unfinished",
                                   "队列已满")),
    Row(429, Outcome.QUEUE_FULL),
    Row(None, Outcome.BANNED, ("banned", "sensitive", "敏感")),
    Row(None, Outcome.AUTH, ("api key", "apikey", "invalid key", "unauthorized",
                             "permission")),
    Row(None, Outcome.MODE_MISMATCH, ("mode mismatch", "mode does not match")),
    Row(404, Outcome.UNKNOWN_PARENT),
    Row(None, Outcome.UNKNOWN_PARENT, ("not found", "不存在")),
    Row(503, Outcome.TRANSIENT),
    Row(None, Outcome.REFUSED),
)

# AIGC2D: {"code", "message", "task_id"}, code 0 accepted; the rest is our assumption
# (README, "AIGC2D assumptions").
AIGC2D: tuple[Row, ...] = (
    Row(0, Outcome.SUBMITTED),
    *(row for row in OHMYGPT if row.code != 200),
)


def classify(rows: tuple[Row, ...], code: int | None, message: str) -> Outcome:
    """The first row that matches ``code`` and ``message``."""
    text = message.lower()
    for row in rows:
        if row.code is not None and row.code != code:
            continue
        if not row.words or any(word in text for word in row.words):
            return row.outcome
    return Outcome.REFUSED


_ERRORS: dict[Outcome, type[ProviderError]] = {
    Outcome.QUEUE_FULL: QueueFull,
    Outcome.TRANSIENT: Transient,
    Outcome.AUTH: BadProviderKey,
    Outcome.UNKNOWN_PARENT: UnknownParent,
    Outcome.MODE_MISMATCH: ModeMismatch,
    Outcome.REFUSED: InvalidRequest,
}


def refusal(outcome: Outcome, provider: str, message: str,
            banned_word: str | None = None) -> ProviderError:
    """The error for an answer that is not accepted, with the provider's words kept."""
    detail = f"{provider}: {message}"
    if outcome is Outcome.BANNED:
        return BannedPrompt(detail, provider, banned_word)
    return _ERRORS.get(outcome, InvalidRequest)(detail, provider)
