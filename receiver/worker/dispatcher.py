"""The dispatcher: sends queued tasks to their provider as its accounts' slots free.

One loop per pool (a provider's accounts). It wakes on the admission channel (a task queued,
a task final) and also once a second, in case a wake-up was missed. Taking a slot pops a task
and picks its account atomically (`admission`: the least loaded that may take it; an action
only its parent's), so several dispatchers, in one process or many, never send a task twice.
What the provider answers decides what happens to the slot:

- accepted: the task is SUBMITTED (and charged) with the provider's id; the slot is held until
  the task's final transition;
- refused for now (queue full, busy, our key refused, or the provider unreachable before
  anything was sent): back to its place in the queue, and the account pauses (benched: no
  dispatcher sends to it until then, `Keys.health`), 1 s doubling up to 30 s, up to 10
  minutes for a refused key (logged as an error); the pool's other accounts take the tasks;
- refused for good (banned word, unknown parent, a request it will not take...): the task
  FAILS with the provider's words, and the slot is freed;
- no answer after sending: the provider may have queued it, and sending again could queue it
  twice. The slot stays held; the task's callbacks, or the reconciler's timeout, settle it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from receiver.core.models import TaskStatus, Update, now_iso, now_ms
from receiver.core.settings import ProviderAccount
from receiver.core.tokens import CallbackClaims
from receiver.providers import (
    BadProviderKey,
    ProviderDown,
    ProviderError,
    QueueFull,
    SubmitRequest,
    Transient,
)
from receiver.services.container import Services
from receiver.store.admission import Account, Member

log = logging.getLogger("receiver.worker.dispatcher")

WAKE_EVERY = 1.0
MAX_PAUSE = 30.0
MAX_BENCH = 600.0  # an account whose key the provider refuses: until someone fixes it
SEND_GRACE = 5.0  # seconds a stopping dispatcher waits for the answers to its sends
# The submissions metric's outcome for each answer that puts a task back in its place.
_RETRIED: dict[type[ProviderError], str] = {
    QueueFull: "queue_full", Transient: "busy", BadProviderKey: "auth",
    ProviderDown: "requeued"}


class Dispatcher:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.pools = svc.settings.pools()
        self.accounts = {a.name: a for pool in self.pools.values() for a in pool}
        self._admitted = {pool: [Account(a.name, a.queue_limit, a.weight, svc.modes_of(a))
                                 for a in accounts] for pool, accounts in self.pools.items()}
        self._wake = {pool: asyncio.Event() for pool in self.pools}
        # the channel names a pool (a task queued) or an account (a task of its ended)
        self._pool_of = {**{p: p for p in self.pools},
                         **{a.name: a.provider for a in self.accounts.values()}}
        self._delay = {name: 0.0 for name in self.accounts}  # the next pause's length
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Until cancelled."""
        if not self.pools:
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._listen())
                for pool in self.pools:
                    group.create_task(self._dispatch(pool))
        finally:
            if self._sending:  # a send cut off leaves its task sent-or-not until the timeout
                await asyncio.wait(self._sending, timeout=SEND_GRACE)
            for job in self._sending:
                job.cancel()
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _listen(self) -> None:
        channel = self.svc.store.keys.admission_channel()
        while True:
            pubsub: PubSub = self.svc.pubsub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        pool = self._pool_of.get(message["data"].decode())
                        if pool is not None:
                            self._wake[pool].set()
            except Exception as exc:  # the once-a-second wake-up covers the gap
                log.warning("admission channel lost (%r); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _dispatch(self, pool: str) -> None:
        wake = self._wake[pool]
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), WAKE_EVERY)
            wake.clear()
            try:
                await self.fill(pool)
            except RedisError as exc:
                self.svc.metrics.redis_errors.labels("dispatcher").inc()
                log.warning("dispatching for %s: Redis failed (%r); retrying", pool, exc)
            except Exception:
                log.exception("dispatching for %s failed; retrying", pool)

    async def fill(self, pool: str) -> None:
        """Send queued tasks until none waits that an account of the pool may take now."""
        admission = self.svc.admission
        pruned = False
        while True:
            taken = await admission.acquire(pool, self._admitted[pool], now_ms())
            if taken is None:
                if pruned:
                    return
                # Every slot taken, or nothing queued: free the slots of finished tasks, and
                # try once more.
                for account in self.pools[pool]:
                    await admission.prune(pool, account.name)
                pruned = True
                continue
            pruned = False
            if taken.account is None:
                await self._orphaned(pool, taken.member)
                continue
            job = asyncio.create_task(self._send(self.accounts[taken.account], taken.member,
                                                 taken.bound))
            self._sending.add(job)
            job.add_done_callback(self._sending.discard)

    async def _orphaned(self, pool: str, member: Member) -> None:
        """A task no account of the pool could ever take (its parent's account left it, or
        none serves its mode): it fails, then leaves the queue (a crash between the two: it
        is handed back again, and both are done again)."""
        self.svc.metrics.submissions.labels(pool, "refused").inc()
        await self.svc.store.apply(CallbackClaims(member.job_id, member.tenant, pool), Update(
            TaskStatus.FAILURE, fail_reason="no account of the pool can take it: the account "
            "that made its parent is disabled or no longer configured (an action goes to that "
            "account only), or none serves its mode; never sent"))
        await self.svc.admission.withdraw(pool, member)

    async def _send(self, account: ProviderAccount, member: Member, bound: bool) -> None:
        svc, metrics = self.svc, self.svc.metrics
        pool, task_key = account.provider, svc.store.keys.task(member.tenant, member.job_id)
        try:
            task = await svc.redis.hmget(task_key, ["q", "s"])  # type: ignore[misc]
            request_json, status = task
            if request_json is None or status != TaskStatus.NOT_START.value.encode():
                # gone, or sent already (a dispatcher that died after the answer): the slot
                # is the task's until it ends, pruned then
                if request_json is None:
                    await svc.admission.release(pool, account.name, member)
                return
            request = SubmitRequest(**orjson.loads(request_json))
            if request.parent_task_id and not bound and \
                    not await self._at_parents_account(account, member):
                return
            # which account sent it: its actions, polls, cancel and verification go there
            await svc.redis.hset(task_key, "a", account.name)  # type: ignore[misc]
            claims = CallbackClaims(member.job_id, member.tenant, account.provider)
            url = (f"{svc.settings.callback_base()}/callbacks/{account.provider}"
                   f"?token={svc.signer.mint_callback(claims)}")
            try:
                provider_task_id = await svc.clients[account.name].submit(request, url)
            except ProviderError as exc:
                await self._not_submitted(account, member, claims, exc)
                return
            metrics.submissions.labels(account.provider, "accepted").inc()
            self._delay[account.name] = 0.0
            if provider_task_id:  # ours, whoever claimed the id before (see `claims`)
                await svc.claims.take(claims, provider_task_id)
            await svc.store.submitted(claims, Update(
                TaskStatus.SUBMITTED, provider_task_id=provider_task_id,
                submitted_at=now_iso()))
            with contextlib.suppress(RedisError):  # what operators see; the task is stored
                await svc.redis.hincrby(  # type: ignore[misc]
                    svc.store.keys.health(account.name, pool), "sent", 1)
        except RedisError as exc:
            # The slot stays held; the reconciler settles the task.
            metrics.redis_errors.labels("dispatcher").inc()
            log.warning("dispatching %s: Redis failed (%r)", member, exc)
        except Exception:
            # Whether it reached the provider is unknown: held, not sent again (as above).
            log.exception("dispatching %s failed", member)

    async def _at_parents_account(self, account: ProviderAccount, member: Member) -> bool:
        """An action taken without a route to its parent's account (queued before pools):
        sent by any account, it would reach a provider that does not know its parent. Back
        in the queue, bound to the parent's account, unless that is this one. (An action
        taken bound to its account needs none of this: the script obeyed the route.)"""
        svc = self.svc
        snapshot = await svc.store.get(member.tenant, member.job_id)
        parent_id = orjson.loads(snapshot)["parent_id"] if snapshot else None
        if parent_id is None:
            return True
        parent_account = await svc.redis.hget(  # type: ignore[misc]
            svc.store.keys.task(member.tenant, parent_id), "a")
        owner = parent_account.decode() if parent_account else account.name
        if owner == account.name:
            return True
        await svc.admission.requeue(account.provider, account.name, member, affinity=owner)
        return False

    async def _not_submitted(self, account: ProviderAccount, member: Member,
                             claims: CallbackClaims, exc: ProviderError) -> None:
        """What a provider's no means for the task and its slot."""
        svc, metrics, pool = self.svc, self.svc.metrics, account.provider
        if isinstance(exc, ProviderDown) and not exc.retry_safe:
            metrics.submissions.labels(account.provider, "unanswered").inc()
            log.warning("%s: %s; task %s may be queued there: not sent again",
                        account.name, exc.detail, member)
            return  # the slot stays held: callbacks or the reconciler settle the task
        if exc.retry_safe:  # queue full, busy, unreachable, our key refused: nothing queued
            metrics.submissions.labels(account.provider, _RETRIED.get(type(exc), "requeued")
                                       ).inc()
            if isinstance(exc, BadProviderKey):
                log.error("%s: the provider refused our key (%s): the account pauses and its "
                          "tasks wait; fix %s", account.name, exc.detail,
                          f"{account.provider.upper()}_API_KEY" if account.name ==
                          account.provider else "its key in ACCOUNTS_FILE")
            delay = self._back_off(account, exc)
            # benched first (every dispatcher skips it), then the task back in its place
            await svc.redis.hset(  # type: ignore[misc]  # also what /admin/accounts shows
                svc.store.keys.health(account.name, pool), mapping={
                    "paused_until": now_ms() + int(delay * 1000), "pause": delay,
                    "last_error_at": now_iso(), "last_error": f"{exc.code}: {exc.detail}"[:300]})
            await svc.admission.requeue(pool, account.name, member)
            return
        metrics.submissions.labels(account.provider, "refused").inc()
        await svc.store.apply(claims, Update(
            TaskStatus.FAILURE, fail_reason=f"{exc.code}: {exc.detail}"))
        await svc.admission.release(pool, account.name, member)

    def _back_off(self, account: ProviderAccount, exc: ProviderError) -> float:
        """The account's next pause: 1 s, doubling to MAX_PAUSE (MAX_BENCH for a refused
        key)."""
        most = MAX_BENCH if isinstance(exc, BadProviderKey) else MAX_PAUSE
        delay = self._delay[account.name] = min(most, self._delay[account.name] * 2 or 1)
        log.info("%s: %s; pausing %.0f s", account.name, exc.detail, delay)
        return delay
