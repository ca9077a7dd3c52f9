"""The transition script's cost inside Redis: where a callback's Redis CPU goes.

`bench/ingest` counts about as much CPU in redis-server per callback as the bare endpoint
spends on a whole request. This asks Redis itself (``INFO commandstats``) while real
transitions run: trueai-shaped jobs (ten progress callbacks, then a SUCCESS with nine
buttons, as bench/ingest sends), each applied through `TaskStore.apply` and its batcher, as
the callback route does. It reports the script's microseconds per call, the part its Redis
commands account for, and so the part that is Lua's own work (splitting the stored values,
assembling the snapshot, quotas, ids); then, for scale, scripts that do one of those things
alone on the same values.

    .venv/bin/python -m bench.transition [--jobs 2000] [--no-write]
    .venv/bin/python -m bench.transition --callgrind   # instructions, not time
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

from bench.ingest import CALLBACKS_PER_JOB, callbacks, machine, publish
from receiver.cli.redis_server import RedisServer, free_port
from receiver.core.models import new_job_id
from receiver.core.settings import Settings
from receiver.core.tokens import CallbackClaims
from receiver.providers.dialects import DIALECTS
from receiver.store.batcher import ScriptBatcher
from receiver.store.tasks import TRANSITION, TaskStore

# Lua that does one part of the script's work on the same stored values, for scale.
SPLIT = """
local vals, s, pos = {}, ARGV[1], 1
for k = 1, 21 do
  local e = string.find(s, '\\0', pos, true); vals[k] = string.sub(s, pos, e - 1); pos = e + 1
end
vals[22] = string.sub(s, pos)
"""
ASSEMBLE = """
local parts = {}
for i = 1, 22 do parts[2 * i - 1] = ',"field' .. i .. '":'; parts[2 * i] = vals[i] end
local data = table.concat(parts)
local stored = table.concat(vals, '\\0')
"""
PARTS = {
    "an empty script": "return 1",
    "splitting the stored values": SPLIT + "return 1",
    "splitting, then the snapshot and the values joined again": SPLIT + ASSEMBLE + "return 1",
}


async def transitions(url: str, jobs: int, compact: bool = True) -> None:
    """``jobs`` jobs' callbacks through the store, 64 jobs at a time."""
    client = Redis.from_url(url)
    store = TaskStore(client, ScriptBatcher(url, TRANSITION),
                      Settings(redis_url=url, tenant_stream_maxlen=100))
    if not compact:
        store.history.soon = lambda tenant, job: None  # type: ignore[method-assign,assignment]
    parse = DIALECTS["mjproxy"]

    async def job(n: int) -> None:
        claims = CallbackClaims(new_job_id(), "bench", "mjproxy")
        await store.create(claims, prompt="bench")
        for body in callbacks(str(1_700_000_000_000_000 + n), "bench cat, watercolor"):
            await store.apply(claims, parse(body), claimed=True)

    for start in range(0, jobs, 64):
        await asyncio.gather(*(job(n) for n in range(start, min(jobs, start + 64))))
    await store.close()
    await client.aclose()


def instructions(jobs: int) -> tuple[float, int]:
    """(instructions redis-server ran per EVALSHA, EVALSHAs) for ``jobs`` jobs, counted by
    valgrind's callgrind: unlike time, the count does not move with a noisy host. Without
    compactions (they are EVALs of their own), after a warm-up of 20 jobs."""
    with tempfile.TemporaryDirectory() as tmp:
        port, out = free_port(), Path(tmp) / "callgrind.out"
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server",
             "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            asyncio.run(transitions(url, 20, compact=False))
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                           capture_output=True)
            client.config_resetstat()
            asyncio.run(transitions(url, jobs, compact=False))
            stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
            calls = int(stats["cmdstat_evalsha"]["calls"])
            subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                           capture_output=True)
        finally:
            client.close()
            proc.terminate()
            proc.wait(60)
        counted = max(int(line.split()[1]) for dump in Path(tmp).glob("callgrind.out*")
                      for line in dump.read_text().splitlines()
                      if line.startswith("summary:"))
    return counted / calls, calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.transition", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--callgrind", action="store_true",
                        help="only count redis-server's instructions per transition under "
                        "valgrind (`apt-get install valgrind`); prints, writes nothing")
    args = parser.parse_args(argv)
    if args.callgrind:
        per_call, calls = instructions(300)
        print(f"{per_call:,.0f} instructions in redis-server per transition "
              f"({calls:,} transitions of 300 trueai-shaped jobs, no compaction)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", persist=False).start()
        try:
            client = redis.Redis.from_url(server.url)
            client.config_resetstat()
            asyncio.run(transitions(server.url, args.jobs))
            stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
            # the transitions (EVALSHA) and the compactions (EVAL)
            script = {"usec": stats.pop("cmdstat_evalsha")["usec"]
                      + stats.pop("cmdstat_eval", {"usec": 0})["usec"]}
            inner = sum(s["usec"] for name, s in stats.items()
                        if name not in ("cmdstat_config|resetstat", "cmdstat_script|load",
                                        "cmdstat_info"))
            sample: bytes = client.hget(  # type: ignore[assignment]
                next(client.scan_iter("receiver:task:*")), "v")
            parts = {}
            for name, body in PARTS.items():
                sha: str = client.script_load(body)  # type: ignore[assignment]
                client.config_resetstat()
                pipe = client.pipeline(transaction=False)
                for n in range(5000):
                    pipe.evalsha(sha, 0, sample.decode())
                    if n % 200 == 199:
                        pipe.execute()
                        pipe = client.pipeline(transaction=False)
                pipe.execute()
                after: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
                parts[name] = after["cmdstat_evalsha"]["usec_per_call"]
            client.close()
        finally:
            server.stop()
    # per transition: the creates and callbacks, and (amortized) each final's compaction,
    # whose own small script is an EVALSHA too
    calls = args.jobs * (CALLBACKS_PER_JOB + 1)
    total = script["usec"] / calls
    commands = inner / calls
    lines = [
        "## bench/transition",
        "",
        "The transition script inside Redis (`INFO commandstats`), over "
        f"{args.jobs:,} trueai-shaped jobs x {CALLBACKS_PER_JOB} callbacks plus their "
        "creates, applied through `TaskStore` and its batcher as the callback route applies "
        "them. `.venv/bin/python -m bench.transition` regenerates this section.",
        "",
        f"- machine: {machine()}",
        f"- **{total:.1f} us of scripts per transition** ({calls:,} transitions; each "
        f"finished job's history compaction, a small script of its own, included), of which "
        f"the Redis commands they run account for {commands:.1f} us (XADD x2, HSET, HMGET, "
        f"the quota's HMGET and HSET, PUBLISH...): **{total - commands:.1f} us is Lua's own work**",
        "- for scale, the same stored values in scripts that do one part alone: "
        + "; ".join(f"{name} {us:.1f} us" for name, us in parts.items()),
        "",
    ]
    publish(lines, "## bench/transition", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
