"""``POST /callbacks/{provider}``: where providers deliver task state.

The order of checks is the order of cost: provider name, token (no body read for a caller
without one), body size, dialect, then the one round trip to Redis. The answer is sent only
after Redis has stored the transition, or recognised it as a duplicate or stale.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from receiver.dialects import DIALECTS
from receiver.errors import NotFound, PayloadTooLarge
from receiver.services import services
from receiver.tokens import WrongJob


class UnknownProvider(NotFound):
    code = "unknown_provider"


async def receive_callback(request: Request) -> Response:
    svc = services(request)
    provider = request.path_params["provider"]
    parser = DIALECTS.get(provider)
    if parser is None:
        raise UnknownProvider(f"no provider is called {provider[:40]!r}; known: {_KNOWN}")
    claims = svc.signer.verify_callback(request.query_params.get("token"), provider)
    body = await read_body(request, svc.settings.max_body_bytes)
    outcome = await svc.store.apply(claims, parser(body))
    if outcome.result == "conflict":
        raise WrongJob("this token's job is bound to another provider task")
    return Response(
        orjson.dumps({"result": outcome.result, "job_id": claims.job_id,
                      "version": outcome.version}),
        media_type="application/json",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_KNOWN = ", ".join(sorted(DIALECTS))
