"""The HTTP protocol ``receiver serve`` gives uvicorn: event streams held without a task.

Under plain uvicorn every open response is a task running the app, with its coroutine
chain, the request cycle's events and their deques: 14.8 KiB per idle SSE client even with
our own lean stream loop (BENCHMARKS.md). This protocol reads the first request line of a
connection. Anything but ``GET /events`` or ``GET /tasks/{id}/events`` over HTTP/1.1 is
handed to uvicorn's own protocol, bytes and all, as uvicorn itself hands a connection to its
WebSocket protocol. An event stream runs the app as usual (authentication, errors, the
replay of history all stay in `sse`), and once the replay has caught up with the live
events, `sse.EventStream` hands its subscription to this connection through the
``receiver.detach`` scope extension and returns. From then on the hub's reader writes each
event's frame straight to the transport: an idle client is this object, its subscription
and uvloop's transport, and no task or coroutine at all.

Every connection's head is bounded from its first moment: ``HEAD_TIMEOUT`` from the
connection's start and ``MAX_HEAD_BYTES``, here and, carried over with the hand-over, in
`guard.GuardedProtocol` (uvicorn's protocol with those bounds, and ``BODY_TIMEOUT``).

Responses served here end by closing the connection (``connection: close``), which is how an
event stream ends anyway, and a body without a length is chunked (each event one chunk, the
stream's end the last chunk): readers that buffer a close-delimited body (sseclient-py over
requests or urllib3) held each event until the next one came. A client that stops reading
is cut off once it is a queue's worth of events behind or has not drained for
``SSE_SEND_TIMEOUT``; it reconnects with Last-Event-ID and loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import httptools
from uvicorn.config import Config
from uvicorn.protocols.utils import (
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.server import ServerState

from receiver.events.hub import chunked
from receiver.ingest.callbacks import receive_callback
from receiver.live.sse import CUT, DETACH, PING
from receiver.server.access import access_log
from receiver.server.guard import GuardedProtocol, chosen, refusal, settings_of, stop_streams
from receiver.web import fastpath

if TYPE_CHECKING:
    from receiver.events.hub import Event, EventHub, Subscription

CLOSE_GRACE = 1.0  # seconds a closing connection's client gets to read what is buffered
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT = {"type": "http.disconnect"}
_PING_CHUNK, _CUT_CHUNK, _LAST_CHUNK = chunked(PING), chunked(CUT), b"0\r\n\r\n"

log = logging.getLogger("uvicorn.error")


class StreamProtocol(asyncio.Protocol):
    __slots__ = ("access", "app_state", "backlog", "buffer", "chunked", "config", "drained", "gone",
                 "head_cap",
                 "head_time", "hub", "lost", "paused", "requested", "responded", "scope",
                 "send_timeout", "sent", "server_state", "stopping", "sub", "successor",
                 "task_stream", "timer", "transport")
    # None: the app's settings (HEAD_TIMEOUT, MAX_HEAD_BYTES). A subclass may fix one (tests).
    head_timeout: float | None = None
    max_head_bytes: int | None = None

    def __init__(self, config: Config, server_state: ServerState,
                 app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        settings = settings_of(app_state)
        self.access = access_log(settings.log_format == "json") if config.access_log else None
        self.head_time = chosen(self.head_timeout, settings.head_timeout)
        self.head_cap = int(chosen(self.max_head_bytes, settings.max_head_bytes))
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None  # the head's deadline; a stall's
        self.successor: GuardedProtocol | None = None  # the protocol it was handed over to
        self.requested = False  # the request is read (and the app runs)
        self.scope: dict[str, Any] | None = None  # the request, until the access log has it
        self.stopping = False  # uvicorn is shutting down: a stream that detaches is cut
        self.lost = False  # the connection is gone
        self.responded = False  # the response's head is written
        self.chunked = False  # the body goes in chunks, and its last chunk is not yet sent
        self.gone: asyncio.Future[None] | None = None  # what `receive` waits on
        self.paused = False
        self.drained: asyncio.Future[None] | None = None  # what the app's `send` waits on
        # Once detached: the hub, the subscription, the last event id written (as a key),
        # whether one task's stream (it ends after its terminal event), and the events
        # written since the transport asked us to pause.
        self.hub: EventHub | None = None
        self.sub: Subscription | None = None
        self.sent = (0, 0)
        self.task_stream = False
        self.send_timeout = 0.0
        self.backlog = 0

    # --- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        if self.head_time > 0:
            self.timer = asyncio.get_running_loop().call_later(self.head_time,
                                                               self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server_state.connections.discard(self)
        self._cancel_timer()
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        self.resume_writing()
        if self.sub is not None and self.hub is not None:
            self.hub.release(self.sub)
            self.sub = None

    def data_received(self, data: bytes) -> None:
        if self.requested or self.transport is None:
            return  # the request is read; what follows is ignored (the connection closes)
        self.buffer += data
        if not self.buffer.startswith(b"GET /"[:len(self.buffer)]):
            self._hand_over()  # a callback (POST), at the cost of one comparison
            return
        line_end = self.buffer.find(b"\n")
        if line_end < 0:
            self._wait_for_more()
            return
        line_end -= 1  # at the CR (a bare LF is refused: by uvicorn, after a hand-over)
        target = _stream_target(self.buffer[:line_end]) if line_end > 0 and \
            self.buffer[line_end] == 13 else None
        if target is None:
            self._hand_over()
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            self._wait_for_more()
            return
        if 0 < self.head_cap < head_end + 4:
            self._hand_over()  # for the guard to refuse (431)
            return
        headers = _parse_head(self.buffer[:head_end + 4])
        if headers is None:
            self._hand_over()  # anything unusual gets uvicorn's handling
            return
        self._cancel_timer()
        self.buffer = b""
        self.requested = True
        self.server_state.total_requests += 1
        self._start(target, headers)

    def _wait_for_more(self) -> None:
        """A head in pieces: past MAX_HEAD_BYTES it is the guard's to refuse (431)."""
        if 0 < self.head_cap < len(self.buffer):
            self._hand_over()

    def _head_expired(self) -> None:
        """HEAD_TIMEOUT from the connection's start: 408, here or by the protocol the
        connection was handed over to (the timer goes with it)."""
        self.timer = None
        if self.successor is not None:
            self.successor.expire()
        elif self.transport is not None and not self.requested:
            self.transport.write(refusal(408, "head_timeout", "the request head did not "
                                         f"arrive within {self.head_time:g} s",
                                         self.server_state.default_headers))
            self._close()

    def _hand_over(self) -> None:
        """The connection becomes an ordinary (guarded) uvicorn connection, from its first
        byte and with the deadline of its head."""
        assert self.transport is not None
        self.server_state.connections.discard(self)
        protocol = GuardedProtocol(self.config, self.server_state, self.app_state,
                                   head_timer=self.timer)
        self.timer, self.successor = None, protocol
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        data, self.buffer, self.transport = self.buffer, b"", None
        protocol.data_received(data)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: a detached stream is told to reconnect elsewhere, and
        so is a stream still replaying, once it detaches; a connection yet to send a request,
        or one whose client stopped reading, ends now."""
        self.stopping = True
        stop_streams(self.app_state)
        if self.sub is not None:
            self.sub.cut()
        elif self.paused or not self.requested:
            self._close()

    def pause_writing(self) -> None:
        self.paused = True
        if self.sub is not None:
            self._arm_stall_timer()

    def _arm_stall_timer(self) -> None:
        """A detached client that does not drain within SSE_SEND_TIMEOUT is cut off."""
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(self.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        self.backlog = 0
        self._cancel_timer()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def _close(self) -> None:
        """Ends the connection after what is buffered. A client that has not taken that
        within CLOSE_GRACE (it stopped reading) is aborted rather than holding the close
        open: it reconnects with Last-Event-ID, and clients drop an unfinished event."""
        if self.transport is None:
            return
        self.transport.close()
        if self.paused:
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- the app, until the stream is detached ------------------------------------------

    def _start(self, target: tuple[bytes, bytes], headers: list[tuple[bytes, bytes]]) -> None:
        assert self.transport is not None
        raw_path, query = target
        scope = {
            "type": "http", "asgi": {"version": self.config.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1", "server": get_local_addr(self.transport),
            "client": get_remote_addr(self.transport),
            "scheme": "https" if is_ssl(self.transport) else "http", "method": "GET",
            "root_path": self.config.root_path, "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path, "query_string": query, "headers": headers,
            "state": self.app_state.copy(), "extensions": {DETACH: self.detach},
        }
        self.scope = scope
        task = asyncio.get_running_loop().create_task(self._run(scope))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.config.loaded_app(scope, self._receive, self._send)
        except Exception:  # as uvicorn: logged, and a 500 if nothing was sent yet
            log.exception("Exception in ASGI application")
            transport = self.transport
            if self.sub is None and not self.responded and transport is not None \
                    and not transport.is_closing():
                self._write_head(500, [(b"content-type", b"text/plain; charset=utf-8"),
                                       (b"content-length", b"21")])
                transport.write(b"Internal Server Error")
        finally:
            self.scope = None
            if self.sub is None:  # the response ends (unless the hub has the stream)
                self._close()

    async def _receive(self) -> dict[str, Any]:
        if self.gone is None:
            self.gone = asyncio.get_running_loop().create_future()
            return dict(_REQUEST)  # a message of its own: the app may keep or change it
        if self.transport is not None and not self.transport.is_closing():
            await asyncio.shield(self.gone)
        return _DISCONNECT

    async def _send(self, message: dict[str, Any]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # as uvicorn does: the app learns of the disconnect from `receive`
        if message["type"] == "http.response.start":
            self._write_head(message["status"], message.get("headers", []))
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                transport.write(chunked(body) if self.chunked else body)
            if not message.get("more_body", False):
                self._end()
                return
        if self.paused:
            if self.drained is None:
                self.drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.drained)

    def _write_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        assert self.transport is not None
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in (*self.server_state.default_headers, *headers):
            lines.append(b"%s: %s\r\n" % (name, value))
        if status not in (204, 304) and not any(n == b"content-length" for n, _ in headers):
            lines.append(b"transfer-encoding: chunked\r\n")
            self.chunked = True
        lines.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(lines))
        self.responded = True
        if self.access is not None and self.scope is not None:  # as uvicorn's, which
            # names the client after the proxy-headers middleware has rewritten it
            scope: Any = self.scope  # (uvicorn types it as its own TypedDict)
            self.access.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), "GET",
                             get_path_with_query_string(scope), "1.1", status)
        self.scope = None

    # --- detached: the hub writes ------------------------------------------------------

    def detach(self, hub: EventHub, sub: Subscription, sent: tuple[int, int],
               send_timeout: float) -> bool:
        """Takes over ``sub`` (the stream has sent everything up to ``sent``): from now on
        each event is written as the hub hands it over. False if the client is gone, and
        the stream ends as usual."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.hub, self.sub, self.sent = hub, sub, sent
        self.send_timeout = send_timeout
        self.task_stream = sub.task_id is not None
        self.gone = None
        self.backlog = 0
        sub.sink = self
        if self.paused:
            self._arm_stall_timer()
        for event in sub.take():
            self.deliver(event)
        if sub.cut_off:
            self.cut()
        elif self.stopping:  # uvicorn's shutdown came during the replay
            sub.cut()
        return True

    def deliver(self, event: Event) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or event.key <= self.sent:
            return
        self.sent = event.key
        if self.paused:
            self.backlog += 1
            if self.hub is not None and self.backlog > self.hub.queue_limit:
                self._fell_behind()
                return
        transport.write(event.chunk if self.chunked else event.frame)
        if self.task_stream and event.terminal:
            self._end()

    def cut(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_CUT_CHUNK if self.chunked else CUT)
        self._end()

    def ping(self) -> None:
        if self.transport is not None and not self.paused and not self.transport.is_closing():
            self.transport.write(_PING_CHUNK if self.chunked else PING)

    def _end(self) -> None:
        """The response's end: its last chunk, then the close."""
        if self.chunked and self.transport is not None and not self.transport.is_closing():
            self.transport.write(_LAST_CHUNK)
        self.chunked = False
        self._close()

    def _stalled(self) -> None:
        if self.hub is not None:  # (a client cut off in `deliver` is counted by the hub)
            self.hub.dropped += 1
        self._fell_behind()

    def _fell_behind(self) -> None:
        if self.sub is not None:
            self.sub.cut_off = True
        if self.transport is not None:
            self.transport.abort()


def _stream_target(line: bytes) -> tuple[bytes, bytes] | None:
    """(raw path, query) when the request line asks for an event stream over HTTP/1.1."""
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return None
    raw_path, _, query = parts[1].partition(b"?")
    try:
        path = unquote(raw_path.decode("ascii"), errors="strict")
    except UnicodeError:
        return None
    route = fastpath.route_of({"method": "GET", "path": path})
    if route is None or route is receive_callback:
        return None
    return raw_path, query


class _Head:
    """httptools' callbacks for one request head."""

    __slots__ = ("complete", "headers")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        self.complete = True


def _parse_head(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The headers of a GET with no body and no upgrade, or None for uvicorn to handle."""
    parsed = _Head()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(head)
    except httptools.HttpParserError:
        return None
    if not parsed.complete or parser.should_upgrade():
        return None
    for name, _ in parsed.headers:
        if name in (b"content-length", b"transfer-encoding", b"upgrade", b"expect"):
            return None
    return parsed.headers
