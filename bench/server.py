"""``python -m bench.server APP --port P [--http PROTOCOL]``: one uvicorn worker with the
benches' flags (``ingest.UVICORN_FLAGS``), and an HTTP protocol given as ``module:Class``,
which uvicorn's command line does not take: ``receiver serve`` runs the receiver with
``receiver.server.streams:StreamProtocol``."""

from __future__ import annotations

import argparse

import uvicorn
from uvicorn.importer import import_from_string

from bench.ingest import HOST


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.server")
    parser.add_argument("app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", default="httptools")
    args = parser.parse_args(argv)
    run(args.app, args.port, args.http)


def run(app: str, port: int, http: str = "httptools") -> None:
    uvicorn.run(app, factory=True, host=HOST, port=port, loop="uvloop",
                http=import_from_string(http) if ":" in http else http,
                access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
