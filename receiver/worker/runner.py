"""``receiver worker``: the dispatcher, the reconciler and the archiver, in one process
(the Procfile's ``worker``), or inside the web process (``receiver serve`` does so unless
``--no-worker``).

Any number may run against one Redis: see `dispatcher`, `reconciler` and `archiver` for why
that is safe.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from receiver.core.settings import Settings
from receiver.services.container import Services
from receiver.worker.archiver import Archiver
from receiver.worker.dispatcher import Dispatcher
from receiver.worker.reconciler import Reconciler

log = logging.getLogger("receiver.worker")


class Worker:
    def __init__(self, svc: Services) -> None:
        self.dispatcher = Dispatcher(svc)
        self.reconciler = Reconciler(svc)
        self.archiver = Archiver(svc, svc.images) if svc.images is not None else None
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.dispatcher.run())
            group.create_task(self.reconciler.run())
            if self.archiver is not None:
                group.create_task(self.archiver.run())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # wait() leaves the worker's own cancellation in the task; a cancellation of
            # the caller (the lifespan's shutdown deadline) still reaches the caller.
            # Catching CancelledError around `await self._task` swallowed that deadline.
            await asyncio.wait([self._task])
            if not self._task.cancelled() and self._task.exception() is not None:
                # the loops catch what they meet; log what escaped anyway
                log.error("the worker had stopped on an error", exc_info=self._task.exception())


async def run_worker(settings: Settings) -> None:
    """Until SIGTERM or SIGINT. Tasks being sent when it stops keep their slots; the
    reconciler of any worker settles them."""
    if not settings.accounts:
        log.warning("no provider is configured (<PROVIDER>_BASE_URL): nothing to dispatch")
    if not settings.public_base_url:
        log.warning("no PUBLIC_BASE_URL: callback URLs will point at %s; set it to where "
                    "the providers reach the web process", settings.callback_base())
    svc = Services.build(settings)
    await svc.start()
    worker = Worker(svc)
    worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker: dispatching for %s", ", ".join(
        f"{pool} ({', '.join(a.name for a in accounts)})"
        for pool, accounts in settings.pools().items()) or "no provider")
    try:
        await stop.wait()
    finally:
        await worker.stop()
        await svc.close()
