"""Chaos: callbacks under fire, and an account of every one of them afterwards.

A sender that retries like a careful webhook platform (the Standard Webhooks schedule, in
milliseconds instead of minutes) delivers each task's callbacks in order: 19 progress steps
then SUCCESS, for many tasks at once. Meanwhile Redis (appendonly, ``appendfsync everysec``
as deploy/ recommends) is SIGKILLed and restarted twice, and the web process once. Afterwards:

- every task's stored history must equal its true sequence (nothing missing, nothing extra);
- every callback answered 2xx must be in Redis (a SIGKILL of redis-server loses nothing it
  acknowledged: the AOF write happens before the reply; only fsync is deferred);
- no transition may be stored twice.

``tests/test_chaos.py`` runs a short version in CI; ``make chaos`` the full one, whose figures
go to RELIABILITY.md.

    .venv/bin/python -m bench.chaos [--tasks 500] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import redis

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.constants import Keys
from receiver.store.history import merge

ROOT = Path(__file__).resolve().parent.parent
# Standard Webhooks retries at 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: the same shape in
# tenths of a second, so a run ends in seconds and outlasts every outage it causes.
RETRY_SCHEDULE = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0, 5.0)
CONCURRENCY = 64
KEYS = Keys()


@dataclass
class Report:
    tasks: int = 0
    callbacks: int = 0  # distinct callbacks to deliver
    attempts: int = 0  # HTTP requests made, retries included
    answers: Counter[str] = field(default_factory=Counter)  # "200", "503", "connect", ...
    faults: list[str] = field(default_factory=list)
    acknowledged: int = 0
    lost: int = 0  # acknowledged, not in Redis
    undelivered: int = 0  # never acknowledged (the schedule ran out)
    duplicated: int = 0  # a transition stored twice
    wrong_history: int = 0  # tasks whose history is not their true sequence
    secrets_logged: int = 0  # tokens, API keys or signing keys in the web process's log
    log_lines: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.answers.items()))
        return [
            f"- tasks: {self.tasks:,}; callbacks: {self.callbacks:,}; HTTP attempts: "
            f"{self.attempts:,} ({answers})",
            f"- faults injected: {'; '.join(self.faults)}",
            f"- acknowledged: {self.acknowledged:,}; lost: {self.lost}; duplicated: "
            f"{self.duplicated}; tasks with a wrong history: {self.wrong_history}; "
            f"undelivered: {self.undelivered}",
            f"- secrets in the web process's {self.log_lines:,} log lines (access log on): "
            f"{self.secrets_logged}",
            f"- took {self.seconds:.1f} s",
        ]


def body(ptid: str, step: int, steps: int) -> bytes:
    if step == steps - 1:
        return orjson.dumps({"id": ptid, "status": "SUCCESS", "progress": "100%",
                             "imageUrl": f"https://cdn.example/{ptid}.png"})
    return orjson.dumps({"id": ptid, "status": "IN_PROGRESS",
                         "progress": f"{round((step + 1) * 99 / steps)}%"})


class Web:
    """`receiver serve` in a child process, to SIGKILL and start again."""

    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        self.port, self.env, self.log = port, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "receiver.cli", "serve", "--no-worker",
                 "--port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the web process did not start; see {self.log}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


async def deliver(client: httpx.AsyncClient, url: str, payload: bytes, report: Report,
                  deadline: float) -> bool:
    """One callback, retried on the schedule until 2xx; False if the schedule ran out."""
    for delay in (*RETRY_SCHEDULE, *([5.0] * 20)):
        await asyncio.sleep(delay)
        if time.monotonic() > deadline:
            break
        report.attempts += 1
        try:
            answer = await client.post(url, content=payload)
        except httpx.TransportError as exc:
            report.answers[type(exc).__name__] += 1
            continue
        report.answers[str(answer.status_code)] += 1
        if answer.status_code < 300:
            return True
        if answer.status_code < 500 and answer.status_code != 429:
            raise AssertionError(f"refused for good: {answer.status_code} {answer.text}")
    return False


async def run(work: Path, tasks: int = 500, steps: int = 20, time_limit: float = 300.0
              ) -> Report:
    report = Report(tasks=tasks, callbacks=tasks * steps)
    store = RedisServer(work / "redis", persist=True,
                        extra_args=["--appendfsync", "everysec"]).start()
    port = free_port()
    signing_key, api_key = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    env = {**os.environ, "REDIS_URL": store.url, "RECEIVER_API_KEYS": f"chaos:{api_key}",
           "RECEIVER_SECRET_KEYS": signing_key, "RECEIVER_DATA_DIR": str(work),
           "REDIS_TIMEOUT": "1"}
    web = Web(port, env, work / "web.log")
    web.start()
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    deadline = started + time_limit
    acked: set[tuple[str, int]] = set()
    try:
        async with httpx.AsyncClient(
            base_url=base, timeout=httpx.Timeout(5.0),
            limits=httpx.Limits(max_connections=CONCURRENCY),
            headers={"Authorization": f"Bearer {api_key}"},
        ) as client:
            minted = []
            for _ in range(tasks):
                answer = await client.post("/callback-urls", json={"provider": "mjproxy"})
                minted.append(answer.json())
            gate = asyncio.Semaphore(CONCURRENCY)
            plan = ((0.2, "redis"), (0.45, "web"), (0.7, "redis"))
            # A fault's share reached, the senders wait for it: the run cannot end before
            # every fault happened (it once did, when the rest went through during a restart).
            injected = [asyncio.Event() for _ in plan]

            async def sender(job: dict[str, str]) -> None:
                for step in range(steps):
                    for (share, _), done in zip(plan, injected, strict=True):
                        if len(acked) >= share * report.callbacks and not done.is_set():
                            await done.wait()
                    payload = body(f"p-{job['job_id']}", step, steps)
                    async with gate:
                        ok = await deliver(client, job["callback_url"], payload, report,
                                           deadline)
                    if not ok:
                        report.undelivered += steps - step
                        return
                    acked.add((job["job_id"], step))

            async def chaos() -> None:
                try:
                    for (share, target), done in zip(plan, injected, strict=True):
                        while len(acked) < share * report.callbacks:
                            await asyncio.sleep(0.01)
                        at = len(acked)
                        if target == "redis":
                            await asyncio.to_thread(store.stop, True)  # SIGKILL
                            await asyncio.sleep(1.0)
                            await asyncio.to_thread(store.start)
                        else:
                            await asyncio.to_thread(web.kill)
                            await asyncio.to_thread(web.start)
                        report.faults.append(f"SIGKILL {target} after {at:,} acknowledged")
                        done.set()
                finally:  # a fault that failed must not leave the senders waiting
                    for done in injected:
                        done.set()

            faults = asyncio.create_task(chaos())
            await asyncio.gather(*(sender(job) for job in minted))
            if not faults.done():
                faults.cancel()
        report.acknowledged = len(acked)
        report.seconds = time.monotonic() - started
        check(store, minted, acked, steps, report)
        web.stop()
        log = (work / "web.log").read_text()
        if any(code.startswith("5") and code != "503" for code in report.answers):
            # an internal error is a bug: keep what the web process said about it
            kept = ROOT / ".receiver" / "chaos-web.log"
            kept.parent.mkdir(exist_ok=True)
            kept.write_text(log)
            report.faults.append(f"internal errors: see {kept}")
        report.log_lines = log.count("\n")
        tokens = [job["callback_url"].partition("token=")[2] for job in minted]
        report.secrets_logged = sum(log.count(s) for s in (signing_key, api_key, *tokens))
    finally:
        web.stop()
        store.stop()
    return report


def check(store: RedisServer, minted: list[dict[str, str]], acked: set[tuple[str, int]],
          steps: int, report: Report) -> None:
    client = redis.Redis(port=store.port)
    want = [round((s + 1) * 99 / steps) for s in range(steps - 1)] + [100]
    for job in minted:
        job_id = job["job_id"]
        stream = client.xrange(KEYS.history("chaos", job_id))  # then the compacted part
        entries = merge(client.hget(KEYS.task("chaos", job_id), "h"), stream)
        history = [orjson.loads(fields[b"data"]) for _, fields in entries][1:]  # after created
        progress = [event["progress"] for event in history]
        versions = [event["version"] for event in history]
        report.duplicated += len(versions) - len(set(versions))
        report.duplicated += len(progress) - len(set(progress))
        stored_steps = {want.index(p) for p in progress if p in want}
        report.lost += sum(1 for step in range(steps)
                           if (job_id, step) in acked and step not in stored_steps)
        delivered = sum(1 for step in range(steps) if (job_id, step) in acked)
        if progress != want[:delivered]:
            report.wrong_history += 1
    client.close()


def write_report(report: Report, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Reliability\n"
    section = "\n".join([
        "## Chaos run (`make chaos`)", "",
        f"{time.strftime('%Y-%m-%d')}, `python -m bench.chaos --tasks {report.tasks} "
        f"--steps {report.callbacks // max(report.tasks, 1)}`. A sender retrying on the "
        "Standard Webhooks schedule (shortened) delivers each task's callbacks in order "
        "(progress steps, then SUCCESS) while Redis (appendonly, `appendfsync everysec`) is "
        "SIGKILLed and restarted twice and the web process once. Lost = answered 2xx but "
        "missing from Redis afterwards; duplicated = a transition stored twice; a wrong "
        "history = a task whose stored transitions differ from what it was sent.", "",
        *report.lines(), ""])
    marker = "## Chaos run (`make chaos`)"
    if marker in text:
        head, _, rest = text.partition(marker)
        tail = rest.partition("\n## ")[2]
        text = head + section + (("\n## " + tail) if tail else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        report = asyncio.run(run(Path(work), args.tasks, args.steps))
    print("\n".join(report.lines()))
    write_report(report, ROOT / "RELIABILITY.md")
    failed = report.lost or report.duplicated or report.wrong_history or report.undelivered
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
