"""Auto-pipelining for the one hot command: the transition script.

Every callback is one EVALSHA. Through redis-py's pipeline each would be packed in Python and
wait for the batch before it; here the calls made during one event-loop tick are packed in C
(``hiredis.pack_command``) and written at once, without waiting for earlier replies, on one
connection of our own. Replies come back in order and resolve the callers' futures as they
are parsed (``hiredis.Reader``), so Python and Redis work at the same time. Idle, a call costs
one round trip; loaded, hundreds share each write.

Failure is plain: a lost connection or a silent one (no reply for ``timeout`` seconds) fails
every call in flight with a redis ``ConnectionError`` or ``TimeoutError`` (answered 503; the
transition is idempotent, so the sender's retry is safe), and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio.cluster import RedisCluster
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float


class _RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.replies = 0  # how many have arrived: the watchdog's sign of life
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                self.replies += 1
                future = self.waiting.popleft()
                if not future.done():  # a caller that went away leaves a done future
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.abort(RedisConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RedisConnectionError(f"lost the connection to Redis: {exc or 'closed'}"))

    def abort(self, error: Exception) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        if self.transport is None:  # lost between connecting and this (Redis killed)
            error = RedisConnectionError("lost the connection to Redis")
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        self.waiting.extend(futures)
        self.transport.write(data)


class ScriptBatcher:
    """Runs one Lua script for many concurrent callers over one auto-pipelined connection."""

    def __init__(self, url: str, source: str, timeout: float = 5.0,
                 locate: Callable[[], Awaitable[str]] | None = None) -> None:
        self.url = url
        # Behind Sentinel: where the master is now, asked at every (re)connection.
        self.locate = locate
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        self.timeout = timeout
        self._proto: _RespProtocol | None = None
        self._connecting = asyncio.Lock()
        self._buffer: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False

    async def call(self, keys: Sequence[bytes], args: Sequence[Arg]) -> Any:
        """Run the script once; raises redis errors (connection ones included)."""
        reply = await self._send((b"EVALSHA", self.sha, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or flushed its scripts: EVAL sends the source and caches it.
            reply = await self._send((b"EVAL", self.source, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("READONLY") and self._proto is not None:
                # A master demoted by a failover: reconnect (to wherever `locate` says).
                self._proto.abort(RedisConnectionError("Redis is now a replica"))
                self._proto = None
                raise RedisConnectionError(f"Redis is a replica now: {reply}")
            raise ResponseError(str(reply))
        return reply

    async def command(self, *args: Arg) -> Any:
        """Any other command, on the same connection (for checks and tests)."""
        reply = await self._send(args)
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    async def keyed(self, key: bytes, *args: Arg) -> Any:
        """A command on ``key`` (``args`` hold it), pipelined with the scripts: through
        redis-py's pool, the claims of a callback burst cost 16% of the ingest rate and
        quadrupled its p99 (bench/ingest --against)."""
        return await self.command(*args)

    async def close(self) -> None:
        """Wait (up to the timeout) for calls in flight, then close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (self._futures or (self._proto and self._proto.waiting)) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        if self._proto is not None:
            self._proto.abort(RedisConnectionError("closed"))
            self._proto = None

    async def _send(self, command: tuple[Arg, ...]) -> Any:
        if self._proto is None or not self._proto.alive:
            await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._buffer.append(hiredis.pack_command(command))  # type: ignore[arg-type]
        self._futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        data, futures = b"".join(self._buffer), self._futures
        self._buffer, self._futures = [], []
        proto = self._proto
        if proto is None or not proto.alive:
            error = RedisConnectionError("no connection to Redis")
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        proto.send(data, futures)
        if proto.watchdog is None:
            self._arm_watchdog(proto)

    def _arm_watchdog(self, proto: _RespProtocol) -> None:
        """Each connection has its own: a silent one fails its calls within ~2 timeouts."""
        seen = proto.replies

        def check() -> None:
            proto.watchdog = None
            if not proto.waiting:
                return
            if proto.replies == seen:
                proto.abort(RedisTimeoutError(f"Redis sent no reply for {self.timeout} s"))
            else:
                self._arm_watchdog(proto)

        proto.watchdog = asyncio.get_running_loop().call_later(self.timeout, check)

    async def _connect(self) -> None:
        async with self._connecting:
            if self._proto is not None and self._proto.alive:
                return
            url = await self.locate() if self.locate is not None else self.url
            params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
            loop = asyncio.get_running_loop()
            cls = params.get("connection_class")
            try:
                if cls is UnixDomainSocketConnection:
                    opening = loop.create_unix_connection(_RespProtocol, params["path"])
                else:
                    tls = ssl.create_default_context() if cls is SSLConnection else None
                    opening = loop.create_connection(
                        _RespProtocol, params.get("host", "localhost"),
                        params.get("port", 6379), ssl=tls,
                    )
                _, proto = await asyncio.wait_for(opening, min(self.timeout, 2.0))
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot reach Redis: {exc}") from exc
            hello: list[tuple[Arg, ...]] = []
            if params.get("password"):
                hello.append(("AUTH", *filter(None, (params.get("username"),)),
                              params["password"]))
            if params.get("db"):
                hello.append(("SELECT", params["db"]))
            hello.append(("SCRIPT", "LOAD", self.source))
            futures = [loop.create_future() for _ in hello]
            proto.send(b"".join(hiredis.pack_command(c) for c in hello), futures)  # type: ignore[arg-type]
            try:
                replies = await asyncio.wait_for(asyncio.gather(*futures), self.timeout)
            except TimeoutError as exc:
                proto.abort(RedisTimeoutError("Redis did not answer the handshake"))
                raise RedisTimeoutError("Redis did not answer the handshake") from exc
            except BaseException:  # cancelled: this connection would be nobody's
                proto.abort(RedisConnectionError("handshake abandoned"))
                raise
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    proto.abort(RedisConnectionError(str(reply)))
                    raise RedisConnectionError(f"Redis refused the handshake: {reply}")
            self._proto = proto


class ClusterBatcher:
    """`ScriptBatcher` on Redis Cluster: one per master, each call sent to the master of its
    first key's slot (the script's keys share a hash tag, so one slot). A MOVED or ASK answer
    (slots resharded or failed over) refreshes the slot map and is tried once more."""

    def __init__(self, cluster: RedisCluster, url: str, source: str,
                 timeout: float = 5.0) -> None:
        self.cluster = cluster
        self.url = url
        self.source = source
        self.timeout = timeout
        self._masters: dict[str, ScriptBatcher] = {}

    async def call(self, keys: Sequence[bytes], args: Sequence[Arg]) -> Any:
        return await self._routed(keys[0], lambda batcher: batcher.call(keys, args))

    async def keyed(self, key: bytes, *args: Arg) -> Any:
        """A command on ``key``, sent to the master of its slot."""
        return await self._routed(key, lambda batcher: batcher.command(*args))

    async def _routed(self, key: bytes, run: Callable[[ScriptBatcher], Awaitable[Any]]
                      ) -> Any:
        for attempt in (1, 2):
            node = self.cluster.get_node_from_key(key.decode())
            if node is None:
                raise RedisConnectionError("no Redis Cluster master serves this slot")
            batcher = self._masters.get(node.name)
            if batcher is None:
                batcher = self._masters[node.name] = ScriptBatcher(
                    node_url(self.url, str(node.host), int(node.port)), self.source,
                    self.timeout)
            try:
                return await run(batcher)
            except ResponseError as exc:
                if attempt == 2 or not str(exc).startswith(("MOVED", "ASK")):
                    raise
                await self.cluster.nodes_manager.initialize()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for batcher in self._masters.values():
            await batcher.close()


def node_url(url: str, host: str, port: int) -> str:
    """``url`` (its scheme, credentials and options) pointed at one node."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, "", parts.query, ""))
