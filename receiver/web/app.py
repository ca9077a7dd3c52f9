"""The Starlette application: routes, lifespan, and the one place errors become responses."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from receiver import ingest, live, tasks
from receiver.core.errors import ReceiverError, StoreUnavailable
from receiver.core.lifespan import SERVICES, SETTINGS, STOPPING
from receiver.core.logs import install_redaction
from receiver.core.settings import Settings
from receiver.services.container import Services, services
from receiver.services.http import JSONResponse
from receiver.web import admin, dashboard, health
from receiver.web.fastpath import ExceptionHandler, FastPath
from receiver.web.openapi import openapi_json
from receiver.worker.runner import Worker

log = logging.getLogger("receiver")
SHUTDOWN_TIMEOUT = 10.0


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app: ``settings``, or the environment's when none are given."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        install_redaction()
        if settings.open_mode:
            log.warning(
                "no RECEIVER_API_KEYS: tenant routes serve loopback clients only, as tenant "
                "'default'"
            )
        if not settings.secret_keys:
            log.warning(
                "no RECEIVER_SECRET_KEYS: callback tokens are signed with a key that dies "
                "with this process"
            )
        app.state.services = svc = Services.build(settings)
        await svc.start()
        worker = Worker(svc) if settings.embedded_worker else None
        if worker is not None:
            worker.start()
        # What exists now lives as long as the process: keep it out of every GC pass (about a
        # tenth of a callback's CPU, measured).
        gc.freeze()
        try:
            # to requests and to our protocols too (receiver.core.lifespan says why)
            yield {SETTINGS: settings, STOPPING: svc.hub.stop_streams, SERVICES: svc}
        finally:
            # uvicorn does not time a lifespan's shutdown: bound ours, so SIGTERM always ends
            # the process (what is not closed by then goes with it).
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                    if worker is not None:
                        await worker.stop()
                    await svc.close()
            except TimeoutError:
                log.error("shutdown took over %s s; exiting without it", SHUTDOWN_TIMEOUT)

    app = Starlette(
        routes=[
            *ingest.ROUTES,
            *tasks.ROUTES,
            *live.ROUTES,
            *health.ROUTES,
            *admin.ROUTES,
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/", dashboard.index, methods=["GET"]),
            Mount("/dashboard", app=dashboard.assets, name="dashboard"),
        ],
        middleware=[
            # Browsers on other origins only where configured (the dashboard is same-origin).
            *([Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                          allow_methods=["GET", "POST"], max_age=600,
                          allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])]
              if settings.cors_origins else []),
            Middleware(FastPath, handlers=_DOMAIN_HANDLERS),
        ],
        exception_handlers={
            **_DOMAIN_HANDLERS,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    # "/callbacks/mjproxy/" is not a route: a 404, not a redirect that repeats the URL (and
    # its token) in a Location header.
    app.router.redirect_slashes = False
    return app


def error_response(exc: ReceiverError) -> Response:
    """A domain error as the JSON answer every route gives: ``{error, detail}``."""
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=exc.headers())


def error_body(exc: ReceiverError) -> bytes:
    """``{error, detail}``: the body of every error answer (`receiver.server.direct`'s too)."""
    return orjson.dumps({"error": exc.code, "detail": exc.detail})


def redis_failure(svc: Services, method: str, path: str, exc: Exception) -> StoreUnavailable:
    """A Redis error while serving a request: logged, counted, and the error to answer."""
    log.warning("redis error on %s %s: %r", method, path, exc)
    svc.metrics.redis_errors.labels("api").inc()
    return StoreUnavailable("Redis could not store or read this; retry")


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ReceiverError)
    return error_response(exc)


async def _redis_error(request: Request, exc: Exception) -> Response:
    return error_response(redis_failure(services(request), request.method, request.url.path,
                                        exc))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": _HTTP_CODES.get(exc.status_code, "http_error"), "detail": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )


_DOMAIN_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    ReceiverError: _domain_error,
    RedisError: _redis_error,
}


async def _client_gone(conn: HTTPConnection, exc: Exception) -> None:
    """A client that hangs up mid-body (or is cut off by BODY_TIMEOUT) is nobody's error:
    one line, and no response, as there is nobody to read it."""
    log.info("client went away before its request body was read: %s %s",
             conn.scope.get("method"), conn.scope["path"])


INTERNAL_ERROR = b'{"error":"internal_error","detail":"an unexpected error; it has been logged"}'


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(INTERNAL_ERROR, status_code=500)
