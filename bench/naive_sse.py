"""The baseline for ``bench.sse``: SSE the way a user would write it without our hub.

A small Starlette app on sse-starlette in which every SSE client opens its own Redis pub/sub
subscription to the tenant's channel (the channel our service publishes every event on) and
forwards each message as one ``data:`` event: one Redis connection, one SUBSCRIBE and one
redis-py reader per client. Ping interval and everything else are sse-starlette's defaults
(15 s, the same as the receiver's).

Run with ``uvicorn bench.naive_sse:create_app --factory`` (the same flags as the receiver);
``REDIS_URL`` names the Redis, ``REDIS_PREFIX`` the key prefix (default ``receiver``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from receiver.core.constants import DEFAULT_PREFIX, Keys
from receiver.core.settings import DEFAULT_TENANT


async def events(request: Request) -> EventSourceResponse:
    redis: Redis = request.app.state.redis
    channel: str = request.app.state.channel

    async def stream() -> AsyncIterator[dict[str, str]]:
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield {"data": message["data"].decode()}

    return EventSourceResponse(stream())


def create_app() -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.redis = Redis.from_url(os.environ["REDIS_URL"])
        app.state.channel = Keys(os.environ.get("REDIS_PREFIX") or DEFAULT_PREFIX).channel(
            DEFAULT_TENANT)
        try:
            yield
        finally:
            await app.state.redis.aclose()

    return Starlette(routes=[Route("/events", events, methods=["GET"])], lifespan=lifespan)
