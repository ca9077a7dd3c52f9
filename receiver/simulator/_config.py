"""What the simulator is told: its configuration, and the faults switchable at runtime.

Kept apart from the engine so the dialect modules, the CLI and the tests share one
definition, validated in one place (a bad fault is a 400 on ``POST /_sim/faults``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

_SECONDS = ("delay_callbacks", "submit_delay", "queue_wait")


def _check_fault(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} takes true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} takes a number")
    number = float(value)
    if name == "slow" and number <= 0:
        raise ValueError("slow is a multiplier above 0")
    if name in _SECONDS and number < 0:
        raise ValueError(f"{name} is seconds, 0 or more")
    if name != "slow" and name not in _SECONDS and not 0 <= number <= 1:
        raise ValueError(f"{name} is a probability between 0 and 1")
    return number


@dataclass(frozen=True)
class Faults:
    """What goes wrong, switchable at runtime (``POST /_sim/faults``).

    Probabilities are drawn per callback (drop, duplicate, resend) or per request (the rest).
    Each provider answers a fault in its own words (see its module)."""

    drop_callbacks: float = 0.0  # never sent
    duplicate_callbacks: float = 0.0  # sent twice in a row
    reorder_callbacks: bool = False  # each pair swapped: 2nd, 1st, 4th, 3rd, ...
    delay_callbacks: float = 0.0  # seconds between a state and its callback
    strip_callback_url: bool = False  # the relay ignores the URL: no callbacks at all
    submit_error_rate: float = 0.0  # submissions answered HTTP 500
    queue_full: bool = False  # every submission refused with the dialect's queue-full answer
    fail_tasks: float = 0.0  # tasks that end in FAILURE (after their second progress step)
    never_finish: bool = False  # tasks stop after their first progress step, until cleared
    slow: float = 1.0  # multiplier on the step interval
    # The provider does not know the task: novicezk 200 with no body, trueai 204, OhMyGPT
    # and AIGC2D 200 with no body; list-by-condition leaves the task out.
    empty_polls: bool = False
    submit_delay: float = 0.0  # seconds between queueing a submission and answering it
    queue_wait: float = 0.0  # seconds a task waits SUBMITTED (in the provider's queue)
    # No account free or a failed hand-over: mjproxy code 3 "无可用的账号实例" and code 9
    # "提交失败，系统异常" in turn; OhMyGPT and AIGC2D an HTTP 503.  # noqa: RUF003
    transient_errors: float = 0.0
    rate_limited: bool = False  # every request HTTP 429 (trueai: empty, as its middleware)
    logic_error: bool = False  # trueai: its LogicException, {success: false, code: -1, ...}
    ip_blacklisted: bool = False  # trueai: HTTP 403 with no body (its IP blacklist)
    # novicezk: an unchanged status:progress is posted again a moment later (its notify
    # pool only skips *older* states); trueai never does (it skips equal ones too).
    resend_unchanged: float = 0.0
    # The image links have expired, as Discord's CDN links do after about a day: every
    # /images/* answers 404 (Discord: "This content is no longer available.").
    expire_images: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_fault(f.name, getattr(self, f.name), type(f.default))

    def updated(self, changes: dict[str, Any]) -> Faults:
        """A copy with ``changes``; `ValueError` for an unknown name or a bad value."""
        known = {f.name: type(f.default) for f in fields(self)}
        for name in changes:
            if name not in known:
                raise ValueError(f"unknown fault {name!r} (known: {', '.join(known)})")
        return replace(self, **{n: _check_fault(n, v, known[n]) for n, v in changes.items()})


@dataclass(frozen=True)
class SimulatorConfig:
    step_interval: float = 0.3  # seconds between a task's states (times Faults.slow)
    steps: tuple[int, ...] = (10, 35, 60, 85)  # the IN_PROGRESS percentages
    seed: int | None = None  # for ids, hashes, probabilities and faults
    # OhMyGPT and AIGC2D: unfinished tasks per account, then queue full. mjproxy: the
    # account's concurrency (its coreSize, 3 by default there); tasks past it wait in a
    # queue of `mjproxy_queue_size` (code 22), and past that the queue is full.
    queue_limit: int | None = None
    mjproxy_queue_size: int = 10  # both relays' default queueSize
    faults: Faults = Faults()  # the faults at start and after a reset
    banned_words: tuple[str, ...] = ("banned",)  # a prompt holding one is banned
    # OhMyGPT callbacks: the task bare, wrapped in {"statusCode","message","data"}, or both
    # in turn (each task's first bare, second wrapped, ...).
    ohmygpt_callbacks: Literal["alternate", "bare", "wrapped"] = "alternate"
    # Which midjourney-proxy generation /mj/* speaks (see receiver.simulator._mjproxy).
    mjproxy_flavor: Literal["trueai", "novicezk"] = "trueai"
    # novicezk up to v2.6.1 answered the same upscale submitted twice with code 21 and the
    # first task's id; v2.6.2 (March 2024) removed the check. False plays v2.6.2+.
    novicezk_upscale_exists: bool = True
    public_url: str | None = None  # what image URLs start with; else the request's base URL
    # mjproxy: the keys it takes (empty: any), as its ApiAuthorizeInterceptor (novicezk) and
    # WorkContext (trueai) compare them; another key is a 401: novicezk's has no body,
    # trueai's says "Authorization header missing."
    api_keys: tuple[str, ...] = ()
    callback_timeout: float = 5.0
    max_connections: int = 100

    def __post_init__(self) -> None:
        if self.mjproxy_flavor not in ("trueai", "novicezk"):
            raise ValueError(f"mjproxy_flavor is trueai or novicezk, not {self.mjproxy_flavor!r}")
        if self.mjproxy_queue_size < 0:
            raise ValueError("mjproxy_queue_size is 0 or more")


class SimError(Exception):
    """A refused request; each dialect renders it in its own error shape."""

    def __init__(self, kind: Literal["invalid", "not_found", "queue_full", "banned", "mode"],
                 message: str, word: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.word = word
