"""The baseline for ``bench.ingest``: a bare Starlette endpoint that only reads the body.

Same route shape as the receiver's callback route, no middleware, no token check, no parsing,
no Redis: what one uvicorn worker costs per request before our code does anything.
Run with ``uvicorn bench.bare:create_app --factory`` (the same flags as the receiver).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_STORED = b'{"result":"stored"}'


async def callback(request: Request) -> Response:
    await request.body()
    return Response(_STORED, media_type="application/json")


def create_app() -> Starlette:
    return Starlette(routes=[Route("/callbacks/{provider}", callback, methods=["POST"])])
