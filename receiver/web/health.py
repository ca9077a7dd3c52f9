"""Operator routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.core.errors import StoreUnavailable
from receiver.services.auth import authenticate_metrics
from receiver.services.container import services
from receiver.services.http import JSONResponse


async def healthz(request: Request) -> Response:
    """Liveness: the process serves."""
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus metrics; what Redis holds (queue depth, slots) is read now. With
    METRICS_TOKEN set, only for ``Authorization: Bearer <METRICS_TOKEN>``."""
    authenticate_metrics(request)
    svc = services(request)
    for pool in svc.settings.pools():
        svc.metrics.queue_depth.labels(pool).set(await svc.admission.depth(pool))
    for name, account in svc.settings.accounts.items():
        held = await svc.admission.in_use(account.provider, name)
        svc.metrics.slots_in_use.labels(name).set(held)
        svc.metrics.slots_limit.labels(name).set(account.queue_limit)
    return svc.metrics.render()


async def readyz(request: Request) -> Response:
    """Ready when Redis answers: without it nothing can be acknowledged."""
    try:
        await services(request).store.ping()
    except Exception as exc:
        raise StoreUnavailable(f"Redis does not answer: {type(exc).__name__}") from exc
    return JSONResponse({"status": "ready"})


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
