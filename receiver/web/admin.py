"""Operators' routes (``RECEIVER_ADMIN_KEYS``): what the provider accounts are doing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.core.docs import UNAVAILABLE, Operation, error, ok
from receiver.core.models import iso, now_ms
from receiver.core.schema import Model
from receiver.services.auth import authenticate_admin
from receiver.services.container import services
from receiver.services.http import JSONResponse


class AccountState(Model):
    name: str
    provider: str
    flavor: str | None = Field(description="mjproxy's API generation")
    queue_limit: int = Field(ge=1, description="unfinished tasks the account may have")
    modes: list[str] = Field(description="the modes it serves (empty: all)")
    weight: float = Field(gt=0, description="its share of the pool's tasks, for its limit")
    enabled: bool = Field(description="false: it sends nothing (ACCOUNTS_FILE)")
    slots_in_use: int = Field(ge=0, description="tasks sent and not yet final")
    waiting: int = Field(ge=0, description="tasks queued for a slot in its pool (its "
                                           "provider's accounts)")
    waiting_by_tenant: dict[str, int] = Field(
        description="the pool's tasks waiting, by tenant, in the order the tenants take "
                    "turns")
    health: Literal["ok", "paused"] = Field(
        description="paused: the provider refused or could not take a task (full, busy, "
                    "our key refused): no task is sent to it until paused_until (1 s "
                    "doubling to 30 s; to 10 minutes for a refused key); the pool's other "
                    "accounts take the tasks")
    paused_until: str | None = Field(description="ISO 8601, UTC")
    last_error: str | None = Field(description="the provider's last refusal: code: detail")
    last_error_at: str | None
    tasks_sent: int = Field(ge=0, description="tasks the provider accepted")


class Accounts(Model):
    accounts: list[AccountState]


async def accounts(request: Request) -> Response:
    """``GET /admin/accounts``: each account's limit, slots in use, and who is waiting."""
    authenticate_admin(request)
    svc = services(request)
    out = []
    queues: dict[str, tuple[int, dict[str, int]]] = {}
    for name, account in svc.settings.accounts.items():
        pool = account.provider
        if pool not in queues:
            queues[pool] = await svc.admission.depth(pool), await svc.admission.waiting(pool)
        waiting, by_tenant = queues[pool]
        held = await svc.admission.in_use(pool, name)
        health = {k.decode(): v.decode() for k, v in (await svc.redis.hgetall(  # type: ignore[misc]
            svc.store.keys.health(name, pool))).items()}
        until = int(health.get("paused_until", 0))
        paused = iso(datetime.fromtimestamp(until / 1000, UTC)) if until else None
        out.append({"name": name, "provider": account.provider,
                    "flavor": account.flavor if account.provider == "mjproxy" else None,
                    "queue_limit": account.queue_limit, "modes": list(account.modes),
                    "weight": account.weight, "enabled": account.enabled,
                    "slots_in_use": held, "waiting": waiting,
                    "waiting_by_tenant": by_tenant,
                    "health": "paused" if until > now_ms() else "ok",
                    "paused_until": paused,
                    "last_error": health.get("last_error"),
                    "last_error_at": health.get("last_error_at"),
                    "tasks_sent": int(health.get("sent", 0))})
    return JSONResponse({"accounts": out})


ROUTES = [Route("/admin/accounts", accounts, methods=["GET"])]
OPERATIONS: dict[str, dict[str, Operation]] = {
    "/admin/accounts": {"get": Operation(
        "The provider accounts: limits, slots in use, tasks waiting by tenant, health",
        tenant=False,
        responses={
            200: ok("Every configured account", Accounts),
            401: error("admin_key_required: no admin key, or not one of RECEIVER_ADMIN_KEYS"),
            403: error("admin_disabled: no RECEIVER_ADMIN_KEYS are set"),
            **UNAVAILABLE,
        })},
}
