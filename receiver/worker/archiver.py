"""The archiver: keeps every SUCCESS's images, since the providers' links do not last
(Discord's CDN links expire after about a day; relays' CDNs come and go).

The transition script queues a task at its SUCCESS (`Keys.archive`); this loop, in the
worker and never on the callback path, takes due tasks with a lease, fetches each image
(`providers.fetch`: public addresses only unless FETCH_ALLOW_HOSTS, IMAGE_MAX_BYTES, an
image type), keeps it by content in IMAGE_STORE once (`images.ImageLedger`), and stores the
task's ``archived_image_url(s)`` through the transition script (event ``task.archived``).
A failure to archive never changes the task's state: a transient one (a timeout, a 5xx) is
tried again, ARCHIVE_BACKOFF seconds later and doubling, ARCHIVE_ATTEMPTS times in all; a
refusal (a private address, not an image, too large, a 404) is not. Once a minute it also
deletes the images no task needs any more (they go with their tasks, after TASK_TTL).
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
IDLE = 1.0  # seconds between looks at the queues when they were empty


class _Retry(Exception):
    """An image could not be kept this time; the task is tried again later."""


class Archiver:
    def __init__(self, svc: Services, store: ImageStore) -> None:
        self.svc = svc
        self.settings = settings = svc.settings
        self.store = store
        self.metrics = svc.metrics
        self.queue = ArchiveQueue(svc.redis, svc.store.keys)
        self.ledger = ImageLedger(svc.redis, svc.store.keys)
        self.policy = FetchPolicy(allow_hosts=frozenset(settings.fetch_allow_hosts),
                                  max_bytes=settings.image_max_bytes,
                                  timeout=settings.fetch_timeout)
        # every tenant the service knows: keys are tenants' only way in
        self.tenants = sorted(set(settings.api_keys.values())) or [DEFAULT_TENANT]
        self.base = settings.callback_base()

    async def run(self) -> None:
        """Until cancelled; nothing one task or one image does stops it."""
        swept = 0.0
        while True:
            taken: list[Pending] = []
            try:
                taken = await self.queue.take(self.tenants)
                await asyncio.gather(*(self.archive(item) for item in taken))
                if time.monotonic() - swept >= SWEEP_INTERVAL:
                    swept = time.monotonic()
                    await self.sweep()
            except RedisError as exc:
                self.metrics.redis_errors.labels("archiver").inc()
                log.warning("archiving: Redis failed (%r)", exc)
            except Exception:
                log.exception("archiving failed; going on")
            if not taken:
                await asyncio.sleep(IDLE)

    async def archive(self, item: Pending) -> None:
        """Keep the images of one task; see the module's docstring for what fails how."""
        raw = await self.svc.store.get(item.tenant, item.job_id)
        task: dict[str, Any] | None = orjson.loads(raw) if raw else None
        if task is None or task["status"] != TaskStatus.SUCCESS:
            await self.queue.done(item)  # expired, or not a success (cannot happen today)
            return
        sources = [task["image_url"], *task["image_urls"]]
        kept: dict[str, str | None] = {}
        try:
            for url in dict.fromkeys(u for u in sources if isinstance(u, str) and u):
                kept[url] = await self._keep(item, url)
        except _Retry as exc:
            attempts = await self.queue.attempt(item)
            if attempts < self.settings.archive_attempts:
                self.metrics.archive_failures.labels("retry").inc()
                delay = self.settings.archive_backoff * 2 ** (attempts - 1)
                log.info("task %s/%s: %s; again in %g s", *item, exc, delay)
                await self.queue.retry(item, delay)
                return
            self.metrics.archive_failures.labels("exhausted").inc()
            log.warning("task %s/%s: %s; given up after %d attempts", *item, exc, attempts)
        if any(kept.values()):
            claims = CallbackClaims(item.job_id, item.tenant, task["provider"])
            await self.svc.store.archived(
                claims, kept.get(task["image_url"]),
                [kept.get(url) for url in task["image_urls"]])
        await self.queue.done(item)

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

    async def sweep(self) -> int:
        """Delete the kept images no task needs any more; how many went."""
        gone = 0
        for name in await self.ledger.expired():
            try:
                if await self.ledger.forget(name, self.store.delete):
                    gone += 1
            except (StoreError, OSError) as exc:
                log.warning("image %s not deleted (%r); tried again later", name, exc)
        self.metrics.images_expired.inc(gone)
        return gone
