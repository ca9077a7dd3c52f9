"""What every HTTP capability shares: reading a bounded body, answering JSON, finding the
tenant's task."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from receiver.core.constants import JOB_ID_RE
from receiver.core.errors import BadRequest, NotFound, PayloadTooLarge, ReceiverError
from receiver.core.limits import check_json
from receiver.services.container import Services, services


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


async def read_body(receive: Receive, declared: str | None, limit: int,
                    timeout: float = 10.0) -> bytes | None:
    """The body, refused (413) as soon as it is known to exceed ``limit``, or (408) when the
    rest of it takes longer than ``timeout`` to come; None if the client went away."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    message = await receive()  # nearly always the whole body: no timer for it
    body: bytes = b""
    try:
        pieces = message.get("more_body") and timeout > 0  # 0: no limit
        async with asyncio.timeout(timeout if pieces else None):
            while True:
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")  # bytes, by the ASGI spec
                if len(body) > limit:
                    raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
                if not message.get("more_body", False):
                    return body
                message = await receive()
    except TimeoutError:
        raise SlowBody(f"the body did not arrive within {timeout:g} s") from None


class SlowBody(ReceiverError):
    status_code = 408
    code = "body_timeout"


class UnsupportedEncoding(ReceiverError):
    status_code = 415
    code = "unsupported_encoding"


_WBITS = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}  # deflate: zlib, or raw


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before its Content-Encoding (gzip, deflate, identity), inflated to
    ``limit`` bytes at most: a small body that inflates past it is a 413 after ``limit``
    bytes of work, not a bomb."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    tries = _WBITS.get(name)
    if tries is None:
        raise UnsupportedEncoding(f"Content-Encoding {name[:40]!r} is not supported: send "
                                  "gzip, deflate or identity")
    for wbits in tries:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"the body inflates past the limit of {limit} bytes")
        if inflater.eof:
            return out
    raise BadRequest(f"the body is not valid {name} data")


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


M = TypeVar("M", bound=BaseModel)


async def json_model(request: Request, model: type[M], limit: int | None = None) -> M:
    """The request's JSON object as ``model`` (strictly: no "1" for 1), or a 400 that names
    the first field at fault."""
    body = await json_object(request, limit)
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise BadRequest(f"{where!r}: {first['msg']}") from None
