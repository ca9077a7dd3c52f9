"""Real parts only: a redis-server started for the session, uvicorn servers on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from starlette.datastructures import Secret

from receiver.app import create_app
from receiver.constants import Keys
from receiver.redis_server import RedisServer, free_port
from receiver.settings import Settings

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
if not SAMPLES.is_dir():  # the samples travel with the repository too
    SAMPLES = Path(__file__).resolve().parent / "samples"

KEYS = Keys()

# Shared, noisy machines: no per-example deadlines (speed is measured in bench/, not here).
hypothesis_settings.register_profile(
    "receiver", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("receiver")
TIMEOUT = httpx.Timeout(10.0)


class LiveServer:
    """A real uvicorn serving the receiver (or ``app``) on a loopback port, in a thread of
    the test process."""

    def __init__(self, settings: Settings | None = None, port: int | None = None,
                 app: Any = None) -> None:
        self.settings = settings or Settings()
        self.port = port or free_port()
        config = uvicorn.Config(
            app or create_app(self.settings), host="127.0.0.1", port=self.port,
            log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, api_key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's Redis, emptied before each test."""
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    yield client
    client.close()


def base_settings(redis_url: str, **overrides: Any) -> Settings:
    settings = Settings(
        redis_url=redis_url,
        secret_keys=(Secret("test-key-1"),),
        api_keys={"key-acme": "acme", "key-beta": "beta"},
    )
    return replace(settings, **overrides)


@pytest.fixture
def make_server(redis_server: RedisServer) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with the test settings, overridden by keyword; stopped at teardown."""
    started: list[LiveServer] = []

    def make(**overrides: Any) -> LiveServer:
        overrides.setdefault("redis_url", redis_server.url)
        server = LiveServer(base_settings(**overrides)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., LiveServer], r: redis.Redis) -> LiveServer:
    return make_server()


@pytest.fixture
def acme(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client("key-acme") as client:
        yield client


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def mint(client: httpx.Client, provider: str = "mjproxy", **fields: Any) -> tuple[str, str]:
    """POST /callback-urls -> (job id, callback URL)."""
    response = client.post("/callback-urls", json={"provider": provider, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    return body["job_id"], body["callback_url"]


def history(r: redis.Redis, tenant: str, job_id: str) -> list[dict[bytes, bytes]]:
    """The stored transitions of one task, oldest first."""
    return [fields for _, fields in r.xrange(KEYS.history(tenant, job_id))]
