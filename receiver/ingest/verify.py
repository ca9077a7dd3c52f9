"""``VERIFY_FINAL``: callbacks are unsigned, so a SUCCESS a callback claims is stored only
as the provider itself reports it when asked."""

from __future__ import annotations

import asyncio
import logging

from receiver.core.errors import ReceiverError
from receiver.core.models import TaskStatus, Update
from receiver.core.tokens import CallbackClaims
from receiver.services.container import Services

log = logging.getLogger("receiver.ingest")
VERIFY_TIMEOUT = 5.0  # the provider waits for our answer; then the reconciler asks later


async def verify(svc: Services, claims: CallbackClaims, update: Update) -> Update | None:
    """What to store for a callback that claims SUCCESS (``VERIFY_FINAL``): the provider's own
    answer when polled, or None when it cannot be asked now (the reconciler asks later)."""
    stored, account = await svc.redis.hmget(  # type: ignore[misc]
        svc.store.keys.task(claims.tenant, claims.job_id), ["p", "a"])
    # the account that sent it: the provider knows the task under that key only
    client = svc.clients.get(account.decode()) if account is not None else None
    if client is None or account is None:
        return update  # submitted elsewhere: our key cannot ask about it
    if stored is None:
        # Which provider task is ours is not known yet: asking about the one the callback
        # names would let it name another's finished task.
        return None
    try:
        async with asyncio.timeout(VERIFY_TIMEOUT):  # the provider waits for our answer
            polled = await client.fetch(stored.decode())
    except (ReceiverError, TimeoutError) as exc:
        log.info("verifying task %s: %r", claims.job_id, exc)
        return None
    if polled.status is not TaskStatus.SUCCESS:
        log.warning("task %s: a callback claimed SUCCESS; %s says %s", claims.job_id,
                    claims.provider, polled.status.value)
    return polled
