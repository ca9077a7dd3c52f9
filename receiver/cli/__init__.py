"""The ``receiver`` command: serve, worker, simulate, submit, watch."""

from receiver.cli.main import main

__all__ = ["main"]
