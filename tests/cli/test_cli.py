"""``receiver serve`` as `make run` runs it: no REDIS_URL, no keys, no provider, a fresh data
folder; and ``receiver submit --watch`` against it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from receiver.cli.redis_server import RedisServer, free_port
from receiver.simulator import SimulatorConfig, create_simulator
from tests.conftest import TIMEOUT, LiveServer, sample, serve_process


def serve(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`receiver serve --simulator --host 0.0.0.0` (`make run`), logging to serve.log."""
    return serve_process(int(env["PORT"]), env, tmp_path / "serve.log", "--simulator",
                         "--host", "0.0.0.0", inherit=False)


def fresh_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (
        "REDIS_URL", "RECEIVER_API_KEYS", "RECEIVER_SECRET_KEYS", "DEFAULT_PROVIDER",
        *(f"{p}_BASE_URL" for p in ("MJPROXY", "OHMYGPT", "AIGC2D")))}
    env.update(RECEIVER_DATA_DIR=str(tmp_path / "data"), PORT=str(free_port()))
    return env


def embedded_redis_alive(serve_log: str) -> bool:
    """Whether the redis-server that `receiver serve` logged it started still answers."""
    url = next(w for w in serve_log.split() if w.startswith("redis://"))
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        return False
    return True


def test_serve_starts_its_own_redis_and_accepts_a_minted_callback(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    log_path = tmp_path / "serve.log"
    proc = serve(tmp_path, env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{env['PORT']}", timeout=TIMEOUT) as client:
            minted = client.post("/callback-urls", json={"provider": "mjproxy"}).json()
            url = minted["callback_url"]
            answer = client.post(url, content=sample("mjproxy-success.json"))
            assert answer.json()["result"] == "stored"
            assert client.get(f"/tasks/{minted['job_id']}").json()["status"] == "SUCCESS"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)  # uvicorn (10 s grace), then Redis and the simulator: bounded

    output = log_path.read_text()
    token = url.split("token=")[1]
    assert token not in output  # access lines carry [redacted]
    assert "token=[redacted]" in output
    assert "binding 127.0.0.1 instead of 0.0.0.0" in output  # no keys: loopback only
    assert (tmp_path / "data" / "secret_key").stat().st_mode & 0o077 == 0
    assert not embedded_redis_alive(output)  # the child Redis went with the service


def test_ctrl_c_stops_the_service_before_its_redis_and_simulator(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    port = int(env["PORT"])
    proc = serve_process(port, env, tmp_path / "serve.log", "--simulator", inherit=False,
                         session=True)
    stream = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        stream.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"retry: " not in data:
            data += stream.recv(4096)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        assert proc.wait(60) == 0
        while chunk := stream.recv(4096):
            data += chunk
    finally:
        stream.close()
        if proc.poll() is None:
            proc.kill()
    assert data.endswith(b": cut off: reconnect with Last-Event-ID\r\n\r\n0\r\n\r\n")
    output = (tmp_path / "serve.log").read_text()
    assert "lost" not in output and "Error" not in output, output  # Redis outlived the app
    assert not embedded_redis_alive(output)  # and was stopped after it


def test_submit_watch_on_a_fresh_service_shows_a_task_reach_100(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    del env["IMAGE_STORE"]  # as `make run`: images kept in the data folder
    proc = serve(tmp_path, env)
    try:
        cli = [sys.executable, "-m", "receiver.cli"]
        watched = subprocess.run([*cli, "submit", "a red fox", "--watch"],
                                 env={**env, "COLUMNS": "100"}, capture_output=True, text=True,
                                 timeout=60)
        simulator = re.search(r"simulator plays .* on (\S+)",
                              (tmp_path / "serve.log").read_text())
        assert simulator, (tmp_path / "serve.log").read_text()
        # the simulator's images are loopback: `serve --simulator` allows fetching them
        described = subprocess.run(
            [*cli, "submit", "--action", "DESCRIBE", "--image",
             f"{simulator[1]}/images/input.png", "--watch"],
            env={**env, "COLUMNS": "100"}, capture_output=True, text=True, timeout=60)
        listed = httpx.get(f"http://127.0.0.1:{env['PORT']}/tasks").json()["tasks"]
        cancelled = subprocess.run([*cli, "cancel", listed[0]["id"]], env=env,
                                   capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 20
        while not (archived := httpx.get(f"http://127.0.0.1:{env['PORT']}/tasks/"
                                         f"{listed[1]['id']}").json())["archived_image_url"]:
            assert time.monotonic() < deadline, archived
            time.sleep(0.1)
        image = httpx.get(archived["archived_image_url"])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)  # uvicorn (10 s grace), then Redis and the simulator: bounded
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "100%" in watched.stdout and "SUCCESS" in watched.stdout
    assert "━" in watched.stdout  # the bar
    assert described.returncode == 0 and "SUCCESS" in described.stdout, described.stderr
    # sent to the simulator (mjproxy by default) and finished, newest first
    describe, task = listed
    assert task["status"] == "SUCCESS" and task["provider"] == "mjproxy"
    assert task["prompt"] == "a red fox" and task["image_url"]
    assert describe["action"] == "DESCRIBE" and describe["final_prompt"]
    assert cancelled.returncode == 1 and "409" in cancelled.stderr, cancelled.stderr
    assert "task_final" in cancelled.stderr
    assert "simulator plays mjproxy, ohmygpt, aigc2d" in (tmp_path / "serve.log").read_text()
    # the grid's images, kept where `make run` keeps its data, and served
    name = archived["archived_image_url"].rpartition("/")[2]
    assert (tmp_path / "data" / "images" / name[:2] / name).read_bytes() == image.content
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"


def test_json_logs_carry_request_ids_and_no_secret(tmp_path: Path) -> None:
    env = {**fresh_env(tmp_path), "LOG_FORMAT": "json", "RECEIVER_API_KEYS": "acme:key-acme",
           "RECEIVER_SECRET_KEYS": "a-secret-signing-key"}
    proc = serve(tmp_path, env)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT,
                          headers={"Authorization": "Bearer key-acme"}) as client:
            url = client.post("/callback-urls", json={"provider": "mjproxy"}).json()[
                "callback_url"]
            client.post(url, content=sample("mjproxy-success.json"),
                        headers={"X-Request-ID": "req-42"})
            client.post(url + "x", content=b"{}")  # refused: a bad token
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)  # uvicorn (10 s grace), then Redis and the simulator: bounded
    text = (tmp_path / "serve.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(doc) for doc in lines)
    access = [doc for doc in lines if doc["logger"] == "uvicorn.access"]
    assert any(doc.get("request_id") == "req-42" and "/callbacks/mjproxy" in doc["message"]
               for doc in access), access
    assert len({doc["request_id"] for doc in access}) == len(access)  # one id per request
    token = url.split("token=")[1]
    for secret in (token, "key-acme", "a-secret-signing-key"):
        assert secret not in text


def test_receiver_worker_process_sends_what_the_web_process_queued(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis) -> None:
    """The Procfile's split: `receiver serve --no-worker` queues, `receiver worker` sends."""
    simulator = LiveServer(app=create_simulator(SimulatorConfig(step_interval=0.02))).start()
    port = free_port()
    env = {"REDIS_URL": redis_server.url, "RECEIVER_SECRET_KEYS": "k1",
           "RECEIVER_API_KEYS": "acme:key-acme", "RECEIVER_DATA_DIR": str(tmp_path),
           "OHMYGPT_BASE_URL": simulator.url, "OHMYGPT_API_KEY": "sk",
           "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"}
    web = serve_process(port, env, tmp_path / "web.log", "--no-worker")
    worker = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT,
                          headers={"Authorization": "Bearer key-acme"}) as client:
            job = client.post("/tasks", json={"prompt": "a red fox"}).json()["id"]
            time.sleep(0.5)
            assert client.get(f"/tasks/{job}").json()["status"] == "NOT_START"  # queued
            with (tmp_path / "worker.log").open("wb") as log:
                worker = subprocess.Popen([sys.executable, "-m", "receiver.cli", "worker"],
                                          env={**os.environ, **env}, stdout=log,
                                          stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 20
            while (task := client.get(f"/tasks/{job}").json())["status"] != "SUCCESS":
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
        assert task["provider"] == "ohmygpt" and task["cost"] == {"amount": 14000,
                                                                  "unit": "tokens"}
    finally:
        for proc in (worker, web):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)  # uvicorn (10 s grace), then Redis and the simulator: bounded
        simulator.stop()
    assert worker.returncode in (0, -signal.SIGTERM)


def test_the_procfile_runs_under_honcho(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis) -> None:
    simulator = LiveServer(app=create_simulator(SimulatorConfig(step_interval=0.02))).start()
    port = free_port()  # honcho gives web PORT=port, worker PORT=port+100
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "REDIS_URL": redis_server.url, "RECEIVER_SECRET_KEYS": "k1",
           "RECEIVER_API_KEYS": "acme:key-acme", "RECEIVER_DATA_DIR": str(tmp_path),
           "MJPROXY_BASE_URL": simulator.url, "MJPROXY_API_KEY": "sk",
           "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with (tmp_path / "honcho.log").open("wb") as log:
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(repo / "Procfile"),
             "-p", str(port), "-e", os.devnull], env=env, cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT,
                          headers={"Authorization": "Bearer key-acme"}) as client:
            while True:
                try:
                    job = client.post("/tasks", json={"prompt": "a red fox"}).json()["id"]
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()
                    time.sleep(0.2)
            while (task := client.get(f"/tasks/{job}").json())["status"] != "SUCCESS":
                assert time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()
                time.sleep(0.1)
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(30)
        simulator.stop()
    output = (tmp_path / "honcho.log").read_text()
    assert "web.1" in output and "worker.1" in output
    assert task["provider"] == "mjproxy" and task["image_url"]


def test_ctrl_c_ends_watch_quietly_with_status_130(
        make_server: Callable[..., LiveServer], r: redis.Redis) -> None:
    server = make_server()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "watch", "--url", server.url,
         "--api-key", "key-acme"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while "receiver_sse_connections 1.0" not in httpx.get(f"{server.url}/metrics").text:
            assert watcher.poll() is None, watcher.communicate()
            assert time.monotonic() < deadline, "watch did not connect"
            time.sleep(0.05)
        watcher.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
    assert len((out + err).splitlines()) <= 2, out + err


def test_serve_exits_3_when_it_cannot_start(tmp_path: Path, redis_server: RedisServer) -> None:
    """A port already taken: the status uvicorn gives it, which a supervisor restarts on."""
    env = {**fresh_env(tmp_path), "REDIS_URL": redis_server.url}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["PORT"])))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "receiver.cli", "serve", "--no-worker"],
                              env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
