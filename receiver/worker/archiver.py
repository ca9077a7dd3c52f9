"""The archiver: keeps every SUCCESS's images, since the providers' links do not last
(Discord's CDN links expire after about a day; relays' CDNs come and go).

The transition script queues a task at its SUCCESS (`Keys.archive`); this loop, in the
worker and never on the callback path, takes due tasks with a lease, fetches each image
(`providers.fetch`: public addresses only unless FETCH_ALLOW_HOSTS, IMAGE_MAX_BYTES, an
image by its bytes), keeps it by content in IMAGE_STORE once (`images.ImageLedger`), and
stores the task's ``archived_image_url(s)`` through the transition script (event
``task.archived``). A failure to archive never changes the task's state: a transient one (a
timeout, a 5xx) is tried again, ARCHIVE_BACKOFF seconds later and doubling, ARCHIVE_ATTEMPTS
times in all; a refusal (a private address, not an image, too large, a 404) is not.

A tenant writes its own callbacks, so one task costs at most MAX_IMAGES fetches and
TASK_DEADLINE seconds (less than the lease: no second worker takes it meanwhile), and tasks
run side by side (CONCURRENCY), so a slow one holds up no other. Expired images (their tasks
gone, after TASK_TTL) are deleted in the background, as many as have expired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from obstore.exceptions import BaseError as StoreError
from redis.exceptions import LockError, RedisError

from receiver.core.models import TaskStatus
from receiver.core.settings import DEFAULT_TENANT
from receiver.core.tokens import CallbackClaims
from receiver.images import ArchiveQueue, ImageLedger, ImageStore, image_name
from receiver.images.ledger import Pending
from receiver.providers.fetch import FetchPolicy, ImageRefused, fetch_image
from receiver.services.container import Services

log = logging.getLogger("receiver.worker.archiver")
SWEEP_INTERVAL = 60.0  # seconds between looks for images no task needs
SWEEP_FOR = 20.0  # seconds a sweep may go on, a batch at a time, before it waits again
IDLE = 1.0  # seconds between looks at the queues when they were empty
CONCURRENCY = 8  # tasks archived at once by one worker
MAX_IMAGES = 8  # distinct image URLs of one task (a grid and its four, as the relays list)
LEASE = 120.0  # seconds a taken task is this worker's
TASK_DEADLINE = 60.0  # seconds one task's archiving may take (less than LEASE)


class _Retry(Exception):
    """An image could not be kept this time; the task is tried again later."""


class Archiver:
    def __init__(self, svc: Services, store: ImageStore) -> None:
        self.svc = svc
        self.settings = settings = svc.settings
        self.store = store
        self.metrics = svc.metrics
        self.queue = ArchiveQueue(svc.redis, svc.store.keys, lease=LEASE)
        self.ledger = ImageLedger(svc.redis, svc.store.keys)
        self.policy = FetchPolicy(allow_hosts=frozenset(settings.fetch_allow_hosts),
                                  max_bytes=settings.image_max_bytes,
                                  timeout=settings.fetch_timeout)
        # every tenant the service knows: keys are tenants' only way in
        self.tenants = sorted(set(settings.api_keys.values())) or [DEFAULT_TENANT]
        self.base = settings.callback_base()
        self._running: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Until cancelled; nothing one task or one image does stops it."""
        sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        try:
            while True:
                free = CONCURRENCY - len(self._running)
                taken: list[Pending] = []
                try:
                    if free > 0:
                        taken = await self.queue.take(self.tenants, free)
                except RedisError as exc:
                    self.metrics.redis_errors.labels("archiver").inc()
                    log.warning("archiving: Redis failed (%r)", exc)
                for item in taken:
                    job = asyncio.get_running_loop().create_task(self._archive_one(item))
                    self._running.add(job)
                    job.add_done_callback(self._running.discard)
                if not taken:
                    await asyncio.sleep(IDLE)
                elif free == len(taken):  # as many as it could take: let one finish first
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sweeper.cancel()
            for job in self._running:
                job.cancel()  # its lease runs out; another worker takes it
            await asyncio.gather(sweeper, *self._running, return_exceptions=True)

    async def _archive_one(self, item: Pending) -> None:
        try:
            async with asyncio.timeout(TASK_DEADLINE):
                await self.archive(item)
        except TimeoutError:
            log.warning("task %s/%s: archiving took over %g s; tried again later", *item,
                        TASK_DEADLINE)
            await self._again(item, "timed out")
        except RedisError as exc:
            self.metrics.redis_errors.labels("archiver").inc()
            log.warning("archiving %s/%s: Redis failed (%r)", *item, exc)
        except Exception:
            log.exception("archiving %s/%s failed; going on", *item)

    async def archive(self, item: Pending) -> None:
        """Keep the images of one task; see the module's docstring for what fails how."""
        raw = await self.svc.store.get(item.tenant, item.job_id)
        task: dict[str, Any] | None = orjson.loads(raw) if raw else None
        if task is None or task["status"] != TaskStatus.SUCCESS:
            await self.queue.done(item)  # expired, or not a success (cannot happen today)
            return
        urls = list(dict.fromkeys(u for u in [task["image_url"], *task["image_urls"]]
                                  if isinstance(u, str) and u))
        if len(urls) > MAX_IMAGES:
            self.metrics.archive_failures.labels("refused").inc(len(urls) - MAX_IMAGES)
            log.warning("task %s/%s: %d image URLs; the first %d kept", *item, len(urls),
                        MAX_IMAGES)
        kept: dict[str, str | None] = {}
        retry: list[str] = []
        for url in urls[:MAX_IMAGES]:
            try:
                kept[url] = await self._keep(item, url)
            except _Retry as exc:  # the others are still tried: kept once, for next time
                retry.append(str(exc))
        if retry and await self._again(item, retry[0]):
            return
        if any(kept.values()):
            claims = CallbackClaims(item.job_id, item.tenant, task["provider"])
            await self.svc.store.archived(
                claims, kept.get(task["image_url"]),
                [kept.get(url) for url in task["image_urls"]])
        await self.queue.done(item)

    async def _again(self, item: Pending, why: str) -> bool:
        """Due again after the backoff, if attempts are left (True); else False."""
        attempts = await self.queue.attempt(item)
        if 0 < attempts < self.settings.archive_attempts:
            self.metrics.archive_failures.labels("retry").inc()
            delay = self.settings.archive_backoff * 2 ** (attempts - 1)
            log.info("task %s/%s: %s; again in %g s", *item, why, delay)
            await self.queue.retry(item, delay)
            return True
        self.metrics.archive_failures.labels("exhausted").inc()
        log.warning("task %s/%s: %s; given up after %d attempts", *item, why, attempts)
        await self.queue.done(item)
        return False

    async def _keep(self, item: Pending, url: str) -> str | None:
        """This service's URL of the image at ``url``, fetched and kept; None if it was
        refused for good; `_Retry` if it may be kept later."""
        try:
            data, kind = await fetch_image(url, self.policy)
        except ImageRefused as exc:
            if exc.transient:
                raise _Retry(exc.detail) from None
            self.metrics.archive_failures.labels("refused").inc()
            log.warning("task %s/%s: image not archived: %s", *item, exc.detail)
            return None
        name = image_name(data, kind)
        try:
            await self.ledger.keep(name, self.settings.task_ttl,
                                   lambda: self.store.put(name, data))
        except (StoreError, OSError, LockError) as exc:
            raise _Retry(f"the image store failed ({exc!r})") from None
        self.metrics.images_archived.inc()
        self.metrics.images_archived_bytes.inc(len(data))
        return f"{self.base}/images/{item.job_id}/{name}"

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except RedisError as exc:
                self.metrics.redis_errors.labels("archiver").inc()
                log.warning("sweeping images: Redis failed (%r)", exc)
            except Exception:
                log.exception("sweeping images failed; going on")
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep(self, batch: int = 100) -> int:
        """Delete the kept images no task needs any more, a batch at a time until none is
        left (or SWEEP_FOR has passed); how many went."""
        gone, started = 0, time.monotonic()
        while time.monotonic() - started < SWEEP_FOR:
            names = await self.ledger.expired(batch)
            before = gone
            for name in names:
                try:
                    if await self.ledger.forget(name, self.store.delete):
                        gone += 1
                except (StoreError, OSError) as exc:
                    log.warning("image %s not deleted (%r); tried again later", name, exc)
            if len(names) < batch or gone == before:  # all done, or all held elsewhere
                break
        self.metrics.images_expired.inc(gone)
        return gone
