"""Tenant and operator routes: minting callback URLs, reading tasks, health."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from receiver.auth import authenticate, authenticate_metrics
from receiver.callbacks import decode_body, read_body
from receiver.constants import JOB_ID_RE
from receiver.dialects import DIALECTS
from receiver.errors import BadRequest, NotFound, StoreUnavailable
from receiver.limits import check_json
from receiver.models import TaskStatus, new_job_id
from receiver.services import Services, services
from receiver.settings import Settings
from receiver.tokens import CallbackClaims, SubscribeClaims

MAX_PAGE = 200
# A mint's body is a few short fields (a prompt: 8 KiB at most): no need for MAX_BODY_BYTES.
MAX_MINT_BODY = 32 * 1024


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


class TaskNotFound(NotFound):
    code = "task_not_found"


async def task_or_404(svc: Services, tenant: str, job_id: str) -> bytes:
    """The tenant's task (snapshot JSON), or a 404 that says whose it is not."""
    task = await svc.store.get(tenant, job_id) if JOB_ID_RE.match(job_id) else None
    if task is None:
        raise TaskNotFound(f"no task {job_id[:40]!r} for this tenant")
    return task


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
    body = await json_object(request, MAX_MINT_BODY)
    provider = body.get("provider")
    if not isinstance(provider, str) or provider not in DIALECTS:
        raise BadRequest(f"'provider' must be one of {sorted(DIALECTS)}")
    fields: dict[str, Any] = {}
    for name in ("action", "mode", "prompt", "parent_id", "provider_task_id"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str) or len(value) > 8192:
                raise BadRequest(f"{name!r} must be a string")
            if name in ("action", "mode", "provider_task_id"):
                value = value.strip().upper() if name != "provider_task_id" else value.strip()
                if not value:
                    raise BadRequest(f"{name!r} must not be empty")
            fields[name] = value
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
    body = await json_object(request, MAX_MINT_BODY)
    task_id = body.get("task_id")
    if task_id is not None:
        if not isinstance(task_id, str) or not JOB_ID_RE.match(task_id):
            raise BadRequest("'task_id' must be a task id")
        await task_or_404(svc, tenant, task_id)
    token = svc.signer.mint_subscribe(SubscribeClaims(tenant, task_id))
    path = f"/tasks/{task_id}/events" if task_id else "/events"
    return JSONResponse(
        {"token": token, "expires_in": svc.settings.subscribe_token_ttl,
         "events_url": f"{path}?token={token}"},
        status_code=201,
    )


async def get_task(request: Request) -> Response:
    tenant = authenticate(request)
    return JSONResponse(await task_or_404(services(request), tenant,
                                          request.path_params["job_id"]))


async def list_tasks(request: Request) -> Response:
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


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus metrics; what Redis holds (queue depth, slots) is read now. With
    METRICS_TOKEN set, only for ``Authorization: Bearer <METRICS_TOKEN>``."""
    authenticate_metrics(request)
    svc = services(request)
    for name, account in svc.settings.accounts.items():
        waiting, held = await svc.admission.depth(name)
        svc.metrics.queue_depth.labels(name).set(waiting)
        svc.metrics.slots_in_use.labels(name).set(held)
        svc.metrics.slots_limit.labels(name).set(account.queue_limit)
    return svc.metrics.render()


async def readyz(request: Request) -> Response:
    """Ready when Redis answers: without it nothing can be acknowledged."""
    try:
        await services(request).store.ping()
    except Exception as exc:
        raise StoreUnavailable(f"Redis does not answer: {type(exc).__name__}") from exc
    return JSONResponse({"status": "ready"})


async def json_object(request: Request, limit: int | None = None) -> dict[str, Any]:
    """The request's JSON object, within the body size (MAX_BODY_BYTES, or ``limit`` if
    smaller), time and depth limits."""
    settings = services(request).settings
    limit = min(limit or settings.max_body_bytes, settings.max_body_bytes)
    raw = await read_body(request.receive, request.headers.get("content-length"), limit,
                          settings.body_timeout)
    if raw is None:
        raise ClientDisconnect()
    encoding = request.headers.get("content-encoding")
    if encoding is not None:
        raw = decode_body(raw, encoding, limit)
    check_json(raw, settings.max_json_depth, settings.max_json_containers)
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
