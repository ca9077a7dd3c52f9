"""A child ``redis-server`` for ``receiver serve`` (when REDIS_URL is unset) and the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from receiver.server.children import die_with_parent


class RedisServerError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port free on loopback now (for a child to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on loopback, its data in ``data_dir``.

    ``tied``: it gets SIGTERM when the thread that starts it ends, however (Linux), and
    holds ``pass_fds`` open until it ends (`receiver serve`'s lock on its data folder)."""

    def __init__(
        self, data_dir: Path, port: int | None = None, persist: bool = True,
        extra_args: Sequence[str] = (), tied: bool = False, pass_fds: Sequence[int] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.extra_args = list(extra_args)
        self.tied = tied
        self.pass_fds = tuple(pass_fds)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not installed: `make run` installs it (apt-get install "
                "redis-server), or set REDIS_URL to a Redis you run"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir.resolve()), "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--logfile", "redis.log", "--daemonize", "no", *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: a terminal's Ctrl-C reaches the service, which stops
            # this last, not Redis first with the service still shutting down on it.
            process_group=0,
            preexec_fn=die_with_parent() if self.tied else None,
            pass_fds=self.pass_fds,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited at start; see {self.data_dir / 'redis.log'}"
                )
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError("redis-server did not answer in time") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
