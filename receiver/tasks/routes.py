"""Tenant routes: minting callback URLs and subscribe tokens, reading tasks."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from receiver.core.constants import JOB_ID_RE
from receiver.core.errors import BadRequest
from receiver.core.models import TaskStatus, new_job_id
from receiver.core.settings import Settings
from receiver.core.tokens import CallbackClaims, SubscribeClaims
from receiver.providers.dialects import DIALECTS
from receiver.services.auth import authenticate
from receiver.services.container import services
from receiver.services.http import JSONResponse, json_model, task_or_404
from receiver.store import history
from receiver.tasks.schemas import MAX_PAGE, NewCallbackUrl, NewSubscribeToken

# A mint's body is a few short fields (a prompt: 8 KiB at most): no need for MAX_BODY_BYTES.
MAX_MINT_BODY = 32 * 1024


class UntrustedHost(BadRequest):
    code = "untrusted_host"


def callback_base(request: Request, settings: Settings) -> str:
    """What a minted callback URL starts with: PUBLIC_BASE_URL, else the request's own
    address if its host is trusted (TRUSTED_HOSTS, loopback names by default). The Host
    header is the client's to write: a URL formed from ``Host: evil.example`` would send the
    provider's callbacks, token and all, to evil.example."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    host = (request.url.hostname or "").lower()
    if host not in settings.trusted_hosts:
        raise UntrustedHost(
            f"callback URLs are not formed from the Host {host[:80]!r} (not in TRUSTED_HOSTS)"
            ": set PUBLIC_BASE_URL to the address providers reach this service at")
    return str(request.base_url).rstrip("/")


async def create_callback_url(request: Request) -> Response:
    """Mint a signed callback URL for a task the tenant submits elsewhere, and record the
    task (NOT_START) so its callbacks, and readers, find it."""
    tenant = authenticate(request)
    svc = services(request)
    svc.mint_limiter.take(tenant, "callback URLs minted")
    new = await json_model(request, NewCallbackUrl, MAX_MINT_BODY)
    provider = new.provider
    if provider not in DIALECTS:
        raise BadRequest(f"'provider' must be one of {sorted(DIALECTS)}")
    fields: dict[str, Any] = {name: value for name, value in (
        ("action", _upper(new.action)), ("mode", _upper(new.mode)), ("prompt", new.prompt),
        ("parent_id", new.parent_id),
        ("provider_task_id", None if new.provider_task_id is None
         else new.provider_task_id.strip())) if value is not None}
    base = callback_base(request, svc.settings)
    claims = CallbackClaims(new_job_id(), tenant, provider)
    ptid = fields.get("provider_task_id")
    if ptid is None:
        outcome = await svc.store.create(claims, **fields)
    else:  # the id is the first task's (see `claims`)
        await svc.claims.claim(claims, ptid)
        try:
            outcome = await svc.store.create(claims, claimed=True, **fields)
        except BaseException:
            with contextlib.suppress(RedisError):
                await svc.claims.release(claims, ptid)
            raise
    token = svc.signer.mint_callback(claims)
    assert outcome.data is not None  # a fresh job id cannot exist already
    return JSONResponse(
        b'{"job_id":"%s","callback_url":%s,"task":%s}' % (
            claims.job_id.encode(),
            orjson.dumps(f"{base}/callbacks/{provider}?token={token}"),
            outcome.data,
        ),
        status_code=201,
    )


async def create_subscribe_token(request: Request) -> Response:
    """A short-lived token for ``?token=`` on the SSE routes (an EventSource cannot send an
    Authorization header): for every task of the tenant, or for one (``task_id``)."""
    tenant = authenticate(request)
    svc = services(request)
    svc.mint_limiter.take(tenant, "subscribe tokens minted")
    task_id = (await json_model(request, NewSubscribeToken, MAX_MINT_BODY)).task_id
    if task_id is not None:
        await task_or_404(svc, tenant, task_id)
    token = svc.signer.mint_subscribe(SubscribeClaims(tenant, task_id))
    path = f"/tasks/{task_id}/events" if task_id else "/events"
    return JSONResponse(
        {"token": token, "expires_in": svc.settings.subscribe_token_ttl,
         "events_url": f"{path}?token={token}"},
        status_code=201,
    )


async def get_task(request: Request) -> Response:
    """``GET /tasks/{id}``: the tenant's task, as stored."""
    tenant = authenticate(request)
    return JSONResponse(await task_or_404(services(request), tenant,
                                          request.path_params["job_id"]))


async def get_history(request: Request) -> Response:
    """``GET /tasks/{id}/history``: every stored transition of the tenant's task, oldest
    first, each with the provider's raw body as stored (a finished task's compacted history
    included: `receiver.store.history`)."""
    tenant = authenticate(request)
    svc = services(request)
    job_id = request.path_params["job_id"]
    await task_or_404(svc, tenant, job_id)
    entries = await history.read(svc.redis, svc.store.keys, tenant, job_id)
    items = [b'{"event_id":%s,"event":%s,"task":%s,%s}' % (
        orjson.dumps(entry_id.decode()), orjson.dumps(fields[b"event"].decode()),
        fields[b"data"], _raw(fields.get(b"raw", b""))) for entry_id, fields in entries]
    return JSONResponse(b'{"task_id":"%s","transitions":[%s]}' % (
        job_id.encode(), b",".join(items)))


def _raw(raw: bytes) -> bytes:
    """The raw body as a JSON member: text as sent, or base64 if it is not UTF-8."""
    try:
        return b'"raw":%s' % orjson.dumps(raw.decode())
    except UnicodeDecodeError:
        return b'"raw":null,"raw_base64":"%s"' % base64.b64encode(raw)


async def list_tasks(request: Request) -> Response:
    """``GET /tasks``: a page of the tenant's tasks, newest first, by status if asked."""
    tenant = authenticate(request)
    params = request.query_params
    status = None
    if params.get("status"):
        try:
            status = TaskStatus(params["status"].upper())
        except ValueError:
            raise BadRequest(f"'status' must be one of {[s.value for s in TaskStatus]}") from None
    try:
        limit = int(params.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_PAGE}")
    cursor = params.get("cursor") or None
    if cursor is not None and not JOB_ID_RE.match(cursor):
        raise BadRequest("'cursor' is not one this service gave out")
    tasks, next_cursor = await services(request).store.list(tenant, status, limit, cursor)
    return JSONResponse(
        b'{"tasks":[%s],"next_cursor":%s}' % (b",".join(tasks), orjson.dumps(next_cursor))
    )


def _upper(value: str | None) -> str | None:
    """An action or mode as stored: upper-case, without surrounding blanks."""
    return None if value is None else value.strip().upper()
