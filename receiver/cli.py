"""``receiver``: the command line. ``receiver serve`` runs the web service."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from receiver.redis_server import RedisServer, RedisServerError
from receiver.settings import Settings, SettingsError, is_loopback

DATA_DIR = Path(os.environ.get("RECEIVER_DATA_DIR", ".receiver"))
log = logging.getLogger("receiver")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="receiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the web service")
    serve_cmd.add_argument("--host", help="address to bind (HOST)")
    serve_cmd.add_argument("--port", type=int, help="port to bind (PORT)")
    serve_cmd.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve_cmd.add_argument("--no-access-log", action="store_true", help="no request lines")
    watch_cmd = commands.add_parser("watch", help="live progress bars of tasks")
    watch_cmd.add_argument("task_id", nargs="?", help="one task (else every task)")
    watch_cmd.add_argument("--url", default=os.environ.get("RECEIVER_URL"),
                           help="the service (RECEIVER_URL; default http://127.0.0.1:PORT)")
    watch_cmd.add_argument("--api-key", default=os.environ.get("RECEIVER_API_KEY"),
                           help="your API key (RECEIVER_API_KEY)")
    sim_cmd = commands.add_parser("simulate", help="play the providers (mjproxy, ohmygpt, "
                                  "aigc2d) for local runs and tests")
    sim_cmd.add_argument("--host", default="127.0.0.1", help="address to bind")
    sim_cmd.add_argument("--port", type=int, default=8001, help="port to bind")
    sim_cmd.add_argument("--step-interval", type=float, default=0.3,
                         help="seconds between a task's states")
    sim_cmd.add_argument("--queue-limit", type=int,
                         help="unfinished tasks per key before the queue is full")
    args = parser.parse_args(argv)
    verbose = args.command == "serve"  # the others draw on the terminal: warnings only
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "simulate":
        return simulate(args)
    if args.command == "watch":
        from receiver.watch import watch

        url = args.url or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
        return watch(url, args.api_key, args.task_id)
    try:
        return serve(args)
    except (SettingsError, RedisServerError) as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.from_env()
    host = args.host or settings.host
    port = args.port or settings.port
    if settings.open_mode and not is_loopback(host):
        log.warning("no RECEIVER_API_KEYS: binding 127.0.0.1 instead of %s", host)
        host = "127.0.0.1"
    if not settings.secret_keys:
        # Tokens must outlive a restart, or every task in flight loses its callbacks.
        os.environ["RECEIVER_SECRET_KEYS"] = _local_secret()
        log.info("no RECEIVER_SECRET_KEYS: using the key kept in %s", DATA_DIR / "secret_key")
    embedded = None
    if not settings.redis_url:
        embedded = RedisServer(DATA_DIR / "redis").start()
        os.environ["REDIS_URL"] = embedded.url
        log.info("no REDIS_URL: started redis-server on %s (data in %s)",
                 embedded.url, embedded.data_dir)
    print(f"receiver: serving on http://{host}:{port}/ (health: /healthz, API: /openapi.json)",
          flush=True)
    try:
        uvicorn.run(
            "receiver.app:create_app", factory=True, host=host, port=port,
            workers=args.workers, access_log=not args.no_access_log,
            timeout_graceful_shutdown=10,
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from receiver.simulator import SimulatorConfig, create_simulator

    if not is_loopback(args.host):
        # It accepts any key and POSTs wherever a submission says.
        log.warning("the simulator is open to %s: any key is accepted", args.host)
    config = SimulatorConfig(step_interval=args.step_interval, queue_limit=args.queue_limit)
    print(f"receiver: provider simulator on http://{args.host}:{args.port}/ "
          "(faults: /_sim/faults, counters: /_sim/stats)", flush=True)
    uvicorn.run(create_simulator(config), host=args.host, port=args.port,
                timeout_graceful_shutdown=5)
    return 0


def _local_secret() -> str:
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


if __name__ == "__main__":
    raise SystemExit(main())
