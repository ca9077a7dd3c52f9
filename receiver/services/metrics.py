"""``GET /metrics``: Prometheus metrics, one registry per app (tests run several in one
process; a process runs one).

The callback path pays for two of them (a counter and a histogram), kept as plain numbers
and rendered when scraped (`_CallbackCollector`): through prometheus-client's own, with its
lock per change, they cost a callback 2.2 us (timeit; 0.3 us so). What Redis or the event hub
already knows (queue depth, slots in use, SSE clients, clients cut off) is read when scraped
instead of being counted twice.

With ``uvicorn --workers N`` each worker process has its own registry; scrape them behind
one port only with prometheus-client's multiprocess mode, or run one worker per pod.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.responses import Response

if TYPE_CHECKING:
    from receiver.events.hub import EventHub

# Transitions take about a millisecond when Redis is near; the tail is what matters.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # receiver_callbacks and receiver_transition_seconds (`_CallbackCollector`)
        self.callbacks: dict[tuple[str, str], int] = {}
        self.transition_buckets = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last: +Inf
        self.transition_sum = 0.0
        r.register(_CallbackCollector(self))
        self.redis_errors = Counter(
            "receiver_redis_errors", "Redis commands that failed, by where", ["where"],
            registry=r)
        self.submissions = Counter(
            "receiver_submissions", "Tasks sent to providers, by provider and result "
            "(accepted, queue_full, busy, auth, requeued, refused, unanswered)",
            ["provider", "result"], registry=r)
        self.polls = Counter(
            "receiver_reconciler_polls", "Provider polls by the reconciler, by provider and "
            "result (stored, unchanged, unknown, error)", ["provider", "result"], registry=r)
        self.inferred_failures = Counter(
            "receiver_inferred_failures", "Tasks failed as timed out by the reconciler",
            ["provider"], registry=r)
        self.images_archived = Counter(
            "receiver_images_archived", "Images archived (fetched and kept; an image kept "
            "already counts too)", registry=r)
        self.images_archived_bytes = Counter(
            "receiver_images_archived_bytes", "Bytes of the images archived", registry=r)
        self.archive_failures = Counter(
            "receiver_archive_failures", "Images the archive could not fetch or keep, by "
            "whether it tries again (retry) or gave up (refused, exhausted)", ["result"],
            registry=r)
        self.images_expired = Counter(
            "receiver_images_expired", "Kept images deleted once no task needed them",
            registry=r)
        self.queue_depth = Gauge(
            "receiver_admission_queue_depth", "Tasks waiting for a slot, per pool (a "
            "provider's accounts)", ["account"], registry=r)
        self.slots_in_use = Gauge(
            "receiver_admission_slots_in_use", "Tasks sent and not yet final, per account",
            ["account"], registry=r)
        self.slots_limit = Gauge(
            "receiver_admission_slots_limit", "The account's limit of unfinished tasks",
            ["account"], registry=r)

    def callback(self, provider: str, outcome: str) -> None:
        key = (provider, outcome)
        self.callbacks[key] = self.callbacks.get(key, 0) + 1

    def transition(self, seconds: float) -> None:
        """One callback's transition took ``seconds``."""
        self.transition_buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.transition_sum += seconds

    def watch_hub(self, hub: EventHub) -> None:
        self.registry.register(_HubCollector(hub))

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _CallbackCollector(Collector):
    """The callback path's two metrics, from the plain numbers `Metrics` keeps (the event
    loop's thread writes them; a scrape reads them on the same loop)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        callbacks = CounterMetricFamily(
            "receiver_callbacks", "Callbacks received, by provider and outcome (stored, "
            "duplicate, stale, or the error code they were refused with)",
            labels=["provider", "outcome"])
        for (provider, outcome), count in list(m.callbacks.items()):
            callbacks.add_metric([provider, outcome], count)
        yield callbacks
        cumulative = list(accumulate(m.transition_buckets))
        yield HistogramMetricFamily(
            "receiver_transition_seconds", "Time to store one callback's transition in Redis",
            buckets=[*((str(le), n) for le, n in zip(
                _LATENCY_BUCKETS, cumulative, strict=False)), ("+Inf", cumulative[-1])],
            sum_value=m.transition_sum)


class _HubCollector(Collector):
    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("receiver_sse_connections", "Open SSE streams",
                                value=self.hub.client_count())
        yield CounterMetricFamily("receiver_sse_dropped", "SSE clients cut off for falling "
                                  "behind", value=self.hub.dropped)
