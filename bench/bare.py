"""The baseline for ``bench.ingest``: a bare Starlette endpoint that only reads the body.

Same route shape as the receiver's callback route, no middleware, no token check, no parsing,
no Redis: what one uvicorn worker costs per request before our code does anything.
Run with ``uvicorn bench.bare:create_app --factory`` (the same flags as the receiver).
``create_floor_app`` adds the one Redis round trip a durable answer needs.
"""

from __future__ import annotations

import os

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


# --- the floor: the bare endpoint, plus the one Redis round trip a durable answer needs ---

FLOOR_KEY = b"bench:floor"
_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]) return 1"


def create_floor_app() -> Starlette:
    """The bare endpoint that, before it answers, hands the body to Redis through the
    receiver's own auto-pipelined connection (`ScriptBatcher`, ``REDIS_URL``): one script
    that SETs it under one key. What any service that stores a callback before answering
    pays here, with nothing else of ours: the ceiling of our rate on this host."""
    from receiver.store.batcher import ScriptBatcher

    batcher = ScriptBatcher(os.environ["REDIS_URL"], _SCRIPT)

    async def stored(request: Request) -> Response:
        await batcher.call((FLOOR_KEY,), (await request.body(),))
        return Response(_STORED, media_type="application/json")

    return Starlette(routes=[Route("/callbacks/{provider}", stored, methods=["POST"])])
