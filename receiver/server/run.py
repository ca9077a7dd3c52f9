"""``receiver serve``'s web processes: the app under uvicorn with our protocol.

The settings are handed to the app as an object, never through the environment: one process
builds the app from them; with ``--workers N`` each worker process gets them pickled, as
uvicorn's supervisor hands it its config, and is tied to the service (``PR_SET_PDEATHSIG``)
so that a SIGKILL of the service does not leave workers serving.
"""

from __future__ import annotations

import inspect
import logging
import os
from functools import partial
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from receiver.core.logs import log_config
from receiver.core.settings import Settings
from receiver.server.children import tie_to
from receiver.server.guard import uvicorn_contract
from receiver.server.streams import StreamProtocol
from receiver.web.app import create_app

log = logging.getLogger("receiver")
GRACEFUL_SHUTDOWN = 10  # seconds uvicorn waits for responses once it stops


def serve(settings: Settings, *, workers: int = 1, access_log: bool = True) -> bool:
    """Serves until uvicorn stops; False when it did not start (a port taken, say)."""
    app = (partial(_worker_app, settings, os.getpid()) if workers > 1
           else partial(create_app, settings))
    config = uvicorn.Config(
        app, factory=True,
        host=settings.host, port=settings.port, workers=workers, access_log=access_log,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        http=protocol(StreamProtocol, uvicorn_contract()),
        # X-Forwarded-For and -Proto only from the proxies named (none: ignored)
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        log_config=log_config(settings.log_format == "json"),
    )
    server = uvicorn.Server(config)
    try:
        if workers <= 1:
            server.run()
            return server.started
        # uvicorn.run takes only an import string for workers (each worker would read the
        # settings again); its supervisor takes the config, app object and all.
        sockets = [config.bind_socket()]
        if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn before 0.36
            Multiprocess(config, target=server.run,  # type: ignore[call-arg]
                         sockets=sockets).run()
        else:
            Multiprocess(config, sockets=sockets).run()
        return True
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on (as uvicorn.run)
        return True


def _worker_app(settings: Settings, service: int) -> Starlette:
    """A worker process's app, the process first tied to the service (its parent)."""
    tie_to(service)
    return create_app(settings)


def protocol(ours: type[Any], missing: list[str]) -> type[Any] | str:
    """Our HTTP protocol, unless this uvicorn lacks what it uses: then uvicorn's own."""
    if not missing:
        return ours
    log.warning("this uvicorn lacks what receiver's HTTP protocol uses (%s): serving with "
                "uvicorn's plain protocol (no head limits; a task per idle event stream)",
                ", ".join(missing))
    return "httptools"
