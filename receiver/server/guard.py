"""uvicorn's HTTP/1.1 protocol with bounds on how a request arrives, on every connection.

uvicorn bounds none of it: any byte cancels its keep-alive timer, so a head sent a byte at a
time holds a connection for ever (slowloris); httptools keeps a header that never ends, all of
it, and serves a megabyte header line; and a body that never starts is waited for by the app.
`GuardedProtocol` counts each request head's bytes from its first to the end of its headers
(past ``MAX_HEAD_BYTES``: 431, and nothing more is parsed), gives the head ``HEAD_TIMEOUT``
from its first byte (the first request's from the connection's start) and the body
``BODY_TIMEOUT`` from the end of the head (408 either way), and closes the connection.

Timers cost only where they are needed: the one armed at connect ends with the first head,
and a later request that comes whole in one read, the usual case, arms none. An idle
keep-alive connection is uvicorn's (``timeout_keep_alive``), as before.
"""

from __future__ import annotations

import asyncio
import inspect
from http import HTTPStatus
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from receiver.core.lifespan import SETTINGS, STOPPING
from receiver.core.settings import Settings
from receiver.server.access import access_log
from receiver.server.direct import of as direct_of

_DEFAULTS = Settings()
# Where the parser is: before a request's first byte, in its head, in its body.
_IDLE, _HEAD, _BODY = 0, 1, 2


# What `GuardedProtocol` and `streams.StreamProtocol` use of uvicorn beyond its public API:
# a uvicorn release that changes any of it gets `receiver serve` on uvicorn's plain protocol
# (with a warning), not a broken one.
_METHODS = ("connection_made", "connection_lost", "data_received", "on_message_begin",
            "on_headers_complete", "on_message_complete", "handle_websocket_upgrade",
            "_start_asgi_task", "on_response_complete", "send_400_response")
_INIT = ("config", "server_state", "app_state", "_loop")
_SET_IN_INIT = {
    HttpToolsProtocol: ("loop", "transport", "flow", "pipeline", "cycle", "server_state",
                        "access_logger", "access_log", "app", "app_state", "tasks"),
    RequestResponseCycle: ("response_started", "response_complete", "disconnected",
                           "message_event", "keep_alive", "access_logger", "body", "more_body",
                           "waiting_for_100_continue", "flow", "on_response", "scope"),
    FlowControl: ("read_paused",),
}
_SERVER_STATE = ("connections", "tasks", "total_requests", "default_headers")


def uvicorn_contract() -> list[str]:
    """What of uvicorn's internals this module and `streams` use and the installed
    uvicorn lacks: empty when all is there (tests/server/test_streams.py holds it to that)."""
    missing = [f"HttpToolsProtocol.{name}" for name in _METHODS
               if not callable(getattr(HttpToolsProtocol, name, None))]
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    missing += [f"HttpToolsProtocol({name}=)" for name in _INIT if name not in params]
    for cls, names in _SET_IN_INIT.items():
        try:
            source = inspect.getsource(vars(cls)["__init__"])
        except (OSError, TypeError):
            continue  # no source installed: the protocol tests are the judge
        missing += [f"{cls.__name__}.{name}" for name in names if f"self.{name} " not in source
                    and f"self.{name}:" not in source]
    state = ServerState()
    missing += [f"ServerState.{name}" for name in _SERVER_STATE if not hasattr(state, name)]
    return missing


def settings_of(app_state: dict[str, Any]) -> Settings:
    """The settings the app's lifespan handed to uvicorn; the defaults under an app (or a
    server) that hands none, never the environment read again."""
    found = app_state.get(SETTINGS)
    return found if isinstance(found, Settings) else _DEFAULTS


def stop_streams(app_state: dict[str, Any]) -> None:
    """uvicorn is stopping: the app ends its event streams (`receiver.core.lifespan`)."""
    stopping = app_state.get(STOPPING)
    if callable(stopping):
        stopping()


def refusal(status: int, code: str, detail: str,
            default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole response, in the app's error format, after which the connection closes."""
    body = orjson.dumps({"error": code, "detail": detail})
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in default_headers]
    lines.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                 b"connection: close\r\n\r\n" % len(body))
    return b"".join(lines) + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's protocol, with a deadline and a size cap on each head and a deadline on each
    body. `streams.StreamProtocol` hands connections over with ``head_timer``: its deadline
    from the connection's start, so a hand-over does not reset the clock."""

    # None: the app's settings. A subclass may fix one (tests).
    head_timeout: float | None = None
    max_head_bytes: int | None = None
    body_timeout: float | None = None

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None,
                 head_timer: asyncio.TimerHandle | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = settings_of(app_state)
        if self.access_log:  # our batched access log in place of uvicorn's logger
            fast = access_log(settings.log_format == "json")
            if fast is not None:
                self.access_logger = fast  # type: ignore[assignment]
        self.head_time = chosen(self.head_timeout, settings.head_timeout)
        self.head_cap = int(chosen(self.max_head_bytes, settings.max_head_bytes))
        self.body_time = chosen(self.body_timeout, settings.body_timeout)
        self.phase = _IDLE
        self.head_bytes = 0  # of the head being read (one read may also hold what follows)
        self.guard = head_timer  # the head's or the body's deadline
        self.refused = False  # answered for good: nothing more is parsed
        self.direct = direct_of(app_state, self.app)  # how callbacks are served (None: ASGI)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard is None and self.head_time > 0:
            self.guard = self.loop.call_later(self.head_time, self.expire)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: the streams end too (an event stream that began on a
        kept-alive connection is served here, looping in the app)."""
        stop_streams(self.app_state)
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.phase != _BODY and self.head_cap > 0:  # these bytes begin or go on with a head
            self.head_bytes += len(data)
            if self.head_bytes > self.head_cap:
                self._feed_capped(data)
                return
        super().data_received(data)
        if self.phase != _IDLE and self.guard is None:
            self._arm()

    def _feed_capped(self, data: bytes) -> None:
        """A read that takes the head past its cap: what fits is parsed, and unless the head
        ended within it, the request is refused. A head that begins inside a read is counted
        from the next read: at most one read (250 KB under uvloop) more is ever held."""
        fit = len(data) - (self.head_bytes - self.head_cap)
        if fit > 0:
            super().data_received(data[:fit])
        if self.refused or self.transport.is_closing():
            return  # a parse error (400), or an upgrade
        if self.head_bytes > self.head_cap:  # not reset by on_headers_complete
            self._refuse(431, "head_too_large",
                         f"the request head is over the limit of {self.head_cap} bytes")
        else:
            self.data_received(data[fit:])

    # --- httptools' callbacks: where a request is --------------------------------------

    def on_message_begin(self) -> None:
        self.phase = _HEAD
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.phase = _BODY
        self.head_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.phase = _IDLE
        self._disarm()
        super().on_message_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """A callback is served by `direct` (its body in hand), anything else by the app."""
        direct = self.direct
        if app is self.app and direct is not None and direct.takes(cycle):
            task = self.loop.create_task(direct.serve(self, cycle))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
        else:
            super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request (uvicorn's answer is plain text): the
        app's error format, as every other refusal here."""
        self._refuse(400, "invalid_http", msg)

    def handle_websocket_upgrade(self) -> None:
        self.refused = True  # the connection is the WebSocket protocol's now
        self._disarm()
        super().handle_websocket_upgrade()

    # --- the deadlines -----------------------------------------------------------------

    def _arm(self) -> None:
        """A head or a body that did not come in one read: its time runs from now."""
        timeout = self.body_time if self.phase == _BODY else self.head_time
        if timeout > 0 and not self.refused and not self.transport.is_closing():
            self.guard = self.loop.call_later(timeout, self.expire)

    def _disarm(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None

    def expire(self) -> None:
        """The head's or the body's time is up."""
        self.guard = None
        if self.refused or self.transport.is_closing():
            return
        if self.flow.read_paused or self.pipeline:
            self._arm()  # we are not reading (a response is under way): not the client's fault
        elif self.phase != _BODY:
            self._refuse(408, "head_timeout",
                         f"the request head did not arrive within {self.head_time:g} s")
        elif not self.cycle.response_started:
            self.cycle.disconnected = True  # what the app's next `receive` reads
            self.cycle.message_event.set()
            self._refuse(408, "body_timeout",
                         f"the body did not arrive within {self.body_time:g} s")
        elif self.cycle.response_complete:
            self.refused = True  # the app answered without the body: nothing else is due
            self.transport.close()
        else:
            self.cycle.keep_alive = False  # the app answers as the body comes: its last

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answers and closes; if a response is still under way, it is the connection's
        last and the client's next request is not read."""
        self.refused = True
        self._disarm()
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.disconnected:
            self.transport.write(refusal(status, code, detail,
                                         self.server_state.default_headers))
            self.transport.close()
        else:
            cycle.keep_alive = False


def chosen(fixed: float | None, setting: float) -> float:
    """A limit: fixed by the protocol class (tests), else the setting."""
    return setting if fixed is None else fixed
