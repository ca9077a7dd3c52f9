"""Real parts only: a redis-server started for the session, uvicorn servers on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
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

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.constants import Keys
from receiver.core.settings import PROVIDERS, ProviderAccount, Settings
from receiver.providers.dialects import DIALECTS
from receiver.server.streams import StreamProtocol
from receiver.simulator import SimulatorConfig, create_simulator
from receiver.store.history import merge, unpack
from receiver.web.app import create_app

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
if not SAMPLES.is_dir():  # the samples travel with the repository too
    SAMPLES = Path(__file__).resolve().parent / "samples"

KEYS = Keys()
# No archive unless a test asks for one (tests/worker/test_archiver.py): it would fetch the
# samples' image URLs (cdn.discordapp.com, ...), and tests reach nothing but loopback. The
# `receiver serve` processes tests start inherit this.
os.environ.setdefault("IMAGE_STORE", "")

# Shared, noisy machines: no per-example deadlines (speed is measured in bench/, not here).
hypothesis_settings.register_profile(
    "receiver", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("receiver")
TIMEOUT = httpx.Timeout(10.0)


class LiveServer:
    """A real uvicorn serving the receiver (or ``app``) on a loopback port, in a thread of
    the test process, with the HTTP protocol ``receiver serve`` uses (or ``http``)."""

    def __init__(self, settings: Settings | None = None, port: int | None = None,
                 app: Any = None, http: Any = StreamProtocol) -> None:
        self.settings = settings or Settings()
        self.port = port or free_port()
        config = uvicorn.Config(
            app or create_app(self.settings), host="127.0.0.1", port=self.port,
            log_level="warning", lifespan="on", timeout_graceful_shutdown=2, http=http,
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


def serve_process(port: int, env: dict[str, str], log_path: Path, *args: str,
                  inherit: bool = True, session: bool = False) -> subprocess.Popen[bytes]:
    """A real `receiver serve --port PORT ARGS` process, once /readyz answers 200. Its
    environment is ours plus ``env``, or only ``env`` (``inherit=False``); ``session``:
    in a session and process group of its own, as in a terminal."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "serve", "--port", str(port), *args],
            env={**os.environ, **env} if inherit else env, stdout=log,
            stderr=subprocess.STDOUT, cwd=log_path.parent, start_new_session=session)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too."""
    import random
    import socket

    while True:
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class RedisClusterNodes:
    """Three masters on loopback ports, slots spread by ``redis-cli --cluster create``."""

    def __init__(self, root: Path) -> None:
        self.nodes = [RedisServer(root / f"node{i}", port=cluster_port(), persist=False,
                                  extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000"]) for i in range(3)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            while client.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, "the cluster did not come up"
                time.sleep(0.1)
            client.close()
        return self

    def flushall(self) -> None:
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            client.flushall()
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[RedisClusterNodes]:
    import shutil

    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is missing (Debian: apt-get install redis-tools): no cluster")
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_nodes: RedisClusterNodes) -> RedisClusterNodes:
    """The session's 3-master cluster, emptied before each test."""
    redis_cluster_nodes.flushall()
    return redis_cluster_nodes


class S3Server:
    """moto's S3 in server mode (from PyPI), on a loopback port: a real S3 API over HTTP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def aws(self) -> dict[str, str]:
        """The AWS_* variables that point a client at it."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}

    def start(self) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url)
                return self
            except httpx.TransportError:
                assert self.process.poll() is None, "moto's server did not start"
                assert time.monotonic() < deadline, "moto's server did not answer"
                time.sleep(0.1)

    def bucket(self, name: str) -> str:
        """A new, empty bucket."""
        assert httpx.put(f"{self.url}/{name}").status_code == 200
        return name

    def keys(self, bucket: str) -> list[str]:
        """The object keys in ``bucket`` (its listing, as any S3 client reads it)."""
        import re

        listing = httpx.get(f"{self.url}/{bucket}").text
        return re.findall(r"<Key>([^<]+)</Key>", listing)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


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
        image_store="",
    )
    return replace(settings, **overrides)


@pytest.fixture
def make_server(redis_server: RedisServer) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with the test settings, overridden by keyword; stopped at teardown."""
    started: list[LiveServer] = []

    def make(http: Any = StreamProtocol, **overrides: Any) -> LiveServer:
        overrides.setdefault("redis_url", redis_server.url)
        server = LiveServer(base_settings(**overrides), http=http).start()
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


def sample(name: str, task_id: str | None = None) -> bytes:
    """A sample payload; ``task_id``: with that provider task id instead of its own (an id
    belongs to one task: posting one sample to several tasks needs one id each)."""
    body = (SAMPLES / name).read_bytes()
    if task_id is None:
        return body
    own = DIALECTS[name.partition("-")[0]](body).provider_task_id
    assert own and body.count(own.encode()) >= 1
    return body.replace(own.encode(), task_id.encode())


def mint(client: httpx.Client, provider: str = "mjproxy", **fields: Any) -> tuple[str, str]:
    """POST /callback-urls -> (job id, callback URL)."""
    response = client.post("/callback-urls", json={"provider": provider, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    return body["job_id"], body["callback_url"]


def forget_claims(r: redis.Redis) -> None:
    """A provider task id is one task's: tests that post the same ids to a new task each
    time (examples of a property) start each one with no id held."""
    claims = r.keys(KEYS.claim("*", "*"))
    if claims:
        r.delete(*claims)


def history_entries(r: redis.Redis, tenant: str, job_id: str
                    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The stored transitions of one task, oldest first, (id, fields): its stream's, and
    those a compaction moved into its hash (`receiver.store.history`)."""
    stream = r.xrange(KEYS.history(tenant, job_id))
    return merge(r.hget(KEYS.task(tenant, job_id), "h"), stream)  # type: ignore[arg-type]


def history(r: redis.Redis, tenant: str, job_id: str) -> list[dict[bytes, bytes]]:
    """The stored transitions of one task, oldest first."""
    return [fields for _, fields in history_entries(r, tenant, job_id)]


# --- the submitter's stack: receiver with its worker, and the provider simulator ----

FINAL = ("SUCCESS", "FAILURE", "CANCEL")
Stack = Callable[..., tuple[LiveServer, LiveServer]]


@pytest.fixture
def stack(redis_server: RedisServer, r: redis.Redis) -> Iterator[Stack]:
    """``stack(sim=SimulatorConfig(...), flavor=..., **settings)`` -> (receiver, simulator),
    both running, the receiver's embedded worker sending to the simulator for every provider
    (mjproxy in the simulator's flavour, whose host may be fetched from)."""
    started: list[LiveServer] = []

    def make(sim: SimulatorConfig | None = None, limit: int = 3, flavor: str | None = None,
             **overrides: Any) -> tuple[LiveServer, LiveServer]:
        sim = sim or SimulatorConfig(step_interval=0.02, seed=7)
        if flavor is not None:
            sim = replace(sim, mjproxy_flavor=flavor)
        simulator = LiveServer(app=create_simulator(sim)).start()
        started.append(simulator)
        port = free_port()
        overrides.setdefault("embedded_worker", True)
        overrides.setdefault("fetch_allow_hosts", (f"127.0.0.1:{simulator.port}",))
        settings = base_settings(
            overrides.pop("redis_url", redis_server.url),
            public_base_url=f"http://127.0.0.1:{port}",
            accounts={p: ProviderAccount(p, simulator.url, Secret(f"sk-{p}"), limit,
                                         flavor=sim.mjproxy_flavor)
                      for p in PROVIDERS},
            reconcile_after=0.5, reconcile_interval=0.1, **overrides)
        receiver = LiveServer(settings, port=port).start()
        started.append(receiver)
        return receiver, simulator

    yield make
    for server in reversed(started):
        server.stop()


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/tasks", json=body)
    assert response.status_code == 202, response.text
    task: dict[str, Any] = response.json()
    assert task["status"] == "NOT_START"
    return task


def wait_final(client: httpx.Client, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = client.get(f"/tasks/{job_id}").json()
        if task["status"] in FINAL:
            return task
        assert time.monotonic() < deadline, f"task still {task['status']}: {task}"
        time.sleep(0.05)


def sim_stats(simulator: LiveServer) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{simulator.url}/_sim/stats").json()
    return stats


def sim_tasks(simulator: LiveServer) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = httpx.get(f"{simulator.url}/_sim/tasks").json()["tasks"]
    return tasks


def every_value(r: redis.Redis) -> bytes:
    """Every key and every value in Redis, as one blob to search."""
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        out.append(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            fields = r.hgetall(key)
            out += [b for pair in fields.items() for b in pair]
            if b"h" in fields and b":task:" in key:
                # a finished task's compacted history: searched as its entries, not as zlib
                out += [b for _, entry in unpack(fields[b"h"]) for pair in entry.items()
                        for b in pair]
        elif kind == b"stream":
            out += [b for _, fields in r.xrange(key) for pair in fields.items() for b in pair]
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
    return b"\n".join(out)


def faults(simulator: LiveServer, **changes: Any) -> None:
    httpx.post(f"{simulator.url}/_sim/faults", json=changes).raise_for_status()
