"""The reconciler: finishes tasks whose callbacks never come.

It watches the tasks holding an account's slots (everything sent and not yet final). A task
with no stored update for ``reconcile_after`` seconds is polled at the provider, and what the
provider says goes through the same transition as a callback (so a poll and a late callback
never store one state twice). A task with no update for ``task_timeout`` (the providers' 15
minutes; progress restarts it, and so does a poll that finds it still in the provider's
queue) fails as an inferred FAILURE, which frees its slot. An inferred
FAILURE is not final: such tasks are polled for ``inferred_grace`` more, and a provider final
found then replaces it.

Many workers may run: a poll takes a short lock per task (one provider request per interval),
and every write is an idempotent transition.

``VERIFY_FINAL``'s check of a callback's SUCCESS is `receiver.ingest.verify`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import orjson
from redis.exceptions import RedisError

from receiver.core.errors import ReceiverError
from receiver.core.models import RANK_INFERRED_FAILURE, TaskStatus, Update, now_ms
from receiver.core.settings import ProviderAccount
from receiver.core.tokens import CallbackClaims
from receiver.services.container import Services
from receiver.store.admission import Member
from receiver.store.tasks import SNAPSHOT_FIELDS, snapshot

log = logging.getLogger("receiver.worker.reconciler")
POLL_TIMEOUT = 10.0
POLL_BATCH = 20
_QUEUED = frozenset({TaskStatus.NOT_START, TaskStatus.SUBMITTED})  # as the provider reports


class Reconciler:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.settings = svc.settings
        self.metrics = svc.metrics

    async def run(self) -> None:
        """Until cancelled; nothing one account or one task does stops it."""
        while True:
            for account in self.settings.accounts.values():
                try:
                    await self.reconcile(account)
                except RedisError as exc:
                    self.metrics.redis_errors.labels("reconciler").inc()
                    log.warning("reconciling %s: Redis failed (%r)", account.name, exc)
                except Exception:
                    log.exception("reconciling %s failed; going on", account.name)
            await asyncio.sleep(self.settings.reconcile_interval)

    async def reconcile(self, account: ProviderAccount) -> None:
        svc, settings = self.svc, self.settings
        await svc.admission.prune(account.provider, account.name)
        held = await svc.admission.holders(account.provider, account.name)
        now = now_ms()
        polls = []
        for (member, sent_ms), task in zip(held, await self._snapshots(held), strict=True):
            if task is None or TaskStatus(task["status"]).terminal:
                continue
            idle = (now - max(sent_ms, _ms(task["updated_at"]))) / 1000
            if idle >= settings.task_timeout:
                await self._infer_failure(account, member, idle)
            elif idle >= settings.reconcile_after and task["provider_task_id"]:
                polls.append((member, task["provider_task_id"]))
        await self._poll(account, polls)  # one request where the provider lists many
        await self._recheck_inferred(account, now)

    async def _recheck_inferred(self, account: ProviderAccount, now: int) -> None:
        """Poll the tasks we failed ourselves, for a final the provider reached late."""
        svc = self.svc
        key = svc.store.keys.inferred(account.name)
        pairs = await svc.redis.zrange(key, 0, -1, withscores=True)
        held = [(Member.parse(m), int(score)) for m, score in pairs]
        polls = []
        for (member, since), task in zip(held, await self._snapshots(held), strict=True):
            expired = (now - since) / 1000 > self.settings.inferred_grace
            if task is None or expired or task["_rank"] != RANK_INFERRED_FAILURE:
                await svc.redis.zrem(key, str(member))
            elif task["provider_task_id"]:
                polls.append((member, task["provider_task_id"]))
        for batch in range(0, len(polls), POLL_BATCH):
            await self._poll(account, polls[batch:batch + POLL_BATCH], recheck=True)

    async def _snapshots(self, held: list[tuple[Member, int]]) -> list[dict[str, Any] | None]:
        """Each task as a dict (with ``_rank``), or None when it is gone."""
        store = self.svc.store
        async with self.svc.redis.pipeline(transaction=False) as pipe:
            for member, _ in held:
                pipe.hmget(store.keys.task(member.tenant, member.job_id),
                           ["r", *SNAPSHOT_FIELDS])
            replies = await pipe.execute()
        out: list[dict[str, Any] | None] = []
        for rank_, values, extra in replies:
            task = snapshot(values, extra)
            out.append(None if task is None else {**orjson.loads(task), "_rank": int(rank_)})
        return out

    async def _poll(self, account: ProviderAccount, tasks: list[tuple[Member, str]],
                    recheck: bool = False) -> None:
        """Ask the provider about ``tasks`` (member, provider task id) at once, and store
        what it says; each task is polled by one worker per interval (a lock)."""
        svc, provider = self.svc, account.provider
        ttl = max(1, int(self.settings.reconcile_after * 1000))
        locked = [(member, ptid) for member, ptid in tasks if await svc.redis.set(
            svc.store.keys.poll_lock(account.name, str(member)), b"1", nx=True, px=ttl)]
        if not locked:
            return
        try:
            async with asyncio.timeout(POLL_TIMEOUT):
                answers = await svc.clients[account.name].fetch_many(
                    list(dict.fromkeys(ptid for _, ptid in locked)))
        except (ReceiverError, TimeoutError) as exc:  # down, or not an answer
            self.metrics.polls.labels(provider, "error").inc(len(locked))
            log.info("polling %d tasks at %s: %r", len(locked), account.name, exc)
            return
        for member, ptid in locked:
            if ptid not in answers:
                self.metrics.polls.labels(provider, "error").inc()
                continue
            update = answers[ptid]
            if update is None:
                self.metrics.polls.labels(provider, "unknown").inc()
                if not recheck:
                    await self._unknown(account, member, ptid)
                continue
            await svc.redis.zrem(svc.store.keys.unknown(account.name), str(member))
            await self._store(account, member, update)

    async def _store(self, account: ProviderAccount, member: Member, update: Update) -> None:
        claims = CallbackClaims(member.job_id, member.tenant, account.provider)
        outcome = await self.svc.store.apply(claims, update, claimed=True)
        self.metrics.polls.labels(account.provider,
                                  "stored" if outcome.stored else "unchanged").inc()
        if update.status in _QUEUED:
            # Still in the provider's queue (a RELAX queue can take longer than the
            # timeout): waiting there is not a stall, so its timeout starts again.
            await self.svc.redis.zadd(self.svc.store.keys.slots(account.name, account.provider),
                                      {str(member): now_ms()}, xx=True, gt=True)
        if outcome.stored:
            log.info("task %s: %s learned by polling", member, update.status.value)

    async def _unknown(self, account: ProviderAccount, member: Member, ptid: str) -> None:
        """The provider does not know the task (it lost it, or was reset): after
        ``unknown_task_grace`` of such answers the task fails, and its slot comes back. A
        late final from the provider still replaces that failure (it is inferred)."""
        svc, key = self.svc, self.svc.store.keys.unknown(account.name)
        now = now_ms()
        await svc.redis.zadd(key, {str(member): now}, nx=True)
        since = await svc.redis.zscore(key, str(member))
        waited = (now - int(since or now)) / 1000
        if waited < self.settings.unknown_task_grace:
            return
        claims = CallbackClaims(member.job_id, member.tenant, account.provider)
        outcome = await svc.store.apply(claims, Update(
            TaskStatus.FAILURE, inferred=True,
            fail_reason=f"{account.provider} does not know this task ({ptid}) any more: it "
                        f"answered so for {waited:.0f} s (it lost it; inferred by receiver)"))
        await svc.redis.zrem(key, str(member))
        if outcome.stored:
            self.metrics.inferred_failures.labels(account.provider).inc()
            log.warning("task %s: %s does not know %s; failed", member, account.provider, ptid)
            await svc.admission.prune(account.provider, account.name)

    async def _infer_failure(self, account: ProviderAccount, member: Member, idle: float) -> None:
        claims = CallbackClaims(member.job_id, member.tenant, account.provider)
        outcome = await self.svc.store.apply(claims, Update(
            TaskStatus.FAILURE, inferred=True,
            fail_reason=f"timed out: no update from {account.provider} for {idle:.0f} s "
                        "(inferred by receiver; a later result from the provider replaces it)"))
        if outcome.stored:
            self.metrics.inferred_failures.labels(account.provider).inc()
            log.warning("task %s timed out after %.0f s without an update", member, idle)
            await self.svc.admission.prune(account.provider, account.name)


def _ms(iso_time: str) -> int:
    return int(datetime.fromisoformat(iso_time).timestamp() * 1000)

