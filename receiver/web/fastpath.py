"""The routes that are hot (callbacks) or long-lived (event streams), past Starlette's
exception and routing layers.

Those layers cost a request that waits (for Redis, or for events) about as much CPU as a
callback's own work, and an event stream holds their frames for its whole life: ~100 more
objects for the garbage collector per idle client (BENCHMARKS.md). `FastPath`, the app's
one middleware, sends these requests straight to their endpoints; what they raise is
answered by the app's own exception handlers, as for every other route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.core.logs import bind_request
from receiver.ingest.callbacks import PREFIX, receive_callback
from receiver.live import sse

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class FastPath:
    def __init__(self, app: ASGIApp, handlers: Mapping[type[Exception], ExceptionHandler]):
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http":
            bind_request(scope)  # for the lines logged while it is served
            route = route_of(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            if route is receive_callback:
                await receive_callback(scope, receive, send)
            else:
                endpoint, params = route
                scope["path_params"] = params
                response = await endpoint(Request(scope, receive))
                await response(scope, receive, send)
        except Exception as exc:
            handler = next((h for cls, h in self.handlers.items() if isinstance(exc, cls)), None)
            if handler is None:
                raise  # to ServerErrorMiddleware, like any other route's
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)


def route_of(scope: Scope) -> Any:
    """``receive_callback``, or (an SSE endpoint, its path parameters), or None."""
    method, path = scope["method"], scope["path"]
    if method == "POST":
        if path.startswith(PREFIX) and "/" not in path[len(PREFIX):]:
            return receive_callback
    elif method == "GET":
        if path == "/events":
            return sse.tenant_events, {}
        parts = path.split("/")  # "", "tasks", id, "events"
        if len(parts) == 4 and parts[1] == "tasks" and parts[3] == "events" and parts[2]:
            return sse.task_events, {"job_id": parts[2]}
    return None
