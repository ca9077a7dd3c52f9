"""Callback ingest rate: the receiver's full callback path against a bare Starlette endpoint.

Ours runs as ``receiver serve`` runs it, with its access log off and on; the bare endpoint
(``bench/bare.py``) only reads the body, on one uvicorn worker. All take the same wrk load
(same Lua script, same paths and bodies, same concurrency and duration) in every round, the
order rotating, so each ratio is measured side by side; the median of the rounds counts.
ours/bare is the share of one worker's HTTP capacity that survives our token check, dialect
parsing and the Redis transition script (goal: >= 50% with the access log off, >= 45% on),
and on/off what the access log costs (goal: >= 90%). Two more sides say where the gap is:
the floor (bare plus one Redis round trip) and the writes (bare plus a script making a
stored transition's Redis calls, none of its logic).

The load is realistic midjourney-proxy traffic: per job, IN_PROGRESS at 1%..99% in ten steps
then SUCCESS with buttons, many jobs interleaved, each callback a stored transition (each
measured run uses freshly minted jobs). Results go to stdout and to ``BENCHMARKS.md``.

    .venv/bin/python -m bench.ingest [--duration 8] [--connections 64] [--jobs N]

``--against REF`` measures our callback path at git ref REF (a temporary worktree) instead
of the bare endpoint, each side on jobs of its own, rounds alternating: what a change did
to the hot path, as the median of every run (section "bench/ingest: before and after").
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import redis
import uvloop

from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.constants import DEFAULT_PREFIX, Keys
from receiver.core.settings import DEFAULT_TENANT
from receiver.store.history import merge

ROOT = Path(__file__).resolve().parent.parent
OURS_APP = "receiver.app:create_app"
BARE_APP = "bench.bare:create_app"
FLOOR_APP = "bench.bare:create_floor_app"
WRITES_APP = "bench.bare:create_writes_app"
HOST = "127.0.0.1"
UVICORN_FLAGS = (
    "--no-access-log", "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
)
PROGRESS_STEPS = tuple(round(1 + k * 98 / 9) for k in range(10))  # 1, 12, ..., 99
CALLBACKS_PER_JOB = len(PROGRESS_STEPS) + 1

# Cycles through pre-generated requests, one file of "path\nbody\n" pairs (given after --).
WRK_SCRIPT = """\
local requests, n, i = {}, 0, 0

function init(args)
  local headers = {["Content-Type"] = "application/json"}
  local f = assert(io.open(args[1], "rb"))
  for path in f:lines() do
    n = n + 1
    requests[n] = wrk.format("POST", path, headers, f:read("*l"))
  end
  f:close()
end

function request()
  i = i % n + 1
  return requests[i]
end
"""


@dataclass(frozen=True)
class WrkResult:
    rate: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors
    output: str


@dataclass(frozen=True)
class Run:
    server: str  # "ours" | "ours-log" | "bare" | "floor" | "writes" | "before"
    wrk: WrkResult
    sent: int  # requests in the cycled list
    stored: int | None = None  # transitions stored during the run (ours only)
    round: int = 0
    # CPU per request answered (user + system, from /proc): the server process, redis-server
    server_us: float = 0.0
    redis_us: float = 0.0


# --- servers -------------------------------------------------------------------------------


# --pin: uvicorn alone on CPU 0; wrk and redis-server share CPU 1 (for both servers alike),
# to see how much of the gap is three processes contending for two cores.
PIN: dict[str, list[str]] = {"server": [], "load": []}


# What the services under test may cost: no rate on minting, quotas never reached but
# counted (their cost is part of the path).
SERVICE_ENV = {"MINT_RATE": "0", "TENANT_MAX_TASKS": str(10**9),
               "TENANT_MAX_BYTES": str(10**15)}


def uvicorn_command(app: str, port: int) -> list[str]:
    return [*PIN["server"], sys.executable, "-m", "uvicorn", app, "--factory", "--host", HOST,
            "--port", str(port), *UVICORN_FLAGS]


SERVER_PIDS: dict[str, int] = {}  # base URL -> the process serving it (for its CPU time)


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (utime + stime of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def child_server(command: list[str], port: int, env: dict[str, str], log_path: Path,
                 start_timeout: float = 20.0, cwd: Path = ROOT
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process serving HTTP on ``port``, its output in ``log_path``; yielded once it
    answers; terminated (then killed) on exit. Every bench's servers start here."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://{HOST}:{port}", proc, log_path, timeout=start_timeout)
            SERVER_PIDS[f"http://{HOST}:{port}"] = proc.pid
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def uvicorn_server(app: str, env: dict[str, str], log_path: Path, cwd: Path = ROOT
                   ) -> Iterator[str]:
    """A uvicorn child serving ``app`` (from the code in ``cwd``); yields its base URL."""
    port = free_port()
    with child_server(uvicorn_command(app, port), port, env, log_path, cwd=cwd):
        yield f"http://{HOST}:{port}"


@contextmanager
def receiver_server(env: dict[str, str], log_path: Path, cwd: Path = ROOT,
                    access_log: bool = False) -> Iterator[str]:
    """``receiver serve`` (from the code in ``cwd``) without its worker, its access log on
    or off (into ``log_path``, a file, as a supervisor would keep it); yields its URL."""
    port = free_port()
    command = [*PIN["server"], sys.executable, "-m", "receiver.cli", "serve", "--host", HOST,
               "--port", str(port), "--no-worker", *([] if access_log else ["--no-access-log"])]
    with child_server(command, port, env, log_path, cwd=cwd):
        yield f"http://{HOST}:{port}"


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """The repository at ``ref``, checked out in a temporary directory."""
    path = Path(tempfile.mkdtemp(prefix="bench-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), ref], cwd=ROOT,
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                       check=False)


def wait_http(base: str, proc: subprocess.Popen[bytes], log_path: Path,
              timeout: float = 20.0) -> None:
    """Until the server answers HTTP at all (the bare app has no health route)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=httpx.Timeout(1.0), trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{log_path.read_text()[-2000:]}")
            try:
                client.get("/healthz")
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer within {timeout:.0f}s") from None
                time.sleep(0.1)


# --- workload ------------------------------------------------------------------------------


async def mint(base: str, count: int, workers: int = 4) -> list[tuple[str, str]]:
    """``count`` jobs on our service: (job_id, callback path with ?token=). A few workers
    on one keep-alive pool: more only adds contention in httpx's pool."""
    jobs: list[tuple[str, str]] = []
    numbers = iter(range(count))
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10.0), trust_env=False,
                                 limits=httpx.Limits(max_connections=workers)) as client:

        async def worker() -> None:
            for n in numbers:
                resp = await client.post("/callback-urls", json={
                    "provider": "mjproxy", "prompt": f"bench cat {n}, watercolor --ar 3:2",
                })
                resp.raise_for_status()
                doc = resp.json()
                url = urlsplit(doc["callback_url"])
                jobs.append((doc["job_id"], f"{url.path}?{url.query}"))

        await asyncio.gather(*(worker() for _ in range(workers)))
    return jobs


def callbacks(provider_id: str, prompt: str) -> list[bytes]:
    """One job's mjproxy callbacks, in order: IN_PROGRESS 1%..99%, then SUCCESS."""
    submit = int(provider_id) // 1000
    task: dict[str, Any] = {
        "id": provider_id, "action": "IMAGINE", "status": "IN_PROGRESS", "prompt": prompt,
        "promptEn": prompt, "description": f"/imagine {prompt}", "state": "",
        "submitTime": submit, "startTime": submit + 3_000, "finishTime": None,
        "progress": "", "imageUrl": None, "failReason": None,
        "properties": {"notifyHook": "https://example.com/callbacks/mjproxy?token=REDACTED",
                       "finalPrompt": prompt},
        "buttons": [],
    }
    out = []
    for step, pct in enumerate(PROGRESS_STEPS):
        task.update(progress=f"{pct}%", imageUrl=(
            f"https://cdn.discordapp.com/attachments/{provider_id}/{step}/preview.webp"))
        out.append(orjson.dumps(task))
    ref = secrets.token_hex(16)
    task.update(
        status="SUCCESS", progress="100%", finishTime=submit + 60_000,
        imageUrl=f"https://cdn.discordapp.com/attachments/{provider_id}/grid.png",
        properties={"finalPrompt": prompt},
        buttons=[
            *({"customId": f"MJ::JOB::{kind}::{i}::{ref}", "emoji": "", "label": f"{kind[0]}{i}",
               "type": 2, "style": 2}
              for kind in ("upsample", "variation") for i in range(1, 5)),
            {"customId": f"MJ::JOB::reroll::0::{ref}::SOLO", "emoji": "🔄", "label": "",
             "type": 2, "style": 2},
        ],
    )
    out.append(orjson.dumps(task))
    return out


def interleave(jobs: Sequence[tuple[str, str]], first_id: int,
               window: int) -> list[tuple[str, bytes]]:
    """Every job's callbacks, ``window`` jobs in flight at a time: step k of each job in the
    window, then step k+1. A job's successive callbacks are ``window`` requests apart, more
    than wrk keeps in flight, so they arrive in order."""
    out: list[tuple[str, bytes]] = []
    for start in range(0, len(jobs), window):
        group = [(path, callbacks(str(first_id + start + j), f"bench cat {start + j}"))
                 for j, (_, path) in enumerate(jobs[start:start + window])]
        for step in range(CALLBACKS_PER_JOB):
            out.extend((path, bodies[step]) for path, bodies in group)
    return out


def write_requests(path: Path, requests: Sequence[tuple[str, bytes]]) -> Path:
    with path.open("wb") as f:
        for target, body in requests:
            f.write(target.encode() + b"\n" + body + b"\n")
    return path


def stored_transitions(client: redis.Redis, jobs: Sequence[tuple[str, str]]) -> int:
    """Transitions stored since minting, summed over the jobs' histories (each starts with
    its created event). Exact even when the tenant stream has been trimmed."""
    keys = Keys(DEFAULT_PREFIX)
    pipe = client.pipeline(transaction=False)
    for job_id, _ in jobs:  # a finished task's history is compacted: both parts
        pipe.xrange(keys.history(DEFAULT_TENANT, job_id))
        pipe.hget(keys.task(DEFAULT_TENANT, job_id), "h")
    replies = pipe.execute()
    return sum(max(0, len(merge(blob, stream)) - 1)
               for stream, blob in zip(replies[::2], replies[1::2], strict=True))


# --- wrk -----------------------------------------------------------------------------------


def wrk_command(base: str, script: Path, data: Path, connections: int,
                duration: float) -> list[str]:
    return [*PIN["load"], "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
            "-s", str(script), f"{base}/", "--", str(data)]


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def parse_wrk(text: str) -> WrkResult:
    def num(pattern: str) -> re.Match[str]:
        found = re.search(pattern, text, re.MULTILINE)
        if found is None:
            raise ValueError(f"no {pattern!r} in wrk's output:\n{text}")
        return found

    def pct(p: int) -> float:
        found = num(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m|h)\s*$")
        return float(found[1]) * _UNIT_MS[found[2]]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     text)
    errors = (int(non2xx[1]) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return WrkResult(float(num(r"^Requests/sec:\s+([\d.]+)")[1]), pct(50), pct(99),
                     int(num(r"(\d+) requests in")[1]), errors, text)


def run_wrk(base: str, script: Path, data: Path, connections: int, duration: float) -> WrkResult:
    cmd = wrk_command(base, script, data, connections, duration)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# --- report --------------------------------------------------------------------------------


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    return (f"nproc {os.cpu_count()}, {model}, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def versions() -> str:
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             check=False)
    wrk_v = re.search(r"wrk (\S+)", wrk.stdout + wrk.stderr)
    redis_m = re.search(r"v=(\S+)", redis_v.stdout)
    return (f"uvicorn {version('uvicorn')}, uvloop {version('uvloop')}, "
            f"httptools {version('httptools')}, starlette {version('starlette')}, "
            f"redis-server {redis_m[1] if redis_m else '?'}, wrk {wrk_v[1] if wrk_v else '?'}")


def ratios(runs: Sequence[Run], top: str, bottom: str) -> list[float]:
    """``top``'s rate over ``bottom``'s, round by round (measured side by side)."""
    rate = {(r.round, r.server): r.wrk.rate for r in runs}
    return [rate[(k, top)] / rate[(k, bottom)] for k in sorted({r.round for r in runs})]


def report(runs: Sequence[Run], args: argparse.Namespace, jobs_per_run: int,
           window: int) -> str:
    off, on, log = (ratios(runs, "ours", "bare"), ratios(runs, "ours-log", "bare"),
                    ratios(runs, "ours-log", "ours"))
    floor, within = ratios(runs, "floor", "bare"), ratios(runs, "ours", "floor")
    writes, logic = ratios(runs, "writes", "bare"), ratios(runs, "ours", "writes")
    names = {"ours": "receiver, access log off", "ours-log": "receiver, access log on",
             "bare": "bare starlette", "floor": "bare + one Redis round trip",
             "writes": "bare + a transition's Redis calls"}
    rows = [
        "| round | server | req/s | p50 | p99 | requests | errors | stored | not stored "
        "| server CPU / req | redis CPU / req |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        stored = "n/a | n/a" if run.stored is None else (
            f"{run.stored:,} | {max(0, run.wrk.requests - run.stored):,}")
        rows.append(
            f"| {run.round + 1} | {names[run.server]} | {run.wrk.rate:,.0f} | "
            f"{run.wrk.p50_ms:.2f} ms | {run.wrk.p99_ms:.2f} ms | {run.wrk.requests:,} | "
            f"{run.wrk.errors} | {stored} | {run.server_us:.0f} us | {run.redis_us:.0f} us |")
    wrapped = [r for r in runs if r.server in ("ours", "ours-log") and r.wrk.requests > r.sent]

    def every(values: list[float]) -> str:
        return ", ".join(f"{v:.1%}" for v in values)

    m_off, m_on, m_log, m_floor, m_within, m_writes, m_logic = (
        statistics.median(v) for v in (off, on, log, floor, within, writes, logic))

    def cpu(server: str, attribute: str) -> float:
        return float(statistics.median(getattr(r, attribute) for r in runs
                                       if r.server == server))
    return "\n".join([
        "## bench/ingest",
        "",
        "Callbacks per second through the receiver's full callback path (token check, "
        "mjproxy dialect, one Redis transition script per callback), as `receiver serve` "
        "runs it with its access log off and on, against a bare Starlette endpoint that only "
        "reads the body (`bench/bare.py`) on uvicorn, and against that endpoint with the one "
        "Redis round trip any durable answer needs (the floor: it hands the body to Redis "
        "through our auto-pipelined connection before it answers), and against the floor "
        "making the Redis calls of one stored transition without its logic (the writes). "
        "The five take the same "
        "wrk load in every round, the order rotating; each ratio is taken within a round, "
        "and the median of the rounds counts. `make bench` (`.venv/bin/python -m "
        "bench.ingest`) regenerates this section.",
        "",
        f"- command: `.venv/bin/python -m bench.ingest --duration {args.duration:g} "
        f"--connections {args.connections} --rounds {args.rounds} --warmup {args.warmup:g}"
        f"{f' --jobs {args.jobs}' if args.jobs else ''}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {machine()}",
        f"- software: {versions()}",
        "- servers: `receiver serve --no-worker [--no-access-log]` (its own HTTP protocol; "
        "the access log to a file), env REDIS_URL = a throwaway local redis-server without "
        "persistence; bare: `python -m uvicorn "
        f"{BARE_APP} --factory {' '.join(UVICORN_FLAGS)}`; the floor and the writes: the "
        f"same with `{FLOOR_APP}`, `{WRITES_APP}`",
        f"- load: `wrk -t1 -c{args.connections} -d{args.duration:g}s --latency "
        f"-s bench/results/ingest/callbacks.lua http://127.0.0.1:P/ -- <requests>`, each "
        f"server warmed up for {args.warmup:g}s first",
        f"- workload: {jobs_per_run:,} freshly minted mjproxy jobs per run x "
        f"{CALLBACKS_PER_JOB} callbacks (IN_PROGRESS {PROGRESS_STEPS[0]}%..{PROGRESS_STEPS[-1]}% "
        f"in {len(PROGRESS_STEPS)} steps, then SUCCESS with 9 buttons), {window} jobs "
        "interleaved at a time; the bare server gets the same paths and bodies",
        "",
        *rows,
        "",
        f"- **access log off / bare: median {m_off:.1%}** (goal >= 50%: "
        f"{'met' if m_off >= 0.5 else 'NOT met'}); every round: {every(off)}",
        f"- **access log on / bare: median {m_on:.1%}** (goal >= 45%: "
        f"{'met' if m_on >= 0.45 else 'NOT met'}); every round: {every(on)}",
        f"- **access log on / off: median {m_log:.1%}** (goal >= 90%: "
        f"{'met' if m_log >= 0.9 else 'NOT met'}); every round: {every(log)}",
        f"- **the floor / bare: median {m_floor:.1%}**, the most any callback path that "
        f"stores before it answers reaches here; every round: {every(floor)}",
        f"- **access log off / the floor: median {m_within:.1%}**, what our own work leaves "
        f"of it; every round: {every(within)}",
        f"- **the writes / bare: median {m_writes:.1%}**: the floor making a stored "
        f"transition's Redis calls (two XADDs, the task's read and write, the event id's, "
        f"PUBLISH) with none of its logic; every round: {every(writes)}",
        f"- **access log off / the writes: median {m_logic:.1%}**, what the rest of our "
        f"work (token, dialect, the script's logic, quotas, indexes) leaves of it; every "
        f"round: {every(logic)}",
        f"- CPU per request (medians; user + system from /proc, over each run): receiver "
        f"{cpu('ours', 'server_us'):.0f} us in its process + {cpu('ours', 'redis_us'):.0f} us "
        f"in redis-server; the floor {cpu('floor', 'server_us'):.0f} us + "
        f"{cpu('floor', 'redis_us'):.0f} us; the writes {cpu('writes', 'server_us'):.0f} us + "
        f"{cpu('writes', 'redis_us'):.0f} us; bare {cpu('bare', 'server_us'):.0f} us: "
        "bare over ours "
        f"**{cpu('bare', 'server_us') / (cpu('ours', 'server_us') + cpu('ours', 'redis_us')):.1%}"
        "**, what the rate ratio tends to where CPU is the limit. Unlike the rates, this does "
        "not move with a host that lends its cores unevenly: when the rounds' ratios spread "
        "widely, read this line.",
        "",
        "Stored transitions are counted in Redis afterwards (each job's history, less its "
        "created event); \"not stored\" = requests answered as duplicate or stale (the up to "
        f"{args.connections} requests in flight when wrk stops may be stored uncounted). "
        "All servers are single processes on the same 2 cores as wrk and redis-server.",
        *(["", "Warning: some answers were errors (non-2xx or socket errors); see "
           "bench/results/ingest/."] if any(r.wrk.errors for r in runs) else []),
        *(["", "Warning: the request list wrapped around in a run, so its second pass was "
           "duplicates; raise --jobs."] if wrapped else []),
        "",
    ])


def report_against(runs: Sequence[Run], args: argparse.Namespace, jobs_per_run: int) -> str:
    """Our path now against ``--against``: every run, and the ratio of the medians."""
    rates = {side: [r.wrk.rate for r in runs if r.server == side] for side in ("ours", "before")}
    now, before = statistics.median(rates["ours"]), statistics.median(rates["before"])
    cpu = {side: (statistics.median([r.server_us for r in runs if r.server == side]),
                  statistics.median([r.redis_us for r in runs if r.server == side]))
           for side in ("ours", "before")}
    rows = ["| run | side | req/s | p50 | p99 | errors | server CPU / req | redis CPU / req |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, run in enumerate(runs, 1):
        rows.append(f"| {n} | {'now' if run.server == 'ours' else args.against} | "
                    f"{run.wrk.rate:,.0f} | {run.wrk.p50_ms:.2f} ms | {run.wrk.p99_ms:.2f} ms | "
                    f"{run.wrk.errors} | {run.server_us:.0f} us | {run.redis_us:.0f} us |")
    return "\n".join([
        "## bench/ingest: before and after",
        "",
        f"Our callback path now against `{args.against}`, each a `receiver serve --no-worker` "
        "process (its own HTTP protocol) on the same Redis, the same wrk load, each side on "
        "freshly minted jobs of its own, the order "
        "alternating every round.",
        "",
        f"- command: `.venv/bin/python -m bench.ingest --against {args.against} "
        f"--duration {args.duration:g} --connections {args.connections} --rounds "
        f"{args.rounds}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; machine: {machine()}",
        f"- workload: {jobs_per_run:,} jobs per run x {CALLBACKS_PER_JOB} callbacks",
        "",
        *rows,
        "",
        f"**median now / before = {now / before:.1%}** ({now:,.0f} vs {before:,.0f} req/s; "
        f"now: {', '.join(f'{x:,.0f}' for x in rates['ours'])}; before: "
        f"{', '.join(f'{x:,.0f}' for x in rates['before'])}).",
        f"CPU per request (medians): now {cpu['ours'][0]:.0f} us in its process + "
        f"{cpu['ours'][1]:.0f} us in redis-server; before {cpu['before'][0]:.0f} + "
        f"{cpu['before'][1]:.0f} us (the two sides share one redis-server, whose CPU is "
        "counted during each side's runs).",
        "",
    ])


def publish(lines: list[str], heading: str, write: bool) -> None:
    """Print a bench's section (``lines``, starting with ``heading``) and, if ``write``, put
    it in BENCHMARKS.md in place of the section of that heading."""
    section = "\n".join(lines)
    print(section)
    if write:
        write_markdown(section, ROOT / "BENCHMARKS.md", heading)


def write_markdown(section: str, path: Path, heading: str = "## bench/ingest") -> None:
    """Replace the ``heading`` section of ``path`` (or add it at the end), keep the rest."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = re.search(r"^## ", text[start + 3:], re.MULTILINE)
        end = start + 3 + following.start() if following else len(text)
        text = text[:start] + section + ("\n" + text[end:] if following else "")
    path.write_text(text)


# --- main ----------------------------------------------------------------------------------


def measure(args: argparse.Namespace, bases: dict[str, str], client: redis.Redis,
            tmp: Path, script: Path, out_dir: Path, redis_pid: int = 0
            ) -> tuple[list[Run], int, int]:
    """Warm up both servers, then alternate measured runs; (runs, jobs per run, window)."""
    window = max(256, 4 * args.connections)
    next_id = int(time.time() * 1e6)  # provider task ids: distinct numeric strings

    def prepare(count: int, name: str) -> tuple[list[tuple[str, str]], Path, int]:
        nonlocal next_id
        print(f"minting {count:,} callback URLs for {name}", flush=True)
        jobs = uvloop.run(mint(bases["ours"], count))
        requests = interleave(jobs, next_id, min(window, count))
        next_id += count
        return jobs, write_requests(tmp / f"{name}.txt", requests), len(requests)

    _, warm_file, _ = prepare(max(1000, window), "warm-up")
    warm: dict[str, WrkResult] = {}
    for server in bases:
        print(f"warm-up {server} {args.warmup:g}s", flush=True)
        warm[server] = run_wrk(bases[server], script, warm_file, args.connections, args.warmup)
    # Enough fresh jobs that the measured window is stored transitions, not a second lap.
    jobs_per_run = args.jobs or max(
        500, math.ceil(warm["ours"].rate * args.duration * 1.6 / CALLBACKS_PER_JOB))

    runs: list[Run] = []
    sides = list(bases)
    for k in range(args.rounds):
        turn = k % len(sides)  # every side goes first, middle and last in turn
        order = sides[turn:] + sides[:turn]
        fresh: tuple[list[tuple[str, str]], Path, int] | None = None
        for server in order:
            if server in ("ours", "ours-log", "before") or fresh is None:
                # a side that stores transitions needs fresh jobs
                fresh = prepare(jobs_per_run, f"round {k + 1}, {server}")
            jobs, data, size = fresh
            pid = SERVER_PIDS[bases[server]]
            before = cpu_seconds(pid), cpu_seconds(redis_pid) if redis_pid else 0.0
            result = run_wrk(bases[server], script, data, args.connections, args.duration)
            used = (cpu_seconds(pid) - before[0],
                    (cpu_seconds(redis_pid) - before[1]) if redis_pid else 0.0)
            stored = (stored_transitions(client, jobs)
                      if server in ("ours", "ours-log", "before") else None)
            answered = max(1, result.requests)
            runs.append(Run(server, result, size, stored, k, used[0] / answered * 1e6,
                            used[1] / answered * 1e6))
            (out_dir / f"wrk-{len(runs)}-{server}.txt").write_text(result.output)
            print(f"  {server}: {result.rate:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                  f"p99 {result.p99_ms:.2f} ms, {result.requests:,} requests"
                  + (f", {stored:,} stored" if stored is not None else ""), flush=True)
    return runs, jobs_per_run, min(window, jobs_per_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--jobs", type=int, default=0,
                        help="fresh jobs (x11 callbacks) per measured run; default: enough "
                        "for the warm-up rate over --duration, plus 60%%")
    parser.add_argument("--rounds", type=int, default=6,
                        help="measured runs per server, the order rotating every round; the "
                        "medians of the rounds' ratios count")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per server")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--against", metavar="REF",
                        help="compare with our code at git ref REF instead of the bare app")
    parser.add_argument("--pin", action="store_true",
                        help="pin uvicorn to CPU 0, wrk and redis-server to CPU 1")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.ingest: wrk is not installed (`make bench` installs it)", file=sys.stderr)
        return 2

    out_dir = ROOT / "bench" / "results" / "ingest"  # raw wrk output; git-ignored
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "callbacks.lua"
    script.write_text(WRK_SCRIPT)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        store = RedisServer(data_dir=tmp / "redis", persist=False).start()
        if args.pin:
            PIN.update(server=["taskset", "-c", "0"], load=["taskset", "-c", "1"])
            assert store.process is not None
            os.sched_setaffinity(store.process.pid, {1})
        client = redis.Redis.from_url(store.url)
        try:
            env = {**os.environ, "REDIS_URL": store.url,
                   "RECEIVER_SECRET_KEYS": secrets.token_urlsafe(32),
                   "RECEIVER_API_KEYS": "", "PUBLIC_BASE_URL": "",
                   "REDIS_PREFIX": DEFAULT_PREFIX, **SERVICE_ENV}
            if args.against:  # both as `receiver serve` runs them (its own protocol)
                with worktree(args.against) as before_dir, \
                        receiver_server(env, tmp / "ours.log") as ours, \
                        receiver_server({**env, "PYTHONPATH": str(before_dir)},
                                        tmp / "before.log", cwd=before_dir) as before:
                    runs, jobs_per_run, window = measure(
                        args, {"ours": ours, "before": before}, client, tmp, script, out_dir,
                        redis_pid=store.process.pid if store.process else 0)
            else:  # ours as `receiver serve` runs it, access log off and on; bare on uvicorn
                with receiver_server(env, tmp / "ours.log") as ours, \
                        receiver_server(env, tmp / "ours-log.log", access_log=True) as logged, \
                        uvicorn_server(BARE_APP, env, tmp / "bare.log") as bare, \
                        uvicorn_server(FLOOR_APP, env, tmp / "floor.log") as floor, \
                        uvicorn_server(WRITES_APP, env, tmp / "writes.log") as writes:
                    runs, jobs_per_run, window = measure(
                        args, {"ours": ours, "ours-log": logged, "bare": bare, "floor": floor,
                               "writes": writes},
                        client, tmp,
                        script, out_dir, redis_pid=store.process.pid if store.process else 0)
        finally:
            client.close()
            store.stop()

    if args.against:
        section = report_against(runs, args, jobs_per_run)
        heading = "## bench/ingest: before and after"
    else:
        section, heading = report(runs, args, jobs_per_run, window), "## bench/ingest"
    print()
    print(section)
    if not args.no_write:
        write_markdown(section, ROOT / "BENCHMARKS.md", heading)
        print(f"written to {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
