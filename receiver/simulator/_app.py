"""The simulator's app: every provider's routes, the images, and the ``/_sim`` controls.

midjourney-proxy's routes are those of the configured flavor (trueai adds mode prefixes,
actions by button, dialogs and cancel; novicezk has change and simple-change, nothing more).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.simulator import _novicezk, _trueai
from receiver.simulator._aigc2d import aigc2d_submit, aigc2d_task
from receiver.simulator._config import SimulatorConfig
from receiver.simulator._engine import Simulator
from receiver.simulator._http import image, json_answer, sim_of
from receiver.simulator._mjproxy import MODES, fetch, list_by_condition, submit
from receiver.simulator._ohmygpt import PREFIX as OHMYGPT
from receiver.simulator._ohmygpt import ohmygpt


async def faults(request: Request) -> Response:
    sim = sim_of(request)
    if request.method == "POST":
        try:
            changes = orjson.loads(await request.body() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object of faults")
            sim.set_faults(sim.faults.updated(changes))
        except (ValueError, TypeError) as exc:
            return json_answer({"error": "bad_fault", "detail": str(exc)}, 400)
    return json_answer(asdict(sim.faults))


async def stats(request: Request) -> Response:
    return json_answer(sim_of(request).stats())


async def tasks(request: Request) -> Response:
    return json_answer({"tasks": sim_of(request).snapshot()})


async def reset(request: Request) -> Response:
    await sim_of(request).reset()
    return json_answer(sim_of(request).stats())


def _mjproxy_routes(flavor: str) -> list[Route]:
    prefixes = list(MODES) if flavor == "trueai" else [""]  # novicezk: /mj only
    routes: list[Route] = []
    for prefix in prefixes:
        routes += [
            Route(f"{prefix}/mj/submit/{{kind}}", submit, methods=["POST"]),
            Route(f"{prefix}/mj/task/{{task_id}}/fetch", fetch, methods=["GET"]),
            Route(f"{prefix}/mj/task/list-by-condition", list_by_condition, methods=["POST"]),
        ]
        if flavor == "trueai":
            routes += [
                Route(f"{prefix}/mj/task/list-by-ids", list_by_condition, methods=["POST"]),
                Route(f"{prefix}/mj/task/{{task_id}}/cancel", _trueai.cancel, methods=["POST"]),
            ]
    return routes


def create_simulator(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator app; `app.state.sim` is its engine (tasks, faults, counters)."""
    sim = Simulator(config or SimulatorConfig())
    flavor = sim.config.mjproxy_flavor

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sim.stop()

    routes = [
        *_mjproxy_routes(flavor),
        Route(f"{OHMYGPT}/{{kind}}", ohmygpt, methods=["POST"]),
        Route("/mj/task/{task_id}", aigc2d_task, methods=["GET"]),
        Route("/mj/{kind}", aigc2d_submit, methods=["POST"]),
        Route("/images/{name}", image, methods=["GET"]),
        Route("/_sim/faults", faults, methods=["GET", "POST"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/tasks", tasks, methods=["GET"]),
        Route("/_sim/reset", reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sim = sim
    app.state.mj_actions = _trueai.ACTIONS if flavor == "trueai" else _novicezk.ACTIONS
    return app
