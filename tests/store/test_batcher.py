"""The auto-pipelined connection: failures are reported, never hung on; replies stay in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from receiver.cli.redis_server import RedisServer
from receiver.store.batcher import ScriptBatcher

SCRIPT = "return ARGV[1]"


@asynccontextmanager
async def fake_redis(behaviour: Callable[[int], str]) -> AsyncIterator[str]:
    """A server that answers the handshake (SCRIPT LOAD) and then, per connection number,
    'silent' (reads, never answers) or 'close' (hangs up on the first command)."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        mode = behaviour(connections)
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[0].upper() == b"SCRIPT":
                    sha = ScriptBatcher("redis://x", SCRIPT).sha
                    writer.write(b"$40\r\n%s\r\n" % sha)
                elif mode == "close":
                    writer.close()
                    return
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 20))  # a hang fails, it does not block CI


def test_a_silent_redis_fails_the_call_in_bounded_time() -> None:
    async def body() -> None:
        async with fake_redis(lambda n: "silent") as url:
            batcher = ScriptBatcher(url, SCRIPT, timeout=0.3)
            with pytest.raises(RedisTimeoutError):
                await batcher.call([b"k"], [b"v"])
            await batcher.close()

    run(body)


def test_a_silent_replacement_connection_is_watched_too() -> None:
    async def body() -> None:
        async with fake_redis(lambda n: "close" if n == 1 else "silent") as url:
            batcher = ScriptBatcher(url, SCRIPT, timeout=0.3)
            with pytest.raises(RedisConnectionError):
                await batcher.call([b"k"], [b"x"])  # connection 1 hangs up
            with pytest.raises(RedisTimeoutError):
                await batcher.call([b"k"], [b"y"])  # connection 2 never answers
            await batcher.close()

    run(body)


def test_unreachable_redis_is_a_connection_error() -> None:
    from receiver.cli.redis_server import free_port

    async def body() -> None:
        batcher = ScriptBatcher(f"redis://127.0.0.1:{free_port()}/0", SCRIPT, timeout=0.5)
        with pytest.raises(RedisConnectionError):
            await batcher.call([b"k"], [b"v"])

    run(body)


def test_replies_reach_their_own_callers(redis_server: RedisServer) -> None:
    async def body() -> None:
        batcher = ScriptBatcher(redis_server.url, SCRIPT)
        replies = await asyncio.gather(*(batcher.call([b"k"], [b"%d" % i]) for i in range(2000)))
        assert replies == [b"%d" % i for i in range(2000)]
        await batcher.close()

    run(body)


def test_a_flushed_script_cache_is_survived(redis_server: RedisServer) -> None:
    async def body() -> None:
        batcher = ScriptBatcher(redis_server.url, SCRIPT)
        assert await batcher.call([b"k"], [b"before"]) == b"before"
        redis.Redis(port=redis_server.port).script_flush()
        replies = await asyncio.gather(*(batcher.call([b"k"], [b"%d" % i]) for i in range(50)))
        assert replies == [b"%d" % i for i in range(50)]  # NOSCRIPT, then EVAL, each once
        await batcher.close()

    run(body)


def test_a_connection_lost_before_the_first_write_fails_its_calls_as_redis_errors() -> None:
    """Redis killed between accepting and the handshake: a redis ConnectionError (a 503),
    not an assertion (a 500; seen once in 10,713 requests of a chaos run)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from receiver.store.batcher import _RespProtocol

    async def scenario() -> BaseException | None:
        proto = _RespProtocol()
        proto.connection_lost(ConnectionResetError())
        future = asyncio.get_running_loop().create_future()
        proto.send(b"*1\r\n$4\r\nPING\r\n", [future])
        return future.exception()

    assert isinstance(asyncio.run(scenario()), RedisConnectionError)
