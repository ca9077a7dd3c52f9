"""The provider side of the simulator: tasks, their lifecycle, queues, callbacks, counters.

The dialect modules put each provider's HTTP in front of this. A task is one `SimTask`; one
asyncio task walks it through its states, and each state is rendered in the task's dialect
and handed to a per-task sender, so callbacks leave in order unless a fault says otherwise.
midjourney-proxy accounts run `queue_limit` tasks at once and queue the rest, as both relays
do. Randomness comes from seeded `random.Random`s (one for faults, one for ids and hashes),
so a test that sets a seed sees the same ids, buttons and faults each run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import time
import uuid
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Coroutine
from typing import Any

import httpx

from receiver.core.logs import redact
from receiver.simulator._config import Faults, SimError, SimulatorConfig
from receiver.simulator._render import encode, render, wrap_ohmygpt
from receiver.simulator._tasks import (
    AIGC2D_FIRST_ID,
    DESCRIBE_TEXT,
    DESCRIBE_TEXT_CRLF,
    FAIL_REASON,
    FINAL,
    Button,
    Outgoing,
    SimTask,
    Submission,
    describe_buttons,
    grid_buttons,
    upscaled_buttons,
)

log = logging.getLogger("receiver.simulator")
BANNED_AT_RUN = "可能包含敏感词"  # trueai: DiscordService.RedisQueueUpdateProgress, no word


class Simulator:
    """Every task of every provider, their lifecycles, the faults and the counters."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.seed)  # faults; reseeded by a reset
        # Ids and hashes: never reseeded, so a receiver never sees one id twice.
        self._id_rng = random.Random(None if config.seed is None else f"ids-{config.seed}")
        self._issued: set[str] = set()
        self._counters = {"ohmygpt": itertools.count(1),
                          "aigc2d": itertools.count(AIGC2D_FIRST_ID)}
        self.tasks: dict[tuple[str, str], SimTask] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._progressing = asyncio.Event()  # cleared while never_finish holds tasks
        self._set_progressing()
        self._banned = [(w, re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE))
                        for w in config.banned_words]
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.callback_timeout, connect=2.0),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=min(20, config.max_connections)),
            headers={"User-Agent": "receiver-simulator"},
            trust_env=False,  # no proxy from the environment: callbacks go where they say
        )
        self._zero_stats()

    def _zero_stats(self) -> None:
        self.submitted = 0
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.by_mode: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.by_action: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.by_route: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.callbacks = Counter[str]()  # sent, dropped, failed
        self.running: Counter[str] = Counter()  # mjproxy: tasks in the account's slots
        self.waiting: defaultdict[str, deque[SimTask]] = defaultdict(deque)
        self.answered_queued = 0  # mjproxy code 22
        self.cancelled = 0
        self.image_requests = 0  # GET /images/*, expired or not
        self.refused_keys = 0  # mjproxy requests with a key not in `api_keys`
        self._transient_turn = 0

    def stats(self) -> dict[str, Any]:
        return {
            "mjproxy_flavor": self.config.mjproxy_flavor,
            "submitted": self.submitted,
            "in_flight": dict(self.in_flight),
            "max_in_flight": dict(self.max_in_flight),
            "waiting": {account: len(q) for account, q in self.waiting.items()},
            "answered_queued": self.answered_queued,
            "cancelled": self.cancelled,
            "image_requests": self.image_requests,
            "refused_keys": self.refused_keys,
            "callbacks_sent": self.callbacks["sent"],
            "callbacks_dropped": self.callbacks["dropped"],
            "callbacks_failed": self.callbacks["failed"],
            "by_mode": {p: dict(c) for p, c in self.by_mode.items()},
            "by_action": {p: dict(c) for p, c in self.by_action.items()},
            "by_route": {p: dict(c) for p, c in self.by_route.items()},
        }

    def snapshot(self) -> list[dict[str, Any]]:
        """Every task in brief, for tests that check what a submitter sent."""
        return [{"provider": t.provider, "id": t.key, "account": t.account, "mode": t.mode,
                 "action": t.action, "status": t.status, "progress": t.progress,
                 "parent_id": t.parent_id, "callback_url": t.callback_url,
                 "prompt": t.prompt, "state": t.state, "custom_id": t.custom_id,
                 "images": len(t.inputs), "modal": t.modal, "fail_reason": t.fail_reason}
                for t in self.tasks.values()]

    def hit(self, provider: str, route: str) -> None:
        self.by_route[provider][route] += 1

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
        running = list(self._jobs)
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._jobs.clear()

    def chance(self, probability: float) -> bool:
        # 0 and 1 draw nothing, so one probabilistic fault does not shift another's draws.
        return probability >= 1 or (probability > 0 and self.rng.random() < probability)

    def transient(self) -> int | None:
        """The `transient_errors` fault: None, or the mjproxy code to answer (3, 9, 3, ...)."""
        if not self.chance(self.faults.transient_errors):
            return None
        self._transient_turn += 1
        return 3 if self._transient_turn % 2 else 9

    async def answer_delay(self) -> None:
        """The `submit_delay` fault: the task is queued, its answer is late."""
        if self.faults.submit_delay > 0:
            await asyncio.sleep(self.faults.submit_delay)

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

    def snowflake(self) -> str:
        """A Discord-like 19-digit id (messages, nonces)."""
        return str(self._id_rng.randrange(10**18, 10**19))

    # --- admission -----------------------------------------------------------------------

    def admit(self, provider: str, account: str, exempt: bool = False) -> int:
        """`SimError` queue_full if the account takes no more; else the tasks waiting ahead
        (mjproxy: the relay's wait queue, read before the task joins it)."""
        limit = self.config.queue_limit
        if provider != "mjproxy":
            if self.faults.queue_full or (limit is not None and self.in_flight[account] >= limit):
                raise SimError("queue_full", "queue full: too many unfinished tasks, try later")
            return 0
        ahead = len(self.waiting[account])
        busy = limit is not None and self.running[account] >= limit
        if not exempt and (self.faults.queue_full
                           or (busy and ahead >= self.config.mjproxy_queue_size)):
            raise SimError("queue_full", "queue full")
        return ahead

    def create(self, spec: Submission) -> SimTask:
        """Record a task the provider accepted; `queue` runs it (a MODAL one waits for its
        dialog first)."""
        parent = spec.parent
        key = self._new_id(spec.provider)
        base = spec.base_url
        if spec.link:
            inputs = [spec.link]
        elif spec.action == "DESCRIBE" and spec.images:
            inputs = [f"{base}/images/input-{key}.png"]
        else:
            inputs = [f"{base}/images/input-{key}-{n}.png" for n in range(1, spec.images + 1)]
        prompt = spec.prompt
        if spec.provider == "mjproxy":
            description = spec.description
            if spec.action == "IMAGINE" and inputs:  # uploaded, then named in the prompt
                prompt = " ".join([*inputs, prompt])
                description = f"/imagine {prompt}"
        else:
            prompt = prompt or (parent.prompt if parent else "")
            description = _description(spec)
        task = SimTask(
            provider=spec.provider, id=key, account=spec.account, mode=spec.mode,
            action=spec.action, prompt=prompt, description=description,
            callback_url=None if self.faults.strip_callback_url else spec.callback_url,
            base_url=base, submitted_at=time.time(),
            flavor=self.config.mjproxy_flavor if spec.provider == "mjproxy" else "",
            state=spec.state, parent_id=parent.key if parent else None,
            custom_id=spec.custom_id or (spec.button.custom_id if spec.button else None),
            inputs=inputs, fails=self.chance(self.faults.fail_tasks),
            fail_at_start=spec.fail_at_start, needs=spec.modal,
            status="MODAL" if spec.modal else "NOT_START", nonce=self.snowflake(),
            instance_id=f"1{zlib.crc32(spec.account.encode()):018d}",
            parent_final_prompt=parent.final_prompt if parent else None,
            referenced_message_id=parent.message_id if parent else None,
        )
        self.tasks[(task.provider, task.key)] = task
        self.submitted += 1
        self.by_mode[task.provider][task.mode] += 1
        self.by_action[task.provider][task.action] += 1
        return task

    def _new_id(self, provider: str) -> int | str:
        if provider != "mjproxy":
            return next(self._counters[provider])
        while True:  # 16 digits, as the relays' millisecond time and 3 random digits
            key = str(self._id_rng.randrange(10**15, 10**16))
            if key not in self._issued:
                self._issued.add(key)
                return key

    def submit(self, spec: Submission) -> SimTask:
        """Admit, create and queue in one go (OhMyGPT, AIGC2D)."""
        self.admit(spec.provider, spec.account)
        task = self.create(spec)
        self.queue(task)
        return task

    def queue(self, task: SimTask) -> None:
        """Count the task as unfinished and start it, or let it wait for a slot (mjproxy)."""
        task.queued = True
        self.in_flight[task.account] += 1
        self.max_in_flight[task.account] = max(self.max_in_flight[task.account],
                                               self.in_flight[task.account])
        limit = self.config.queue_limit
        if task.provider == "mjproxy" and limit is not None \
                and self.running[task.account] >= limit:
            self.waiting[task.account].append(task)
        else:
            self._grant(task)

    def _grant(self, task: SimTask) -> None:
        if task.provider == "mjproxy":
            task.holds_slot = True
            self.running[task.account] += 1
        if task.fail_at_start is None and task.flavor == "trueai" \
                and self.banned_word(task.prompt) is not None:
            task.fail_at_start = BANNED_AT_RUN  # trueai checks the words when it runs
        if task.fail_at_start is None:
            if task.provider == "mjproxy":
                task.started_at = time.time()  # set with SUBMITTED, before any progress
            task.status, task.progress = "SUBMITTED", 0
            self._emit(task)
        task.runner = self._spawn(self._run(task))

    def _settle(self, task: SimTask) -> None:
        """The task is over: its place in the account's count and queue is free."""
        if task.queued:
            task.queued = False
            self.in_flight[task.account] -= 1
        if task.holds_slot:
            task.holds_slot = False
            self.running[task.account] -= 1
            waiting, limit = self.waiting[task.account], self.config.queue_limit
            while waiting and (limit is None or self.running[task.account] < limit):
                self._grant(waiting.popleft())
        elif task in self.waiting[task.account]:
            self.waiting[task.account].remove(task)

    def cancel(self, task: SimTask) -> None:
        """trueai's cancel: an unfinished task becomes FAILURE "取消任务", saved without a
        callback (TaskController.Cancel)."""
        if task.status in FINAL:
            return
        if task.runner is not None:
            task.runner.cancel()
        task.status, task.fail_reason, task.finished_at = "FAILURE", "取消任务", time.time()
        self._settle(task)
        self._close(task)
        self.cancelled += 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        job: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return job

    # --- lifecycle ---------------------------------------------------------------------

    async def _run(self, task: SimTask) -> None:
        try:
            if task.fail_at_start is not None:  # refused when its turn came
                await asyncio.sleep(self.config.step_interval * self.faults.slow)
                if task.flavor == "novicezk":
                    task.started_at = time.time()  # executeTask sets it before the check
                self._fail(task, task.fail_at_start)
                return
            if self.faults.queue_wait > 0:
                await asyncio.sleep(self.faults.queue_wait)
            # novicezk: the start message makes it IN_PROGRESS with its progress still 0%
            steps = (0, *self.config.steps) if task.flavor == "novicezk" else self.config.steps
            fail_at = min(2, len(steps)) if task.fails else None
            for n, percent in enumerate(steps):
                await self._pause(task, hold=n > 0)
                if n == fail_at:
                    break
                self._progress(task, percent)
            else:
                await self._pause(task, hold=True)
            if task.fails:
                self._fail(task, FAIL_REASON)
            else:
                self._succeed(task)
        finally:
            self._close(task)

    async def _pause(self, task: SimTask, hold: bool) -> None:
        await asyncio.sleep(self.config.step_interval * self.faults.slow)
        if hold and not self._progressing.is_set():
            self._release_held(task)  # what was sent so far, sent in full
            await self._progressing.wait()

    def _progress(self, task: SimTask, percent: int) -> None:
        task.status, task.progress = "IN_PROGRESS", percent
        task.started_at = task.started_at or time.time()
        task.job = task.job or str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))
        if task.provider == "mjproxy":
            task.progress_message_id = task.progress_message_id or self.snowflake()
            if task.action != "DESCRIBE":  # the progress message's prompt
                task.final_prompt = task.prompt or " ".join(task.inputs) or None
        if task.action != "DESCRIBE" and percent > 0:
            task.image_url = task.image(f"-{percent}")
        self._emit(task)

    def _succeed(self, task: SimTask) -> None:
        task.finished_at = time.time()
        task.started_at = task.started_at or task.finished_at
        job = task.job or str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))
        task.job, task.status, task.progress = job, "SUCCESS", 100
        if task.provider == "mjproxy":
            task.message_id = self.snowflake()
        if task.action == "DESCRIBE" and task.provider == "mjproxy":
            task.image_url = task.inputs[0] if task.inputs else None  # the described image
            trueai = task.flavor == "trueai"
            task.final_prompt = DESCRIBE_TEXT_CRLF if trueai else DESCRIBE_TEXT
            task.buttons = describe_buttons() if trueai else []
        elif task.action == "DESCRIBE":
            task.image_url = None
            task.prompt = task.final_prompt = DESCRIBE_TEXT
        else:
            task.image_url = task.image()
            task.final_prompt = task.final_prompt or task.prompt or None
            if task.flavor != "novicezk":  # novicezk's Task has no buttons
                task.buttons = upscaled_buttons(job) if task.action == "UPSCALE" \
                    else grid_buttons(job)
        self._settle(task)
        self._emit(task)

    def _fail(self, task: SimTask, reason: str) -> None:
        task.finished_at = time.time()
        task.status, task.fail_reason = "FAILURE", reason
        if task.provider != "mjproxy":
            task.image_url = None  # (the relays keep the last preview)
        self._settle(task)
        self._emit(task)

    # --- callbacks ---------------------------------------------------------------------

    def _notifies(self, task: SimTask) -> bool:
        """The relays' NotifyService: a state older than the last one notified is skipped;
        trueai skips an equal one too, novicezk sends it again. MODAL is never notified."""
        if task.provider != "mjproxy":
            return True
        if task.status == "MODAL":
            return False
        order, last = task.order(), task.last_order
        if last is not None and (order < last or (order == last and task.flavor == "trueai")):
            return False
        task.last_order = order
        return True

    def _emit(self, task: SimTask) -> None:
        """Render the task's state now and queue it for its callback URL, faults applied."""
        if task.callback_url is None or not self._notifies(task):
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
        if task.outbox is None:
            task.outbox = asyncio.Queue()
            self._spawn(self._send_all(task.outbox))
        body, content_type = encode(task, doc)
        due = asyncio.get_running_loop().time() + self.faults.delay_callbacks
        item = Outgoing(task.callback_url, body, content_type, due)
        items = [item, item] if self.chance(self.faults.duplicate_callbacks) else [item]
        if task.flavor == "novicezk" and self.chance(self.faults.resend_unchanged):
            # the same status:progress again, a moment later (a message edit without change)
            later = self.config.step_interval * self.faults.slow / 2
            items.append(item._replace(due=due + later))
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

    def _close(self, task: SimTask) -> None:
        """No more callbacks for this task: its sender ends once the queued ones are sent."""
        if task.outbox is not None:
            self._release_held(task)
            task.outbox.put_nowait(None)
            task.outbox = None

    async def _send_all(self, outbox: asyncio.Queue[Outgoing | None]) -> None:
        """One task's callbacks, one at a time, so they arrive in the order they were queued."""
        loop = asyncio.get_running_loop()
        while (item := await outbox.get()) is not None:
            wait = item.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._post(item)

    async def _post(self, item: Outgoing) -> None:
        self.callbacks["sent"] += 1
        # No retry: none of the real providers retries a failed delivery.
        try:
            response = await self.http.post(item.url, content=item.body,
                                            headers={"Content-Type": item.content_type})
        except httpx.HTTPError as exc:
            self.callbacks["failed"] += 1
            log.warning("callback to %s failed: %r", redact(item.url), exc)
            return
        if not response.is_success:
            self.callbacks["failed"] += 1
            log.warning("callback to %s answered %d", redact(item.url), response.status_code)


def _description(spec: Submission) -> str:
    if spec.action == "IMAGINE":
        return f"/imagine {spec.prompt}"
    if spec.parent is not None and spec.button is not None:
        return f"/{spec.action.lower()} {spec.parent.key} {spec.button.label or spec.button.emoji}"
    return f"/{spec.action.lower()}"
