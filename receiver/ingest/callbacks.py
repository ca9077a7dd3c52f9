"""``POST /callbacks/{provider}``: where providers deliver task state. The hot path.

The order of checks is the order of cost: provider name, token (no body read for a caller
without one), body size, dialect, then the one round trip to Redis. The answer is sent only
after Redis has stored the transition, or recognised it as a duplicate or stale.

`ingest` is the callback, whoever serves it: `receiver.server.direct` under ``receiver
serve`` (past ASGI, the body in hand), or the ASGI endpoint `receive_callback`, which
`fastpath.FastPath` reaches before Starlette's exception and routing layers (measured in
ARCHITECTURE.md). Either way, errors are answered as the app's handlers answer them.
"""

from __future__ import annotations

from time import perf_counter
from urllib.parse import unquote

import orjson
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from receiver.core.errors import (
    NotFound,
    PayloadTooLarge,
    ReceiverError,
    StoreUnavailable,
)
from receiver.core.limits import check_json
from receiver.core.models import TaskStatus
from receiver.core.tokens import WrongJob
from receiver.ingest.verify import verify
from receiver.providers.dialects import DIALECTS
from receiver.services.container import Services
from receiver.services.http import decode_body, read_body

PREFIX = "/callbacks/"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class UnknownProvider(NotFound):
    code = "unknown_provider"


async def receive_callback(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI endpoint. Raises domain and Redis errors for the handlers to answer."""
    answered = await ingest(scope["app"].state.services, scope["path"][len(PREFIX):],
                            scope["query_string"], scope["headers"], None, receive)
    if answered is None:
        return  # the sender hung up: nobody to answer
    status, answer = answered
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


async def ingest(svc: Services, provider: str, query_string: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes | None, receive: Receive
                 ) -> tuple[int, bytes] | None:
    """The callback's (status, JSON answer), or None if its sender hung up. ``body``: the
    whole body when the caller has it (`receiver.server.direct`), else None and it is read
    from ``receive``, after the checks that need none. Raises domain and Redis errors,
    each counted by its code (an unknown provider's as ``unknown``)."""
    try:
        status, answer, outcome = await _receive(svc, provider, query_string, headers, body,
                                                 receive)
    except ReceiverError as exc:
        svc.metrics.callback(provider if provider in DIALECTS else "unknown", exc.code)
        raise
    except RedisError:
        svc.metrics.callback(provider, StoreUnavailable.code)
        raise
    if outcome is None:
        return None
    svc.metrics.callback(provider, outcome)
    return status, answer


async def _receive(svc: Services, provider: str, query_string: bytes,
                   headers: list[tuple[bytes, bytes]], body: bytes | None, receive: Receive
                   ) -> tuple[int, bytes, str | None]:
    """(status, answer, outcome); outcome None: the sender hung up."""
    parser = DIALECTS.get(provider)
    if parser is None:
        raise UnknownProvider(f"no provider is called {provider[:40]!r}; known: {_KNOWN}")
    claims = svc.signer.verify_callback(_token(query_string), provider)
    settings = svc.settings
    svc.callback_limiter.take(claims.job_id, "callbacks for this task")
    length, encoding = _framing(headers)
    if body is None:
        body = await read_body(receive, length, settings.max_body_bytes,
                               settings.body_timeout)
        if body is None:
            return 0, b"", None
    elif len(body) > settings.max_body_bytes:
        raise PayloadTooLarge(f"the body is over the limit of {settings.max_body_bytes} bytes")
    if encoding is not None:
        body = decode_body(body, encoding, settings.max_body_bytes)
    check_json(body, settings.max_json_depth, settings.max_json_containers)
    update = parser(body)
    if update.status is TaskStatus.SUCCESS and settings.verify_final:
        # Unsigned callbacks: a SUCCESS is what the provider says when asked.
        checked = await verify(svc, claims, update)
        if checked is None:  # cannot ask now: the reconciler will
            return 202, b'{"result":"verifying","job_id":"%s","version":null}' % (
                claims.job_id.encode()), "verifying"
        update = checked
    started = perf_counter()
    outcome = await svc.store.apply(claims, update, enforce=True)
    if outcome.result == "unclaimed":  # (a cluster) it would bind the task: claim the id
        assert update.provider_task_id is not None
        await svc.claims.claim(claims, update.provider_task_id)
        outcome = await svc.store.apply(claims, update, claimed=True, enforce=True)
    svc.metrics.transition(perf_counter() - started)
    if outcome.result == "conflict":
        raise WrongJob("this token's job is bound to another provider task")
    return 200, b'{"result":"%s","job_id":"%s","version":%s}' % (
        outcome.result.encode(), claims.job_id.encode(), orjson.dumps(outcome.version),
    ), outcome.result


class CallbackEndpoint:
    """`receive_callback` for the route table (a class, so Starlette mounts it as ASGI). Only
    requests the fast path leaves alone reach it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive_callback(scope, receive, send)


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """Content-Length and Content-Encoding, in one pass over the headers."""
    length = encoding = None
    for name, value in headers:
        if name == b"content-length":
            length = value.decode("latin-1")
        elif name == b"content-encoding":
            encoding = value.decode("latin-1")
    return length, encoding


def _token(query_string: bytes) -> str | None:
    """The ``token`` query parameter, without parsing the rest of the query."""
    for part in query_string.split(b"&"):
        if part.startswith(b"token="):
            token = part[6:].decode("latin-1")
            return unquote(token) if "%" in token else token  # ours never need quoting
    return None


_KNOWN = ", ".join(sorted(DIALECTS))
