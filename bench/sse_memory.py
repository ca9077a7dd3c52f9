"""Where an idle SSE connection's memory goes, in one uvicorn worker: tracemalloc and a census.

``bench.sse`` measures memory per connection from the outside (VmRSS). This looks inside:
the server runs in a child process (the same uvicorn options as the benchmark) and, on
SIGUSR1, times one full garbage collection, counts the objects the collector tracks by type
(count and ``sys.getsizeof``) and, with tracemalloc on (the default), takes a snapshot. The
parent opens N idle ``GET /events`` connections between two such dumps and prints what grew
per connection: by type, and by allocating line, package and call chain.

    .venv/bin/python -m bench.sse_memory [--app ours|naive] [--connections 2000]
                                         [--no-trace]

tracemalloc makes the process bigger and its collections slower, so take RSS and GC pauses
from a ``--no-trace`` run, and the split of Python's allocations from a traced one
(allocations outside Python's allocator, e.g. libuv's, are not traced).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pickle
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NamedTuple

import uvloop

from bench.ingest import HOST, ROOT, child_server
from bench.sse_clients import (
    APPS,
    NOFILE,
    PROTOCOL,
    Server,
    SseClient,
    connect,
    disconnect,
    raise_nofile,
)
from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.constants import DEFAULT_PREFIX

FRAMES = 40  # deep enough to reach the frame that owns an allocation
_DUMP_ENV = "BENCH_SSE_MEMORY_DUMP"  # the child's dump file prefix


class Dump(NamedTuple):
    snapshot: tracemalloc.Snapshot | None  # None without --trace
    census: dict[str, tuple[int, int]]
    tasks: int  # asyncio tasks
    gc_ms: float  # one full collection (generation 2) that found no garbage
    automatic_full_ms: list[float]  # every full collection the process ran by itself so far


# --- the child: uvicorn under tracemalloc ------------------------------------------------


def census() -> dict[str, tuple[int, int]]:
    """{type: (count, bytes by sys.getsizeof)} over the objects the GC tracks."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return {name: (counts[name], sizes[name]) for name in counts}


def serve(app: str, port: int, trace: bool, http: str) -> None:
    from bench.server import run

    if trace:
        tracemalloc.start(FRAMES)
    prefix = os.environ[_DUMP_ENV]
    dumps = 0
    dumping = False
    full: list[float] = []
    began = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        elif info["generation"] == 2 and not dumping:
            full.append((time.perf_counter() - began) * 1e3)

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal dumps, dumping
        dumping = True
        gc.collect()  # the garbage first, then time a collection that finds none
        started = time.perf_counter()
        gc.collect()
        pause_ms = (time.perf_counter() - started) * 1e3
        dumping = False
        snapshot = tracemalloc.take_snapshot() if trace else None
        path = Path(f"{prefix}.{dumps}")
        with path.with_suffix(".tmp").open("wb") as f:
            pickle.dump(Dump(snapshot, census(), len(asyncio.all_tasks()), pause_ms,
                             list(full)), f)
        path.with_suffix(".tmp").rename(path)
        dumps += 1

    gc.callbacks.append(on_gc)

    signal.signal(signal.SIGUSR1, dump)
    run(app, port, http)


# --- the parent ----------------------------------------------------------------------------


@contextmanager
def traced_server(app: str, http: str, env: dict[str, str], dump_prefix: Path,
                  log_path: Path, trace: bool
                  ) -> Iterator[tuple[Server, subprocess.Popen[bytes]]]:
    port = free_port()
    command = [sys.executable, "-m", "bench.sse_memory", "--serve", app, "--port", str(port),
               "--http", http, *([] if trace else ["--no-trace"])]
    with child_server(command, port, {**env, _DUMP_ENV: str(dump_prefix)}, log_path,
                      start_timeout=60) as proc:
        yield Server(app, port, proc.pid), proc




async def take_dump(proc: subprocess.Popen[bytes], path: Path, timeout: float = 120) -> Dump:
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the server wrote no dump")
        await asyncio.sleep(0.1)
    with path.open("rb") as f:
        dump: Dump = pickle.load(f)
    return dump


def package(filename: str) -> str:
    """The package a source file belongs to, for grouping."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "receiver" in parts or "bench" in parts:
        return next(p for p in ("receiver", "bench") if p in parts)
    return "stdlib: " + Path(filename).stem


def owner(trace: tracemalloc.Traceback) -> str:
    """The innermost frame outside the standard library's asyncio and the interpreter's
    plumbing: the code that asked for the allocation."""
    for frame in reversed(trace):  # a Traceback runs from the oldest call to the newest
        if "site-packages" in frame.filename or "/receiver/" in frame.filename:
            return f"{package(frame.filename)}: {Path(frame.filename).name}:{frame.lineno}"
    frame = trace[-1]
    return f"{package(frame.filename)}: {Path(frame.filename).name}:{frame.lineno}"


def analyse(before: Dump, after: Dump, held: int, rss_delta_kib: int) -> str:
    census0, census1 = before.census, after.census
    objects0, objects1 = sum(c for c, _ in census0.values()), sum(c for c, _ in census1.values())
    lines = [
        f"{held:,} connections; RSS +{rss_delta_kib / held:.2f} KiB each"
        + (" (tracemalloc on)" if after.snapshot else "")
        + f"; asyncio tasks {before.tasks} -> {after.tasks} "
        f"({(after.tasks - before.tasks) / held:.2f} per connection)",
        f"objects the GC tracks: {objects0:,} -> {objects1:,} "
        f"({(objects1 - objects0) / held:.1f} per connection); a full collection took "
        f"{before.gc_ms:.1f} ms before, {after.gc_ms:.1f} ms with the connections open", ""]
    lines += ["objects the GC tracks, per connection (count, getsizeof bytes):"]
    grown = sorted(((name, c1 - census0.get(name, (0, 0))[0], s1 - census0.get(name, (0, 0))[1])
                    for name, (c1, s1) in census1.items()), key=lambda t: -t[2])
    lines += [f"  {count / held:7.2f}  {size / held:8.0f}  {name}"
              for name, count, size in grown[:30] if count > 0]
    if before.snapshot is None or after.snapshot is None:
        return "\n".join(lines)
    diff = after.snapshot.compare_to(before.snapshot, "traceback")
    traced = sum(d.size_diff for d in diff)
    lines += ["", f"traced by tracemalloc: +{traced / held / 1024:.2f} KiB per connection", ""]

    by_package: Counter[str] = Counter()
    by_owner: Counter[str] = Counter()
    for stat in diff:
        by_package[package(stat.traceback[-1].filename)] += stat.size_diff
        by_owner[owner(stat.traceback)] += stat.size_diff
    lines.append("traced bytes per connection, by the package of the allocating line:")
    lines += [f"  {size / held:9.0f}  {name}" for name, size in by_package.most_common(15)]
    lines += ["", "by the innermost frame in a third-party package or receiver/:"]
    lines += [f"  {size / held:9.0f}  {name}" for name, size in by_owner.most_common(30)]
    lines += ["", "the biggest allocation sites, with the calls that led there (newest first):"]
    for stat in sorted(diff, key=lambda d: -d.size_diff)[:15]:
        chain = [f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback)
                 if "site-packages" in f.filename or "/receiver/" in f.filename][:7]
        lines.append(f"  {stat.size_diff / held:9.0f}  {stat.count_diff / held:5.2f} blocks  "
                     + " < ".join(chain))
    return "\n".join(lines)


def full_collections(before: Dump, after: Dump) -> str:
    new = after.automatic_full_ms[len(before.automatic_full_ms):]
    return (f"{len(new)} automatic full collections, longest {max(new, default=0):.0f} ms, "
            f"{sum(new):.0f} ms in all")


async def heartbeat(server: Server, stop: asyncio.Event) -> list[float]:
    """``GET /healthz`` every 10 ms until ``stop``: each answer's time in ms (a stalled
    worker shows as a long one; the naive app answers 404, as fast)."""
    reader, writer = await asyncio.open_connection(HOST, server.port)
    times: list[float] = []
    try:
        while not stop.is_set():
            began = time.perf_counter()
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            await reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
            times.append((time.perf_counter() - began) * 1e3)
            await asyncio.sleep(0.01)
    finally:
        writer.close()
    return times


async def churn(server: Server, clients: list[SseClient], count: int, batch: int = 500) -> None:
    """Replace ``count`` of the open connections by new ones, ``batch`` at a time."""
    for _ in range(max(1, count // batch)):
        old, clients[:batch] = clients[:batch], []
        await disconnect(old)
        new, _ = await connect(server, "/events", batch, keep=False, ready="headers")
        clients.extend(new)


async def measure(server: Server, proc: subprocess.Popen[bytes], prefix: Path,
                  count: int, replace: int) -> str:
    await asyncio.sleep(1.0)
    # a few connections first, so that what the first one starts (watchers, lazy
    # imports, caches) is not counted
    warm, _ = await connect(server, "/events", 20, ready="headers")
    await asyncio.sleep(1.0)
    await disconnect(warm)
    await asyncio.sleep(2.0)
    before = await take_dump(proc, Path(f"{prefix}.0"))
    rss0 = server.rss_kib()
    clients, failures = await connect(server, "/events", count, keep=False, ready="headers")
    await asyncio.sleep(5.0)
    held = sum(1 for c in clients if not c.closed.done())
    rss1 = server.rss_kib()
    after = await take_dump(proc, Path(f"{prefix}.1"))
    text = analyse(before, after, held, rss1 - rss0) + (
        f"\n({failures} connections failed)" if failures else "")
    text += f"\n\nwhile opening the {count:,} connections: {full_collections(before, after)}"
    if replace:  # clients reconnect: what the worker does with the rest held open
        stop = asyncio.Event()
        beats = asyncio.create_task(heartbeat(server, stop))
        began = time.perf_counter()
        await churn(server, clients, replace)
        seconds = time.perf_counter() - began
        stop.set()
        times = await beats
        churned = await take_dump(proc, Path(f"{prefix}.2"))
        times.sort()
        text += (f"\nreplacing {replace:,} of them, 500 at a time ({seconds:.1f} s): "
                 f"{full_collections(after, churned)}; GET /healthz every 10 ms meanwhile: "
                 f"p50 {times[len(times) // 2]:.1f} ms, max {times[-1]:.0f} ms")
    await disconnect(clients)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.sse_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=sorted(APPS), default="ours")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--churn", type=int, default=0,
                        help="then replace this many of the connections, 500 at a time, "
                        "and report the worker's full collections and stalls meanwhile")
    parser.add_argument("--no-trace", dest="trace", action="store_false",
                        help="no tracemalloc: RSS, census and GC pause only, undistorted")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--http", default="httptools", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.trace, args.http)
        return 0
    raise_nofile(NOFILE)
    out_dir = ROOT / "bench" / "results" / "sse"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sse-memory-") as tmp:
        store = RedisServer(data_dir=Path(tmp) / "redis", persist=False).start()
        try:
            env = {**os.environ, "REDIS_URL": store.url, "REDIS_PREFIX": DEFAULT_PREFIX,
                   "RECEIVER_SECRET_KEYS": secrets.token_urlsafe(32), "RECEIVER_API_KEYS": "",
                   "SSE_MAX_PER_TENANT": "0"}
            prefix = Path(tmp) / "dump"
            with traced_server(APPS[args.app], PROTOCOL.get(args.app, "httptools"), env,
                               prefix, out_dir / f"memory-{args.app}.log",
                               args.trace) as (server, proc):
                text = uvloop.run(asyncio.wait_for(
                    measure(server, proc, prefix, args.connections, args.churn), 600))
        finally:
            store.stop()
    name = f"{args.app}{'' if args.trace else '-no-trace'}"
    text = (f"bench.sse_memory --app {args.app} --connections {args.connections}"
            f"{'' if args.trace else ' --no-trace'} ({APPS[args.app]})\n{text}\n")
    print(text)
    (out_dir / f"memory-{name}.txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
