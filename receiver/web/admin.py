"""Operators' routes (``RECEIVER_ADMIN_KEYS``): what the provider accounts are doing."""

from __future__ import annotations

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.core.docs import UNAVAILABLE, Operation, error, ok
from receiver.core.schema import Model
from receiver.services.auth import authenticate_admin
from receiver.services.container import services
from receiver.services.http import JSONResponse


class AccountState(Model):
    name: str
    provider: str
    flavor: str | None = Field(description="mjproxy's API generation")
    queue_limit: int = Field(ge=1, description="unfinished tasks the account may have")
    slots_in_use: int = Field(ge=0, description="tasks sent and not yet final")
    waiting: int = Field(ge=0, description="tasks queued for a slot")
    waiting_by_tenant: dict[str, int] = Field(
        description="the tasks waiting, by tenant, in the order the tenants take turns")


class Accounts(Model):
    accounts: list[AccountState]


async def accounts(request: Request) -> Response:
    """``GET /admin/accounts``: each account's limit, slots in use, and who is waiting."""
    authenticate_admin(request)
    svc = services(request)
    out = []
    for name, account in svc.settings.accounts.items():
        waiting, held = await svc.admission.depth(name)
        out.append({"name": name, "provider": account.provider,
                    "flavor": account.flavor if account.provider == "mjproxy" else None,
                    "queue_limit": account.queue_limit, "slots_in_use": held,
                    "waiting": waiting, "waiting_by_tenant": await svc.admission.waiting(name)})
    return JSONResponse({"accounts": out})


ROUTES = [Route("/admin/accounts", accounts, methods=["GET"])]
OPERATIONS: dict[str, dict[str, Operation]] = {
    "/admin/accounts": {"get": Operation(
        "The provider accounts: limits, slots in use, tasks waiting by tenant", tenant=False,
        responses={
            200: ok("Every configured account", Accounts),
            401: error("admin_key_required: no admin key, or not one of RECEIVER_ADMIN_KEYS"),
            403: error("admin_disabled: no RECEIVER_ADMIN_KEYS are set"),
            **UNAVAILABLE,
        })},
}
