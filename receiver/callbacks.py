"""``POST /callbacks/{provider}``: where providers deliver task state. The hot path.

The order of checks is the order of cost: provider name, token (no body read for a caller
without one), body size, dialect, then the one round trip to Redis. The answer is sent only
after Redis has stored the transition, or recognised it as a duplicate or stale.

`fastpath.FastPath` hands these requests to the endpoint before Starlette's exception and
routing layers (measured in ARCHITECTURE.md); errors still go through the app's handlers.
"""

from __future__ import annotations

import asyncio
import zlib
from time import perf_counter
from urllib.parse import unquote

import orjson
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from receiver.dialects import DIALECTS
from receiver.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ReceiverError,
    StoreUnavailable,
)
from receiver.limits import check_json
from receiver.models import TaskStatus
from receiver.reconciler import verify
from receiver.services import Services
from receiver.tokens import WrongJob

PREFIX = "/callbacks/"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class UnknownProvider(NotFound):
    code = "unknown_provider"


async def receive_callback(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI endpoint. Raises domain and Redis errors for the handlers to answer."""
    svc: Services = scope["app"].state.services
    provider = scope["path"][len(PREFIX):]
    try:
        outcome = await _receive(svc, provider, scope, receive, send)
    except ReceiverError as exc:
        svc.metrics.callback(provider if provider in DIALECTS else "unknown", exc.code)
        raise
    except RedisError:
        svc.metrics.callback(provider, StoreUnavailable.code)
        raise
    if outcome is not None:
        svc.metrics.callback(provider, outcome)


async def _receive(svc: Services, provider: str, scope: Scope, receive: Receive, send: Send
                   ) -> str | None:
    """Answers the callback; returns its outcome (None: the sender hung up)."""
    parser = DIALECTS.get(provider)
    if parser is None:
        raise UnknownProvider(f"no provider is called {provider[:40]!r}; known: {_KNOWN}")
    claims = svc.signer.verify_callback(_token(scope["query_string"]), provider)
    settings = svc.settings
    svc.callback_limiter.take(claims.job_id, "callbacks for this task")
    length, encoding = _framing(scope)
    body = await read_body(receive, length, settings.max_body_bytes, settings.body_timeout)
    if body is None:
        return None  # the sender hung up: nobody to answer
    if encoding is not None:
        body = decode_body(body, encoding, settings.max_body_bytes)
    check_json(body, settings.max_json_depth, settings.max_json_containers)
    update = parser(body)
    if update.status is TaskStatus.SUCCESS and settings.verify_final:
        # Unsigned callbacks: a SUCCESS is what the provider says when asked.
        checked = await verify(svc, claims, update)
        if checked is None:  # cannot ask now: the reconciler will
            await _answer(send, 202, b'{"result":"verifying","job_id":"%s","version":null}'
                          % claims.job_id.encode())
            return "verifying"
        update = checked
    started = perf_counter()
    outcome = await svc.store.apply(claims, update, enforce=True)
    if outcome.result == "unclaimed":  # (a cluster) it would bind the task: claim the id
        assert update.provider_task_id is not None
        await svc.claims.claim(claims, update.provider_task_id)
        outcome = await svc.store.apply(claims, update, claimed=True, enforce=True)
    svc.metrics.transition_seconds.observe(perf_counter() - started)
    if outcome.result == "conflict":
        raise WrongJob("this token's job is bound to another provider task")
    await _answer(send, 200, b'{"result":"%s","job_id":"%s","version":%s}' % (
        outcome.result.encode(), claims.job_id.encode(), orjson.dumps(outcome.version),
    ))
    return outcome.result


async def _answer(send: Send, status: int, answer: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


class CallbackEndpoint:
    """`receive_callback` for the route table (a class, so Starlette mounts it as ASGI). Only
    requests the fast path leaves alone reach it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive_callback(scope, receive, send)


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


def _framing(scope: Scope) -> tuple[str | None, str | None]:
    """Content-Length and Content-Encoding, in one pass over the headers."""
    length = encoding = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value.decode("latin-1")
        elif name == b"content-encoding":
            encoding = value.decode("latin-1")
    return length, encoding


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


def _token(query_string: bytes) -> str | None:
    """The ``token`` query parameter, without parsing the rest of the query."""
    for part in query_string.split(b"&"):
        if part.startswith(b"token="):
            token = part[6:].decode("latin-1")
            return unquote(token) if "%" in token else token  # ours never need quoting
    return None


_KNOWN = ", ".join(sorted(DIALECTS))
