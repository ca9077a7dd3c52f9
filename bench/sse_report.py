"""What ``bench.sse`` measures and how it reads: each phase's figures per side ((a) latency,
(b) idle connections held, (c) fan-out), the goals, and the Markdown section of
``BENCHMARKS.md``."""

from __future__ import annotations

import argparse
import math
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version

from bench.ingest import HOST, ROOT, UVICORN_FLAGS, machine
from bench.sse_clients import APPS, PRODUCERS, PROTOCOL, Server

LABEL = {"ours": "receiver (`receiver serve`)", "asgi": "receiver, uvicorn's protocol",
         "naive": "naive (pub/sub per client)"}
GOAL_P99_MS = 10.0
GOAL_CONNECTIONS = 10_000
GOAL_KB_PER_CONNECTION = 10.0
GOAL_FANOUT_MS = 100.0
SECTION = "## bench/sse"


# --- measures ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class Latency:
    """(a) for one side."""

    subscribers: int
    shots: int  # callbacks in the measured window (after the warm-up)
    stored: int  # of them answered "stored" (each one event)
    received: int  # (event, subscriber) pairs read
    samples_ms: list[float]
    post_ms: list[float]  # POST answer times, for context
    late: int  # sends more than 2 ms behind their slot
    errors: int  # non-200 answers
    connections: int  # POST connections the generator needed
    cpu: dict[str, float]  # share of one core per process over the run (warm-up included)
    others: float  # share of one core used by every other process on the machine
    steal: float  # share of one core the hypervisor took away
    timeline: list[tuple[float, float]]  # (seconds since the first measured send, latency ms)

    @property
    def expected(self) -> int:
        return self.stored * self.subscribers

    def over(self, limit_ms: float) -> int:
        return sum(1 for value in self.samples_ms if value > limit_ms)


def merge(runs: Sequence[Latency]) -> Latency:
    """Several runs of one side as one: samples pooled, CPU shares averaged."""
    return Latency(
        subscribers=runs[0].subscribers, shots=sum(r.shots for r in runs),
        stored=sum(r.stored for r in runs), received=sum(r.received for r in runs),
        samples_ms=[v for r in runs for v in r.samples_ms],
        post_ms=[v for r in runs for v in r.post_ms], late=sum(r.late for r in runs),
        errors=sum(r.errors for r in runs), connections=max(r.connections for r in runs),
        cpu={k: sum(r.cpu[k] for r in runs) / len(runs) for k in runs[0].cpu},
        others=sum(r.others for r in runs) / len(runs),
        steal=sum(r.steal for r in runs) / len(runs),
        timeline=[t for r in runs for t in r.timeline],
    )


@dataclass
class Holding:
    """(b) for one side."""

    wanted: int
    opened: int  # connections that got their headers (and, ours, the first event)
    held: int  # still open and subscribed when memory was read
    failures: int
    open_seconds: float
    rss_before_kib: int
    rss_after_kib: int
    fds_before: int
    fds_after: int
    redis_before: dict[str, int]
    redis_after: dict[str, int]
    probe: str = ""  # what happened to connections beyond the limit, if one was hit
    closed: str = ""  # the server's descriptors and Redis's clients once they were closed

    @property
    def kib_per_connection(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.held if self.held else math.nan

    def redis_kib_per_connection(self, key: str) -> float:
        delta = self.redis_after[key] - self.redis_before[key]
        return delta / 1024 / self.held if self.held else math.nan


@dataclass
class FanOut:
    """(c) for one side."""

    subscribers: int
    events: int
    last_ms: list[float] = field(default_factory=list)  # per event: the last subscriber
    median_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    missing: int = 0  # (event, subscriber) pairs never read
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per event, by process



# --- report --------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} ms"


def kib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} KiB"


def slow_seconds(lat: Latency, over_ms: float) -> str:
    """Where the slow samples fall in time: ``second: count`` for each second that has any."""
    counts: Counter[int] = Counter(int(at) for at, value in lat.timeline if value > over_ms)
    return ", ".join(f"{second}s: {n:,}" for second, n in sorted(counts.items())) or "none"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


@dataclass
class Results:
    latency_runs: dict[str, list[Latency]] = field(default_factory=dict)
    latency: dict[str, Latency] = field(default_factory=dict)  # the runs merged
    holding: dict[str, Holding] = field(default_factory=dict)
    fan_out: dict[str, FanOut] = field(default_factory=dict)


def table(res: Results, args: argparse.Namespace) -> list[str]:
    sides = args.sides
    rows = ["| measure | " + " | ".join(LABEL[s] for s in sides) + " |",
            "| --- |" + " ---: |" * len(sides)]

    def row(name: str, cell: Callable[[str], str]) -> None:
        rows.append(f"| {name} | " + " | ".join(cell(s) for s in sides) + " |")

    lat = res.latency
    if lat:
        row(f"(a) callback → subscriber p50 ({args.rate:,.0f}/s, {args.subscribers} subs)",
            lambda s: ms(percentile(lat[s].samples_ms, 50)))
        row("(a) p99", lambda s: ms(percentile(lat[s].samples_ms, 99)))
        row("(a) p99.9", lambda s: ms(percentile(lat[s].samples_ms, 99.9)))
        row("(a) max", lambda s: ms(max(lat[s].samples_ms, default=math.nan)))
        row("(a) p99 of each run, in run order",
            lambda s: " / ".join(ms(percentile(r.samples_ms, 99))
                                 for r in res.latency_runs[s]))
        row("(a) samples over 10 ms, each run",
            lambda s: " / ".join(f"{r.over(GOAL_P99_MS):,}" for r in res.latency_runs[s]))
        row("(a) CPU of other processes + hypervisor steal, each run",
            lambda s: " / ".join(f"{r.others:.0%}+{r.steal:.0%}" for r in res.latency_runs[s]))
        row("(a) events read / expected",
            lambda s: f"{lat[s].received:,} / {lat[s].expected:,}")
        row("(a) POST answer p50 / p99 (context)",
            lambda s: f"{percentile(lat[s].post_ms, 50):.2f} / "
                      f"{percentile(lat[s].post_ms, 99):.2f} ms")
        row("(a) CPU, share of one core: SSE server / our ingest / Redis / client",
            lambda s: " / ".join(f"{lat[s].cpu[p]:.0%}" for p in (s, "ours", "redis", "client"))
            if s not in PRODUCERS else
            f"{lat[s].cpu[s]:.0%} (both) / {lat[s].cpu['redis']:.0%} / "
            f"{lat[s].cpu['client']:.0%}")
        row("(a) sends more than 2 ms behind their slot (client stalls)",
            lambda s: f"{lat[s].late:,} of {lat[s].shots:,}")
        row("(a) POST errors", lambda s: f"{lat[s].errors:,}")
    hold = res.holding
    if hold:
        row("(b) idle connections held (wanted)",
            lambda s: f"{hold[s].held:,} ({hold[s].wanted:,})")
        row("(b) server RSS before → after",
            lambda s: f"{hold[s].rss_before_kib / 1024:.1f} → "
                      f"{hold[s].rss_after_kib / 1024:.1f} MiB")
        row("(b) **server memory per connection**",
            lambda s: f"**{kib(hold[s].kib_per_connection)}**")
        row("(b) Redis used_memory per connection",
            lambda s: kib(hold[s].redis_kib_per_connection("used_memory")))
        row("(b) Redis RSS per connection",
            lambda s: kib(hold[s].redis_kib_per_connection("used_memory_rss")))
        row("(b) Redis connected_clients before → after",
            lambda s: f"{hold[s].redis_before['connected_clients']:,} → "
                      f"{hold[s].redis_after['connected_clients']:,}")
        row("(b) server fds before → after",
            lambda s: f"{hold[s].fds_before:,} → {hold[s].fds_after:,}")
        row("(b) time to open them", lambda s: f"{hold[s].open_seconds:.1f} s")
        row("(b) once closed (incl. the ~1 s settling wait)", lambda s: hold[s].closed)
    fan = res.fan_out
    if fan:
        row(f"(c) fan-out to {args.fanout:,}: last subscriber p50",
            lambda s: ms(percentile(fan[s].last_ms, 50)))
        row("(c) last subscriber max", lambda s: ms(max(fan[s].last_ms, default=math.nan)))
        row("(c) median subscriber p50", lambda s: ms(percentile(fan[s].median_ms, 50)))
        row("(c) first subscriber p50", lambda s: ms(percentile(fan[s].first_ms, 50)))
        row("(c) CPU per event: SSE server / our ingest / client",
            lambda s: f"{fan[s].cpu_ms[s]:.1f} / {fan[s].cpu_ms['ours']:.1f} / "
                      f"{fan[s].cpu_ms['client']:.1f} ms" if s not in PRODUCERS else
                      f"{fan[s].cpu_ms[s]:.1f} (both) / {fan[s].cpu_ms['client']:.1f} ms")
        row("(c) events / missed deliveries",
            lambda s: f"{len(fan[s].last_ms)} / {fan[s].missing}")
    return rows


def code_version() -> str:
    """The commit measured, and whether receiver/ had uncommitted changes."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "receiver")
    return f"commit {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        " with uncommitted changes in receiver/" if dirty else "")


def goals(res: Results) -> list[str]:
    out = []
    if "ours" in res.latency:
        p99 = percentile(res.latency["ours"].samples_ms, 99)
        each = [percentile(r.samples_ms, 99) for r in res.latency_runs["ours"]]
        out.append(f"- (a) ours p99 < {GOAL_P99_MS:g} ms: {ms(p99)} over "
                   f"{len(each)} runs, {verdict(p99 < GOAL_P99_MS)} (each run: "
                   + ", ".join(f"{ms(v)} {'met' if v < GOAL_P99_MS else 'not met'}"
                               for v in each) + ")")
    if "ours" in res.holding:
        h = res.holding["ours"]
        per = h.kib_per_connection
        out.append(f"- (b) ours holds {GOAL_CONNECTIONS:,} connections: {h.held:,}, "
                   f"{verdict(h.held >= GOAL_CONNECTIONS)}; under "
                   f"{GOAL_KB_PER_CONNECTION:g} KB each: {per * 1.024:.2f} KB "
                   f"({kib(per)}), {verdict(per * 1.024 < GOAL_KB_PER_CONNECTION)}")
    if "ours" in res.fan_out:
        last = res.fan_out["ours"].last_ms
        worst = max(last, default=math.nan)
        out.append(f"- (c) ours: the last of {res.fan_out['ours'].subscribers:,} subscribers "
                   f"within {GOAL_FANOUT_MS:g} ms: the slowest of {len(last)} events "
                   f"{ms(worst)}, {verdict(worst < GOAL_FANOUT_MS)}")
    if "naive" in res.holding:
        h = res.holding["naive"]
        out.append(f"- (b) naive: {h.held:,} of {h.wanted:,} wanted"
                   + (f" ({h.probe})" if h.probe else ""))
    return out


def report(res: Results, args: argparse.Namespace, argv: Sequence[str],
           servers: dict[str, Server], limits: str, redis_version: str) -> str:
    command = " ".join([".venv/bin/python -m bench.sse", *argv])
    order = ", ".join(",".join(args.sides if n % 2 == 0 else args.sides[::-1])
                      for n in range(args.rounds))
    return "\n".join([
        SECTION,
        "",
        "Live events over SSE, our service (one Redis subscription per process, "
        "`receiver/events.py`; as `receiver serve` runs it, the hub writes each event to "
        "every idle client's connection, `receiver/listener.py`; and the same app under "
        "uvicorn's own protocol, a loop per client) against the pattern a user would write "
        "instead (`bench/naive_sse.py`: sse-starlette, each client its own Redis pub/sub "
        "subscription to `receiver:events:{default}`). Events are real callbacks POSTed to "
        "our service, which publishes each on that channel, so every side delivers the same "
        "events. `.venv/bin/python -m bench.sse` regenerates this section.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; code: {code_version()}",
        f"- machine: {machine()} (shared, noisy)",
        f"- software: uvicorn {version('uvicorn')}, uvloop {version('uvloop')}, httptools "
        f"{version('httptools')}, starlette {version('starlette')}, sse-starlette "
        f"{version('sse-starlette')}, redis-py {version('redis')}, hiredis "
        f"{version('hiredis')}, redis-server {redis_version}",
        f"- servers: `python -m uvicorn <app> --factory --host {HOST} --port P "
        f"{' '.join(UVICORN_FLAGS)}` (one worker), `<app>` = "
        + " or ".join(f"`{a}`" for a in dict.fromkeys(APPS[s] for s in servers)) + "; "
        + "".join(f"{LABEL[s]}: the same through `python -m bench.server` with `--http "
                  f"{PROTOCOL[s]}`, as `receiver serve` runs it; " for s in servers
                  if s in PROTOCOL)
        + "env REDIS_URL = one throwaway redis-server (no persistence, default config, "
        "maxclients 10000), RECEIVER_SECRET_KEYS random, no RECEIVER_API_KEYS (open mode, "
        "SSE_MAX_PER_TENANT=0 (no cap on one tenant's streams), "
        f"tenant `default`); open-files limit {limits}",
        f"- (a): {args.subscribers} subscribers on `GET /events`; a paced open-loop "
        f"generator POSTs {args.rate:,.0f} mjproxy callbacks/s to our service for "
        f"{args.warmup:g}s warm-up + {args.duration:g}s measured (jobs minted by "
        "`POST /callback-urls`, IN_PROGRESS 1..99% then SUCCESS, 256 jobs interleaved); "
        "latency = the subscriber's read of the event (matched by job id and progress) minus "
        "the moment just before its POST was written; one sample per event and subscriber; "
        f"{args.rounds} runs per side in the order {order}, samples pooled",
        f"- (b): {args.connections:,} wanted idle `GET /events` connections (raw sockets: "
        "request, headers; on the hub's sides also the first comment, sent once the client "
        "is registered; for naive, Redis PUBSUB NUMSUB counts them), then 3 s settling; "
        "memory per connection = (VmRSS after - VmRSS before) / connections held",
        f"- (c): {args.fanout:,} subscribers on `GET /events`, {args.events} callbacks one "
        "at a time; per callback the time from its POST to the first, median and last "
        "subscriber's read",
        "- every client is in one Python process (uvloop, raw asyncio protocols, events "
        "time-stamped on read and parsed afterwards), on the same two cores as the servers "
        "and Redis",
        "- the sides run one after the other; in ours ingest and fan-out share one process; "
        "while naive is measured our service only ingests (its hub has no clients), so the "
        "naive app has a core of its own",
        "",
        *table(res, args),
        "",
        "Goals:",
        *goals(res),
        "",
    ])
