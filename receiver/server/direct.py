"""``POST /callbacks/{provider}`` answered by the HTTP protocol itself, past ASGI.

A callback is the one request a provider sends thousands of times a minute, and under ASGI
most of its CPU was not its own: uvicorn's request cycle (the ``receive`` and ``send``
messages, the header checks of each response), Starlette's error middleware and our fast
path were about a quarter of the process per callback (py-spy; bench/ingest has the
figures). `GuardedProtocol` hands every callback to `serve`: the same checks in the same
order (`ingest.callbacks.ingest`, which the ASGI endpoint runs too), the same answers (the
app's error bodies, its Redis and internal errors), the same access-log line, and a response
written in one piece. A body that is whole when the request is served, nearly every one, is
taken as it is; one still coming is read as the app reads it. A CORS request under
``CORS_ORIGINS``, or an app wrapped for tracing, goes to the app as before.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from receiver.core.errors import ReceiverError
from receiver.core.lifespan import SERVICES
from receiver.core.logs import bind_request
from receiver.ingest.callbacks import PREFIX, ingest, receive_callback
from receiver.services.container import Services
from receiver.web.app import INTERNAL_ERROR, error_body, redis_failure
from receiver.web.fastpath import route_of

log = logging.getLogger("uvicorn.error")
_JSON = b"content-type: application/json\r\n"
Headers = list[tuple[bytes, bytes]]


class Direct:
    """What a connection needs to serve callbacks itself: the app's services, and the proxy
    headers' rewrite of the client (for the access log) when uvicorn applies one. None
    (`of`) when the app is not ours as we know it."""

    __slots__ = ("cors", "proxy", "svc")

    def __init__(self, svc: Services, proxy: ProxyHeadersMiddleware | None) -> None:
        self.svc = svc
        self.proxy = proxy
        self.cors = bool(svc.settings.cors_origins)

    def takes(self, cycle: RequestResponseCycle) -> bool:
        """A callback that only its endpoint would see (no CORS request to answer)."""
        scope: Any = cycle.scope
        if route_of(scope) is not receive_callback:
            return False
        return not (self.cors and any(name == b"origin" for name, _ in scope["headers"]))

    async def serve(self, protocol: Any, cycle: RequestResponseCycle) -> None:
        """The callback, answered. A body still on its way is read as the app reads it,
        through the cycle's ``receive`` (``100 Continue``, BODY_TIMEOUT, a hang-up)."""
        scope: Any = cycle.scope
        bind_request(scope)
        if self.proxy is not None and protocol.access_log:
            await self.proxy(scope, _nothing, _nothing)  # it rewrites the scope's client
        svc = self.svc
        headers: Headers = []
        whole = not (cycle.more_body or cycle.disconnected)
        receive: Any = cycle.receive
        try:
            answered = await ingest(svc, scope["path"][len(PREFIX):], scope["query_string"],
                                    scope["headers"], bytes(cycle.body) if whole else None,
                                    receive)
            if answered is None:
                return  # the sender hung up: nobody to answer
            status, answer = answered
        except (ReceiverError, RedisError) as exc:
            error = exc if isinstance(exc, ReceiverError) else redis_failure(
                svc, "POST", scope["path"], exc)
            status, answer = error.status_code, error_body(error)
            headers = _header_list(error.headers())
        except Exception:  # as uvicorn and Starlette: logged, and a 500
            log.exception("Exception in ASGI application")
            status, answer = 500, INTERNAL_ERROR
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        respond(protocol, cycle, status, headers, answer)


def respond(protocol: Any, cycle: RequestResponseCycle, status: int, headers: Headers,
            body: bytes) -> None:
    """A whole JSON response in one write, as uvicorn's cycle would send it: its default
    headers, its access-log line, its keep-alive (or close), then the next request."""
    if cycle.disconnected:
        return  # nobody to answer (what was stored stays stored)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    scope: Any = cycle.scope
    if protocol.access_log:
        protocol.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), "POST",
                                    get_path_with_query_string(scope), scope["http_version"],
                                    status)
    parts = [STATUS_LINE[status]]
    for name, value in (*protocol.server_state.default_headers, *headers):
        parts += (name, b": ", value, b"\r\n")
    parts += (_JSON, b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", body)
    transport = protocol.transport
    transport.write(b"".join(parts))
    cycle.response_complete = True
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()


def of(app_state: dict[str, Any], app: Any) -> Direct | None:
    """The connection's `Direct`, when ``app`` is the app whose services ``app_state`` holds
    (behind uvicorn's proxy-headers middleware or not), else None: requests go to ``app``."""
    found = app_state.get(SERVICES)
    if not isinstance(found, Services):
        return None
    svc: Services = found
    proxy = None
    if isinstance(app, ProxyHeadersMiddleware):  # the same trust, without the app behind it
        proxy = ProxyHeadersMiddleware(_nothing, [])
        proxy.trusted_hosts = app.trusted_hosts
        app = app.app
    if getattr(app, "state", None) is None or getattr(app.state, "services", None) is not svc:
        return None  # (uvicorn's message logger at trace level, say): the app serves all
    return Direct(svc, proxy)


async def _none(*_: Any) -> None:
    """The app behind the proxy-headers middleware when only its rewrite is wanted."""


_nothing: Any = _none


def _header_list(headers: dict[str, str] | None) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
