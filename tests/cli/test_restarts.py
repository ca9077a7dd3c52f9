"""``receiver serve``'s children end with it however it ends, one serve owns a data folder,
and a restart mid-task fails the tasks the (new, empty) simulator does not know, frees their
slots and runs new tasks. Real processes only: `receiver serve --simulator`, its
redis-server and its simulator."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from receiver.cli.redis_server import free_port
from tests.cli.test_cli import fresh_env
from tests.conftest import TIMEOUT, serve_process

# Fast reconciling; the stranded task's provider forgets it 2 s before it fails; one slot,
# so a task submitted after the restart waits for the stranded one's.
RESTART_ENV = {"UNKNOWN_TASK_GRACE": "2", "RECONCILE_AFTER": "0.5",
               "RECONCILE_INTERVAL": "0.2", "MJPROXY_QUEUE_LIMIT": "1"}


def children(pid: int) -> list[int]:
    """The processes ``pid`` started, from every thread of it."""
    out: list[int] = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in Path(f"/proc/{pid}/task/{thread}/children").read_text().split()]
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (dead, not reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of ``pids`` runs; fails after ``timeout``."""
    start = time.monotonic()
    while left := [p for p in pids if running(p)]:
        assert time.monotonic() - start < timeout, [command(p) for p in left if running(p)]
        time.sleep(0.05)
    return time.monotonic() - start


def end(proc: subprocess.Popen[bytes], kids: list[int]) -> None:
    """Cleanup: ``proc`` and the children recorded for it, whatever the test did."""
    kids = kids + (children(proc.pid) if proc.poll() is None else [])
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    for pid in kids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def simulator_url(log_path: Path) -> str:
    found = re.search(r"simulator plays .* on (\S+)", log_path.read_text())
    assert found, log_path.read_text()
    return found[1]


def wait_status(client: httpx.Client, job: str, statuses: tuple[str, ...],
                timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = client.get(f"/tasks/{job}").json()
        if task["status"] in statuses:
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.05)


def test_a_killed_serve_leaves_no_child_and_its_restart_fails_the_stranded_task(
        tmp_path: Path) -> None:
    env = {**fresh_env(tmp_path), **RESTART_ENV, "SIMULATOR_STEP_INTERVAL": "2"}
    port = int(env["PORT"])
    first = serve_process(port, env, tmp_path / "serve1.log", "--simulator", inherit=False)
    kids = children(first.pid)
    second = None
    kids2: list[int] = []
    try:
        assert sorted(("redis-server" in command(k), "simulate" in command(k))
                      for k in kids) == [(False, True), (True, False)]
        simulator = simulator_url(tmp_path / "serve1.log")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            stranded = client.post("/tasks", json={"prompt": "a red fox"}).json()["id"]
            sent = wait_status(client, stranded, ("IN_PROGRESS",))  # 2 s a step: in flight
            first.kill()
            first.wait(30)
            # the kernel sent them SIGTERM (PR_SET_PDEATHSIG): no orphan, no second
            # redis-server on the append-only file
            gone_after = wait_gone(kids, 20)

            # Again on the same data folder, the simulator fast this time.
            second = serve_process(port, {**env, "SIMULATOR_STEP_INTERVAL": "0.05"},
                                   tmp_path / "serve2.log", "--simulator", inherit=False)
            restarted = time.monotonic()
            kids2 = children(second.pid)
            assert simulator_url(tmp_path / "serve2.log") == simulator  # the port it had
            fresh = client.post("/tasks", json={"prompt": "a blue fox"}).json()["id"]
            while True:  # the fresh task waits for the only slot, the stranded one's
                now = client.get(f"/tasks/{fresh}").json()  # read before the stranded one
                before = client.get(f"/tasks/{stranded}").json()
                assert before["status"] in ("IN_PROGRESS", "FAILURE"), before
                assert now["status"] == "NOT_START" or before["status"] == "FAILURE", now
                if before["status"] == "FAILURE":
                    failed_after = time.monotonic() - restarted
                    break
                assert time.monotonic() - restarted < 30, before
                time.sleep(0.05)
            done = wait_status(client, fresh, ("SUCCESS", "FAILURE"))
            ran_after = time.monotonic() - restarted
        assert "does not know this task" in before["fail_reason"], before
        assert sent["provider_task_id"] in before["fail_reason"], before
        assert done["status"] == "SUCCESS" and done["image_url"], done
        print(f"children gone {gone_after:.2f} s after the SIGKILL; stranded task failed "
              f"{failed_after:.1f} s after the restart, the next one done {ran_after:.1f} s")

        second.send_signal(signal.SIGTERM)  # a supervisor's stop: nothing left either
        assert second.wait(60) == -signal.SIGTERM
        assert not [k for k in kids2 if running(k)]
        assert "Traceback" not in (tmp_path / "serve2.log").read_text()
    finally:
        end(first, kids)
        if second is not None:
            end(second, kids2)


def test_a_second_serve_refuses_a_data_folder_in_use_and_sigterm_leaves_nothing(
        tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    owner = serve_process(int(env["PORT"]), env, tmp_path / "serve.log", "--simulator",
                          inherit=False)
    kids = children(owner.pid)
    other: subprocess.Popen[bytes] | None = None
    try:
        url = next(w for w in (tmp_path / "serve.log").read_text().split()
                   if w.startswith("redis://"))
        other = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "serve"],
            env={**env, "PORT": str(free_port())}, cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        _, err = other.communicate(timeout=30)
        assert other.returncode == 2, err
        assert (f"another receiver serve (pid {owner.pid}) holds "
                f"{tmp_path / 'data' / 'redis'}: stop it, or set REDIS_URL / "
                "RECEIVER_DATA_DIR") in err.decode(), err
        assert redis.Redis.from_url(url, socket_connect_timeout=1).ping()  # untouched

        owner.send_signal(signal.SIGTERM)
        assert owner.wait(60) == -signal.SIGTERM
        assert not [k for k in kids if running(k)]  # stopped before it ended
    finally:
        end(owner, kids)
        if other is not None and other.poll() is None:
            end(other, [])


def test_web_workers_take_settings_as_an_object_and_die_with_a_killed_serve(
        tmp_path: Path) -> None:
    """``--workers 2``: each web process gets serve's settings (the embedded Redis, the
    simulator's accounts, the worker) without serve writing them into the environment its
    children inherit, and none outlives a SIGKILL of serve."""
    env = {**fresh_env(tmp_path), "SIMULATOR_STEP_INTERVAL": "0.05"}
    port = int(env["PORT"])
    proc = serve_process(port, env, tmp_path / "serve.log", "--simulator", "--workers", "2",
                         inherit=False)
    kids: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            job = client.post("/tasks", json={"prompt": "a grey fox"}).json()["id"]
            done = wait_status(client, job, ("SUCCESS", "FAILURE"))
        assert done["status"] == "SUCCESS", done
        kids = children(proc.pid)
        web = [k for k in kids if "multiprocessing" in command(k) and "spawn_main" in command(k)]
        assert len(web) == 2, [command(k) for k in kids]
        for pid in web:
            inherited = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            names = {item.partition(b"=")[0] for item in inherited}
            assert not names & {b"REDIS_URL", b"EMBEDDED_WORKER", b"MJPROXY_BASE_URL",
                                b"RECEIVER_SECRET_KEYS"}, names
        proc.kill()
        proc.wait(30)
        print(f"{len(kids)} children gone {wait_gone(kids, 20):.2f} s after the SIGKILL")
    finally:
        end(proc, kids)
