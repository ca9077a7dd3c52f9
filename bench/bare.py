"""The baseline for ``bench.ingest``: a bare Starlette endpoint that only reads the body.

Same route shape as the receiver's callback route, no middleware, no token check, no parsing,
no Redis: what one uvicorn worker costs per request before our code does anything.
Run with ``uvicorn bench.bare:create_app --factory`` (the same flags as the receiver).
``create_floor_app`` adds the one Redis round trip a durable answer needs;
``create_writes_app``, the Redis calls of one stored transition, without its logic.
"""

from __future__ import annotations

import os
import zlib

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


# --- the writes floor: the floor, with the Redis writes of one stored transition ---

_WRITES = """
redis.call('HMGET', KEYS[1], 'r', 's', 'p', 'v', 'c', 'a', 'x')
redis.call('GET', KEYS[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'event', 'task.progress',
  'data', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '12', '*', 'event', 'task.progress',
  'data', ARGV[2], 'raw', ARGV[1])
redis.call('SET', KEYS[4], '1-1')
redis.call('HSET', KEYS[1], 'r', '500', 's', 'IN_PROGRESS', 'v', ARGV[3])
redis.call('PUBLISH', KEYS[5], ARGV[2])
return 1
"""


def create_writes_app() -> Starlette:
    """The floor, whose script makes the Redis calls of one stored progress transition
    (read the task and the tenant's last event id; XADD to the tenant's stream and to the
    task's history, the body as raw and a snapshot of about our size; write the last id
    and the task; PUBLISH), with none of the transition's logic: no split, no merge, no
    quota, no index. Keys per tenant, as ours, and per job (by its query string) from a
    pool of 4,096, each history capped at a task's 12 entries: ours deletes a finished
    task's stream, and Redis growing by every run's histories would slow every side after
    it. What the transition's writes alone cost here."""
    from receiver.store.batcher import ScriptBatcher

    batcher = ScriptBatcher(os.environ["REDIS_URL"], _WRITES)

    async def stored(request: Request) -> Response:
        body = await request.body()
        job = b"%d" % (zlib.crc32(request.scope["query_string"]) % 4096)
        await batcher.call((b"bench:{t}:task:" + job, b"bench:{t}:history:" + job,
                            b"bench:{t}:stream", b"bench:{t}:last", b"bench:{t}:events"),
                           (body, body + body, body))
        return Response(_STORED, media_type="application/json")

    return Starlette(routes=[Route("/callbacks/{provider}", stored, methods=["POST"])])
