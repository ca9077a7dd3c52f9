"""``receiver``: the command line. ``receiver serve`` runs the web service; ``receiver
worker`` the dispatcher and reconciler; ``receiver submit`` sends a task through a running
service; ``receiver watch`` follows tasks; ``receiver simulate`` plays the providers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson

from receiver.cli.redis_server import RedisServer, RedisServerError
from receiver.core.logs import log_config
from receiver.core.settings import (
    PROVIDERS,
    Settings,
    SettingsError,
    env_config,
    is_loopback,
)
from receiver.server.children import (
    StartError,
    die_with_parent,
    hold,
    remembered_port,
    sigterm_unwinds,
    stop,
)

DATA_DIR = Path(os.environ.get("RECEIVER_DATA_DIR", ".receiver"))
log = logging.getLogger("receiver")


def main(argv: list[str] | None = None) -> int:
    """The ``receiver`` command; its exit status (2: a setting or a child that cannot start)."""
    parser = argparse.ArgumentParser(prog="receiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the web service")
    serve_cmd.add_argument("--host", help="address to bind (HOST)")
    serve_cmd.add_argument("--port", type=int, help="port to bind (PORT)")
    serve_cmd.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve_cmd.add_argument("--no-access-log", action="store_true", help="no request lines")
    serve_cmd.add_argument("--simulator", action="store_true",
                           help="play every provider without a <PROVIDER>_BASE_URL with the "
                           "built-in simulator (what `make run` does)")
    serve_cmd.add_argument("--simulator-step-interval", type=float,
                           default=os.environ.get("SIMULATOR_STEP_INTERVAL", "0.3"),
                           help="the simulator's seconds between a task's states "
                           "(SIMULATOR_STEP_INTERVAL; default 0.3)")
    serve_cmd.add_argument("--no-worker", action="store_true",
                           help="no dispatcher and reconciler in this process (run "
                           "`receiver worker` instead)")
    commands.add_parser("worker", help="run the dispatcher and the reconciler")
    watch_cmd = commands.add_parser("watch", help="live progress bars of tasks")
    watch_cmd.add_argument("task_id", nargs="?", help="one task (else every task)")
    submit_cmd = commands.add_parser("submit", help="send a task through a running service")
    submit_cmd.add_argument("prompt", nargs="?", help="the prompt (IMAGINE)")
    submit_cmd.add_argument("--provider", help="mjproxy, ohmygpt or aigc2d (else the "
                            "service's default)")
    submit_cmd.add_argument("--action", help="IMAGINE (default), UPSCALE, VARIATION, REROLL, "
                            "ZOOM, PAN, DESCRIBE, BLEND")
    submit_cmd.add_argument("--mode", help="FAST, RELAX, TURBO (mjproxy); FAST, NORMAL "
                            "(ohmygpt)")
    submit_cmd.add_argument("--parent", help="the task an action acts on")
    submit_cmd.add_argument("--button", help="the parent's button: a label (U1, V2) or a "
                            "custom id")
    submit_cmd.add_argument("--index", type=int, help="1-4, with --action")
    submit_cmd.add_argument("--image", action="append", default=[],
                            help="an image URL or data URL (DESCRIBE: one; BLEND: 2 to 5, "
                            "OhMyGPT 2 to 4; IMAGINE: references)")
    submit_cmd.add_argument("--mask", help="Vary (Region)'s mask: a PNG as a URL or data URL")
    submit_cmd.add_argument("--dimensions", help="PORTRAIT, SQUARE or LANDSCAPE (BLEND)")
    submit_cmd.add_argument("--watch", action="store_true", help="show its progress until "
                            "it ends")
    cancel_cmd = commands.add_parser("cancel", help="cancel a task not yet finished")
    cancel_cmd.add_argument("task_id", help="the task")
    for client_cmd in (watch_cmd, submit_cmd, cancel_cmd):
        client_cmd.add_argument("--url", default=os.environ.get("RECEIVER_URL"),
                                help="the service (RECEIVER_URL; default "
                                "http://127.0.0.1:PORT)")
        client_cmd.add_argument("--api-key", default=os.environ.get("RECEIVER_API_KEY"),
                                help="your API key (RECEIVER_API_KEY)")
    sim_cmd = commands.add_parser("simulate", help="play the providers (mjproxy, ohmygpt, "
                                  "aigc2d) for local runs and tests")
    sim_cmd.add_argument("--host", default="127.0.0.1", help="address to bind")
    sim_cmd.add_argument("--port", type=int, default=8001, help="port to bind")
    sim_cmd.add_argument("--step-interval", type=float,
                         default=os.environ.get("SIMULATOR_STEP_INTERVAL", "0.3"),
                         help="seconds between a task's states (SIMULATOR_STEP_INTERVAL; "
                         "default 0.3)")
    sim_cmd.add_argument("--queue-limit", type=int,
                         help="ohmygpt, aigc2d: unfinished tasks per key before the queue is "
                         "full; mjproxy: tasks a key runs at once (the rest wait)")
    sim_cmd.add_argument("--mjproxy-queue-size", type=int, default=10,
                         help="mjproxy: tasks a key may have waiting before its queue is full")
    sim_cmd.add_argument("--mjproxy-flavor", choices=("trueai", "novicezk"),
                         default=os.environ.get("MJPROXY_FLAVOR", "").strip().lower() or "trueai",
                         help="which midjourney-proxy generation /mj/* plays (MJPROXY_FLAVOR; "
                         "default trueai)")
    sim_cmd.add_argument("--seed", type=int, help="fixed ids, hashes and fault draws")
    args = parser.parse_args(argv)
    verbose = args.command in ("serve", "worker")  # the others draw on the terminal
    json_lines = os.environ.get("LOG_FORMAT", "text").lower() == "json"
    logging.config.dictConfig(log_config(json_lines, "INFO" if verbose else "WARNING"))
    try:
        return _run(args)
    except (SettingsError, RedisServerError, StartError) as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for it, and no traceback
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "simulate":
        return simulate(args)
    if args.command in ("watch", "submit", "cancel"):
        from receiver.cli.watch import watch

        url = args.url or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
        if args.command == "submit":
            return submit(url, args)
        if args.command == "cancel":
            return cancel(url, args)
        return watch(url, args.api_key, args.task_id)
    if args.command == "worker":
        return worker()
    with sigterm_unwinds():  # a supervisor's SIGTERM stops the children too
        return serve(args)


def serve(args: argparse.Namespace) -> int:
    """``receiver serve``: the embedded Redis and simulator where asked, then the web processes."""
    from receiver.server.run import serve as serve_web

    settings = Settings.from_env()
    host = args.host or settings.host
    port = args.port or settings.port
    if settings.open_mode and not is_loopback(host):
        log.warning("no RECEIVER_API_KEYS: binding 127.0.0.1 instead of %s", host)
        host = "127.0.0.1"
    # What serve decides is read as if set in the environment, which is never written: the
    # worker's callback URLs point here, the simulator plays the providers not configured.
    decided = {"HOST": host, "PORT": str(port)}
    # One service per data folder (two redis-servers on one append-only file corrupt it).
    # The children inherit the lock: it is free once they are all gone, however they ended.
    keep: tuple[int, ...] = ()
    if not settings.redis_url or args.simulator:
        keep = (hold(DATA_DIR / "serve.lock",
                     DATA_DIR / "redis" if not settings.redis_url else DATA_DIR),)
    if not settings.secret_keys:
        # Tokens must outlive a restart, or every task in flight loses its callbacks.
        decided["RECEIVER_SECRET_KEYS"] = _local_secret()
        log.info("no RECEIVER_SECRET_KEYS: using the key kept in %s", DATA_DIR / "secret_key")
    if not args.no_worker:
        decided["EMBEDDED_WORKER"] = "true"
    if (kept := _image_store()) is not None:
        decided["IMAGE_STORE"] = kept
    simulator = None
    if args.simulator:
        simulator, played = _start_simulator(settings, args.simulator_step_interval, keep)
        decided.update(played)
    embedded = None
    try:
        if not settings.redis_url:
            embedded = RedisServer(DATA_DIR / "redis", tied=True, pass_fds=keep)
            embedded.start()
            decided["REDIS_URL"] = embedded.url
            log.info("no REDIS_URL: started redis-server on %s (data in %s)",
                     embedded.url, embedded.data_dir)
        settings = Settings.from_env(env_config({**os.environ, **decided}))
        print(f"receiver: dashboard on http://{host}:{port}/ (health: /healthz, API: "
              "/openapi.json)", flush=True)
        started = serve_web(settings, workers=args.workers, access_log=not args.no_access_log)
    finally:
        try:
            if embedded is not None:
                embedded.stop()
        finally:
            if simulator is not None:
                stop(simulator)
    return 0 if started else 3  # as uvicorn: a startup that failed (Redis unreachable, ...)


def worker() -> int:
    """``receiver worker``: the dispatcher, the reconciler and the archiver, against the
    service's Redis."""
    from receiver.worker.runner import run_worker

    settings = Settings.from_env()
    if (kept := _image_store()) is not None:
        settings = replace(settings, image_store=kept)
    if not settings.redis_url:
        raise SettingsError("the worker needs the service's Redis: set REDIS_URL")
    asyncio.run(run_worker(settings))
    return 0


def submit(url: str, args: argparse.Namespace) -> int:
    """``receiver submit``: one task through a running service, printed or watched."""
    from receiver.client import Client

    fields = {"provider": args.provider, "action": args.action, "prompt": args.prompt,
              "mode": args.mode, "parent_id": args.parent, "button": args.button,
              "index": args.index, "images": args.image or None,
              "dimensions": args.dimensions, "mask": args.mask}
    with Client(url, args.api_key) as client:
        task = _task_or_status(lambda: client.submit(**fields))
    if isinstance(task, int):
        return task
    if not args.watch:
        print(orjson.dumps(task).decode())
        return 0
    from receiver.cli.watch import watch

    print(f"task {task['id']} ({task['provider']} {task['action']})", flush=True)
    return watch(url, args.api_key, task["id"])


def cancel(url: str, args: argparse.Namespace) -> int:
    """``receiver cancel``: the task after the cancel, printed."""
    from receiver.client import Client

    with Client(url, args.api_key) as client:
        task = _task_or_status(lambda: client.cancel(args.task_id))
    if isinstance(task, int):
        return task
    print(orjson.dumps(task).decode())
    return 0


def _task_or_status(call: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """The call's task, or the exit status with the reason printed: 2 when the service
    cannot be reached, 1 when it refused."""
    from receiver.client import ServiceError, Unreachable

    try:
        return call()
    except Unreachable as exc:
        print(f"receiver: cannot reach {exc.detail}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"receiver: {exc.status} {exc.code}: {exc.detail}", file=sys.stderr)
        return 1


def _start_simulator(settings: Settings, step_interval: float, keep: tuple[int, ...]
                     ) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Play the providers not configured with the simulator, in a child process, on the
    port it had last time (tasks in flight at a restart are polled there, and found lost);
    and the settings, as variables, that point those providers at it."""
    port = remembered_port(DATA_DIR / "simulator_port")
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "simulate", "--port", str(port),
         "--step-interval", str(step_interval)],
        process_group=0, preexec_fn=die_with_parent(), pass_fds=keep)  # as RedisServer's
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                httpx.get(f"{url}/_sim/stats", timeout=1.0)
                break
            except httpx.TransportError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise StartError("the provider simulator did not start") from None
                time.sleep(0.1)
    except BaseException:  # also Ctrl-C while waiting: no child is left behind
        stop(child)
        raise
    played = [p for p in PROVIDERS if p not in settings.pools()]
    variables = {"DEFAULT_PROVIDER": os.environ.get("DEFAULT_PROVIDER", "mjproxy")}
    for provider in played:
        variables[f"{provider.upper()}_BASE_URL"] = url
        variables[f"{provider.upper()}_API_KEY"] = f"sim-{provider}"
    # its /images/* are loopback, which image fetching refuses unless allowed by host:port
    allowed = [h for h in os.environ.get("FETCH_ALLOW_HOSTS", "").split(",") if h.strip()]
    variables["FETCH_ALLOW_HOSTS"] = ",".join([*allowed, f"127.0.0.1:{port}"])
    log.info("the simulator plays %s on %s", ", ".join(played) or "no provider", url)
    return child, variables


def simulate(args: argparse.Namespace) -> int:
    """``receiver simulate``: the providers' simulator, in the foreground."""
    import uvicorn

    from receiver.simulator import SimulatorConfig, create_simulator

    if not is_loopback(args.host):
        # It accepts any key and POSTs wherever a submission says.
        log.warning("the simulator is open to %s: any key is accepted", args.host)
    try:
        config = SimulatorConfig(step_interval=args.step_interval, queue_limit=args.queue_limit,
                                 mjproxy_queue_size=args.mjproxy_queue_size,
                                 mjproxy_flavor=args.mjproxy_flavor, seed=args.seed)
    except ValueError as exc:  # e.g. MJPROXY_FLAVOR naming no flavor
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    print(f"receiver: provider simulator on http://{args.host}:{args.port}/ "
          f"(mjproxy: {args.mjproxy_flavor}; faults: /_sim/faults, counters: /_sim/stats)",
          flush=True)
    uvicorn.run(create_simulator(config), host=args.host, port=args.port,
                timeout_graceful_shutdown=5)
    return 0


def _image_store() -> str | None:
    """IMAGE_STORE for `serve` and `worker` when it is not set: with the rest of the data
    (RECEIVER_DATA_DIR), so the worker keeps images where the web process looks."""
    if env_config()("IMAGE_STORE", default=None) is not None:
        return None
    return f"file://{(DATA_DIR / 'images').resolve()}"


def _local_secret() -> str:
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()

