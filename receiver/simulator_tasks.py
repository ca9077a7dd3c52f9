"""The provider side of the simulator: tasks, their lifecycle, callbacks, faults, accounting.

`receiver.simulator` puts the three dialects' HTTP in front of this. The engine is shared:
a task is one `SimTask`, one asyncio task walks it through its states, and each state is
rendered in the task's dialect (`render`) and handed to a per-task sender, so callbacks
leave in order unless a fault says otherwise. Randomness comes from one seeded
`random.Random`, so a test that sets a seed sees the same ids, buttons and faults each run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, NamedTuple

import httpx
import orjson

from receiver.logs import redact

log = logging.getLogger("receiver.simulator")

AIGC2D_FIRST_ID = 442275063214085100  # past 2**53: JavaScript numbers cannot hold it
# Points charged per action (the AIGC2D seed's price table); refunded on failure.
AIGC2D_POINTS = {"IMAGINE": 100, "UPSCALE": 10, "VARIATION": 50, "DESCRIBE": 50, "BLEND": 100}
_UTC8 = timezone(timedelta(hours=8))
_DESCRIBE_LINES = (
    "a small cat on a sunny windowsill, soft watercolor, pastel colors --ar 1:1",
    "an orange tabby looking out of a window, morning light, cozy interior --ar 1:1",
    "minimalist illustration of a cat by a window, flat colors, calm mood --ar 1:1",
    "photograph of a cat in warm sunlight, shallow depth of field, film grain --ar 1:1",
)
DESCRIBE_TEXT = "\n\n".join(
    f"{n} {line}" for n, line in zip(("1️⃣", "2️⃣", "3️⃣", "4️⃣"), _DESCRIBE_LINES, strict=True)
)
FAIL_REASON = "[Simulated failure] Midjourney could not finish this job"


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

    Probabilities are drawn per callback (drop, duplicate) or per submission (the rest)."""

    drop_callbacks: float = 0.0  # never sent
    duplicate_callbacks: float = 0.0  # sent twice in a row
    reorder_callbacks: bool = False  # each pair swapped: 2nd, 1st, 4th, 3rd, ...
    delay_callbacks: float = 0.0  # seconds between a state and its callback
    strip_callback_url: bool = False  # the relay ignores the URL: no callbacks at all
    submit_error_rate: float = 0.0  # submissions answered HTTP 500
    queue_full: bool = False  # every submission refused with the dialect's queue-full error
    fail_tasks: float = 0.0  # tasks that end in FAILURE (after their second progress step)
    never_finish: bool = False  # tasks stop after their first progress step, until cleared
    slow: float = 1.0  # multiplier on the step interval
    empty_polls: bool = False  # polls answered 200 with no body (a forgotten task)
    submit_delay: float = 0.0  # seconds between queueing a submission and answering it
    queue_wait: float = 0.0  # seconds a task waits SUBMITTED (in the provider's queue)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_fault(f.name, getattr(self, f.name), type(f.default))

    def updated(self, changes: Mapping[str, Any]) -> Faults:
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
    seed: int | None = None  # for ids' hashes, probabilities and faults
    queue_limit: int | None = None  # unfinished tasks per account; then queue full
    faults: Faults = Faults()  # the faults at start and after a reset
    banned_words: tuple[str, ...] = ("banned",)  # refused at submit, the word named
    # OhMyGPT callbacks: the task bare, wrapped in {"statusCode","message","data"}, or both
    # in turn (each task's first bare, second wrapped, ...).
    ohmygpt_callbacks: Literal["alternate", "bare", "wrapped"] = "alternate"
    public_url: str | None = None  # what image URLs start with; else the request's base URL
    callback_timeout: float = 5.0
    max_connections: int = 100


class SimError(Exception):
    """A refused submission; each dialect renders it in its own error shape."""

    def __init__(self, kind: Literal["invalid", "not_found", "queue_full", "banned", "mode"],
                 message: str, word: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.word = word


class Button(NamedTuple):
    custom_id: str
    label: str
    emoji: str


def grid_buttons(job: str) -> list[Button]:
    """What an image grid offers, in Midjourney's order: U1-U4, reroll, V1-V4."""
    return (
        [Button(f"MJ::JOB::upsample::{i}::{job}", f"U{i}", "") for i in range(1, 5)]
        + [Button(f"MJ::JOB::reroll::0::{job}::SOLO", "", "🔄")]
        + [Button(f"MJ::JOB::variation::{i}::{job}", f"V{i}", "") for i in range(1, 5)]
    )


def upscaled_buttons(job: str) -> list[Button]:
    return [
        Button(f"MJ::JOB::high_variation::1::{job}::SOLO", "Vary (Strong)", "🪄"),
        Button(f"MJ::JOB::low_variation::1::{job}::SOLO", "Vary (Subtle)", "🪄"),
        Button(f"MJ::Outpaint::50::1::{job}::SOLO", "Zoom Out 2x", "🔍"),
        Button(f"MJ::Outpaint::75::1::{job}::SOLO", "Zoom Out 1.5x", "🔍"),
        *(Button(f"MJ::JOB::pan_{d}::1::{job}::SOLO", "", e)
          for d, e in (("left", "⬅️"), ("right", "➡️"), ("up", "⬆️"), ("down", "⬇️"))),
    ]


@dataclass(frozen=True)
class Submission:
    """A validated request, in the engine's terms (the dialect layer builds it)."""

    provider: str
    account: str
    mode: str
    action: str
    base_url: str
    prompt: str = ""
    callback_url: str | None = None
    state: str = ""
    parent: SimTask | None = None
    button: Button | None = None


class _Outgoing(NamedTuple):
    url: str
    body: bytes
    due: float  # loop time


@dataclass(eq=False)
class SimTask:
    provider: str
    id: int | str
    account: str
    mode: str
    action: str
    prompt: str
    description: str
    callback_url: str | None
    base_url: str
    submitted_at: float
    state: str = ""
    parent_id: str | None = None
    status: str = "SUBMITTED"
    progress: int = 0
    image_url: str | None = None
    final_prompt: str | None = None
    fail_reason: str | None = None
    buttons: list[Button] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    fails: bool = False
    emitted: int = 0  # states rendered for callbacks (OhMyGPT alternates its wrapping)
    held: _Outgoing | None = None  # reorder: the callback that goes after the next one
    outbox: asyncio.Queue[_Outgoing | None] | None = None

    @property
    def key(self) -> str:
        return str(self.id)

    def image(self, suffix: str = "") -> str:
        return f"{self.base_url}/images/{self.provider}-{self.key}{suffix}.png"


# --- rendering: one task, three dialects ------------------------------------------------


def render(task: SimTask) -> dict[str, Any]:
    """The task object as its provider shows it, in callbacks and in answers to a poll."""
    return _RENDERERS[task.provider](task)


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _utc8(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, _UTC8).strftime("%Y-%m-%d %H:%M:%S")


def _mjproxy(t: SimTask) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if t.callback_url:
        properties["notifyHook"] = t.callback_url
    if t.final_prompt:
        properties["finalPrompt"] = t.final_prompt
    return {
        "id": t.key, "action": t.action, "status": t.status, "prompt": t.prompt,
        "promptEn": t.final_prompt or t.prompt, "description": t.description,
        "state": t.state, "submitTime": _ms(t.submitted_at), "startTime": _ms(t.started_at),
        "finishTime": _ms(t.finished_at),
        "progress": "" if t.status == "FAILURE" else f"{t.progress}%",
        "imageUrl": t.image_url, "failReason": t.fail_reason, "properties": properties,
        "buttons": [{"customId": b.custom_id, "emoji": b.emoji, "label": b.label,
                     "type": 2, "style": 2} for b in t.buttons],
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
        "prompt": t.final_prompt or t.prompt, "state": t.state,
        "submit_time": _utc8(t.submitted_at), "start_time": _utc8(t.started_at),
        "finish_time": _utc8(t.finished_at), "status": t.status,
        "progress": f"{t.progress}%", "image_url": t.image_url, "point": price,
    }
    if t.status == "FAILURE":  # points are refunded: nothing charged, the refund named
        doc.update(point=0, refund_point=price, fail_reason=t.fail_reason)
    return doc


_RENDERERS = {"mjproxy": _mjproxy, "ohmygpt": _ohmygpt, "aigc2d": _aigc2d}


def wrap_ohmygpt(task: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "message": "Success", "data": task}


# --- the engine ---------------------------------------------------------------------------


class Simulator:
    """Every task of every provider, their lifecycles, the faults and the counters."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.tasks: dict[tuple[str, str], SimTask] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._progressing = asyncio.Event()  # cleared while never_finish holds tasks
        self._set_progressing()
        # Ids keep counting across resets, so a receiver never sees one id twice.
        mj_base = int(time.time() * 1000) * 1000
        self._ids: dict[str, itertools.count[int]] = {
            "mjproxy": itertools.count(mj_base + 1), "ohmygpt": itertools.count(1),
            "aigc2d": itertools.count(AIGC2D_FIRST_ID)}
        self._banned = [(w, re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE))
                        for w in config.banned_words]
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.callback_timeout, connect=2.0),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=min(20, config.max_connections)),
            headers={"Content-Type": "application/json", "User-Agent": "receiver-simulator"},
            trust_env=False,  # no proxy from the environment: callbacks go where they say
        )
        self._zero_stats()

    def _zero_stats(self) -> None:
        self.submitted = 0
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.by_mode: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.by_action: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.callbacks = Counter[str]()  # sent, dropped, failed

    def stats(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "in_flight": dict(self.in_flight),
            "max_in_flight": dict(self.max_in_flight),
            "callbacks_sent": self.callbacks["sent"],
            "callbacks_dropped": self.callbacks["dropped"],
            "callbacks_failed": self.callbacks["failed"],
            "by_mode": {p: dict(c) for p, c in self.by_mode.items()},
            "by_action": {p: dict(c) for p, c in self.by_action.items()},
        }

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self._set_progressing()

    def _set_progressing(self) -> None:
        if self.faults.never_finish:
            self._progressing.clear()
        else:
            self._progressing.set()

    async def reset(self) -> None:
        """Forget every task and counter; faults and randomness back to the config's."""
        await self._cancel_all()
        self.tasks.clear()
        self._zero_stats()
        self.rng.seed(self.config.seed)
        self.set_faults(self.config.faults)

    async def stop(self) -> None:
        await self._cancel_all()
        await self.http.aclose()

    async def _cancel_all(self) -> None:
        running = list(self._running)
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._running.clear()

    def chance(self, probability: float) -> bool:
        # 0 and 1 draw nothing, so one probabilistic fault does not shift another's draws.
        return probability >= 1 or (probability > 0 and self.rng.random() < probability)

    async def answer_delay(self) -> None:
        """The `submit_delay` fault: the task is queued, its answer is late."""
        if self.faults.submit_delay > 0:
            await asyncio.sleep(self.faults.submit_delay)

    # --- submission ---------------------------------------------------------------------

    def find(self, provider: str, task_id: str) -> SimTask | None:
        return self.tasks.get((provider, task_id))

    def parent(self, provider: str, task_id: str, custom_id: str | None = None,
               label: str | None = None) -> tuple[SimTask, Button]:
        """The finished task an action acts on, and the button pressed (by id or label)."""
        task = self.find(provider, task_id)
        if task is None:
            raise SimError("not_found", f"task {task_id} not found")
        if task.status != "SUCCESS":
            raise SimError("invalid", f"task {task_id} is {task.status}, not SUCCESS")
        for button in task.buttons:
            if custom_id is not None and button.custom_id == custom_id:
                return task, button
            if label is not None and button.label == label:
                return task, button
        raise SimError("invalid", f"task {task_id} has no button {custom_id or label}")

    def banned_word(self, prompt: str) -> str | None:
        return next((word for word, pattern in self._banned if pattern.search(prompt)), None)

    def submit(self, spec: Submission) -> SimTask:
        """Queue a task and start its lifecycle; `SimError` for a banned word or a full queue."""
        word = self.banned_word(spec.prompt)
        if word is not None:
            raise SimError("banned", f'banned prompt: the word "{word}" is not allowed', word)
        limit = self.config.queue_limit
        if self.faults.queue_full or (limit is not None and self.in_flight[spec.account] >= limit):
            raise SimError("queue_full", "queue full: too many unfinished tasks, try later")
        task = SimTask(
            provider=spec.provider, id=next(self._ids[spec.provider]), account=spec.account,
            mode=spec.mode, action=spec.action,
            prompt=spec.prompt or (spec.parent.prompt if spec.parent else ""),
            description=_description(spec), submitted_at=time.time(),
            callback_url=None if self.faults.strip_callback_url else spec.callback_url,
            base_url=spec.base_url, state=spec.state,
            parent_id=spec.parent.key if spec.parent else None,
            fails=self.chance(self.faults.fail_tasks),
        )
        self.tasks[(task.provider, task.key)] = task
        self.submitted += 1
        self.in_flight[task.account] += 1
        self.max_in_flight[task.account] = max(self.max_in_flight[task.account],
                                               self.in_flight[task.account])
        self.by_mode[task.provider][task.mode] += 1
        self.by_action[task.provider][task.action] += 1
        if task.callback_url:
            task.outbox = asyncio.Queue()
            self._spawn(self._send_all(task.outbox))
        self._spawn(self._run(task))
        return task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        job: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    # --- lifecycle ----------------------------------------------------------------------

    async def _run(self, task: SimTask) -> None:
        steps = self.config.steps
        fail_at = min(2, len(steps)) if task.fails else None
        try:
            self._emit(task)  # SUBMITTED, progress 0%
            if self.faults.queue_wait > 0:
                await asyncio.sleep(self.faults.queue_wait)
            for n, percent in enumerate(steps):
                await self._pause(task, hold=n > 0)
                if n == fail_at:
                    break
                task.status, task.progress = "IN_PROGRESS", percent
                task.started_at = task.started_at or time.time()
                if task.action != "DESCRIBE":
                    task.image_url = task.image(f"-{percent}")
                self._emit(task)
            else:
                await self._pause(task, hold=True)
            self._finish(task)
        finally:
            if task.outbox is not None:
                self._release_held(task)
                task.outbox.put_nowait(None)

    async def _pause(self, task: SimTask, hold: bool) -> None:
        await asyncio.sleep(self.config.step_interval * self.faults.slow)
        if hold and not self._progressing.is_set():
            self._release_held(task)  # what was sent so far, sent in full
            await self._progressing.wait()

    def _finish(self, task: SimTask) -> None:
        task.finished_at = time.time()
        task.started_at = task.started_at or task.finished_at
        job = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        if task.fails:
            task.status, task.fail_reason, task.image_url = "FAILURE", FAIL_REASON, None
        elif task.action == "DESCRIBE":
            task.status, task.progress, task.image_url = "SUCCESS", 100, None
            task.prompt = task.final_prompt = DESCRIBE_TEXT
        else:
            task.status, task.progress, task.image_url = "SUCCESS", 100, task.image()
            task.final_prompt = task.prompt or None
            task.buttons = upscaled_buttons(job) if task.action == "UPSCALE" else grid_buttons(job)
        self.in_flight[task.account] -= 1
        self._emit(task)

    # --- callbacks ----------------------------------------------------------------------

    def _emit(self, task: SimTask) -> None:
        """Render the task's state now and queue it for its callback URL, faults applied."""
        if task.outbox is None or task.callback_url is None:
            return
        doc = render(task)
        wrapping = self.config.ohmygpt_callbacks
        if task.provider == "ohmygpt" and (
                wrapping == "wrapped" or (wrapping == "alternate" and task.emitted % 2)):
            doc = wrap_ohmygpt(doc)
        task.emitted += 1
        if self.chance(self.faults.drop_callbacks):
            self.callbacks["dropped"] += 1
            return
        due = asyncio.get_running_loop().time() + self.faults.delay_callbacks
        item = _Outgoing(task.callback_url, orjson.dumps(doc), due)
        items = [item, item] if self.chance(self.faults.duplicate_callbacks) else [item]
        if self.faults.reorder_callbacks and task.held is None:
            task.held, items = items[-1], items[:-1]
        elif task.held is not None:
            # swapped: this state first, then the one held back
            items = [*items, task.held] if self.faults.reorder_callbacks else [task.held, *items]
            task.held = None
        for each in items:
            task.outbox.put_nowait(each)

    def _release_held(self, task: SimTask) -> None:
        if task.held is not None and task.outbox is not None:
            task.outbox.put_nowait(task.held)
            task.held = None

    async def _send_all(self, outbox: asyncio.Queue[_Outgoing | None]) -> None:
        """One task's callbacks, one at a time, so they arrive in the order they were queued."""
        loop = asyncio.get_running_loop()
        while (item := await outbox.get()) is not None:
            wait = item.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._post(item)

    async def _post(self, item: _Outgoing) -> None:
        self.callbacks["sent"] += 1
        # No retry: none of the real providers retries a failed delivery.
        try:
            response = await self.http.post(item.url, content=item.body)
        except httpx.HTTPError as exc:
            self.callbacks["failed"] += 1
            log.warning("callback to %s failed: %r", redact(item.url), exc)
            return
        if not response.is_success:
            self.callbacks["failed"] += 1
            log.warning("callback to %s answered %d", redact(item.url), response.status_code)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every task in brief, for tests that check what a submitter sent."""
        return [{"provider": t.provider, "id": t.key, "account": t.account, "mode": t.mode,
                 "action": t.action, "status": t.status, "progress": t.progress,
                 "parent_id": t.parent_id, "callback_url": t.callback_url}
                for t in self.tasks.values()]


def _description(spec: Submission) -> str:
    if spec.action == "IMAGINE":
        return f"/imagine {spec.prompt}"
    if spec.parent is not None and spec.button is not None:
        return f"/{spec.action.lower()} {spec.parent.key} {spec.button.label or spec.button.emoji}"
    return f"/{spec.action.lower()}"

