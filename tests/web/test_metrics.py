"""``GET /metrics`` after real traffic: every figure it shows was caused by a request here."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, faults, mint, sample, submit, wait_final


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def test_metrics_count_callbacks_submissions_polls_and_slots(stack: Stack) -> None:
    receiver, simulator = stack(limit=2)
    with receiver.client("key-acme") as acme:
        _, url = mint(acme, "mjproxy")
        assert acme.post(url, content=sample("mjproxy-success.json")).status_code == 200
        assert acme.post(url, content=sample("mjproxy-success.json")).status_code == 200
        assert acme.post(url + "x", content=b"{}").status_code == 401
        assert acme.post("/callbacks/nope?token=x", content=b"{}").status_code == 404
        faults(simulator, drop_callbacks=1.0)  # finished by the reconciler's polls
        task = wait_final(acme, submit(acme, provider="aigc2d", prompt="fox")["id"])
        assert task["status"] == "SUCCESS"
        with httpx.Client(base_url=receiver.url) as anyone:  # operators' route: no key
            seen = scrape(anyone)

    def value(name: str, **labels: str) -> float:
        return seen.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("receiver_callbacks_total", provider="mjproxy", outcome="stored") == 1
    assert value("receiver_callbacks_total", provider="mjproxy", outcome="duplicate") == 1
    assert value("receiver_callbacks_total", provider="mjproxy", outcome="invalid_token") == 1
    assert value("receiver_callbacks_total", provider="unknown",
                 outcome="unknown_provider") == 1
    assert value("receiver_transition_seconds_count") == 2
    # the buckets count up to every transition, and the sum is of real durations
    buckets = sorted((float(dict(labels)["le"]), n) for (name, labels), n in seen.items()
                     if name == "receiver_transition_seconds_bucket")
    assert len(buckets) == 13 and buckets[-1] == (float("inf"), 2)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)
    assert 0 < value("receiver_transition_seconds_sum") < 10
    assert value("receiver_submissions_total", provider="aigc2d", result="accepted") == 1
    assert value("receiver_reconciler_polls_total", provider="aigc2d", result="stored") >= 1
    assert value("receiver_admission_slots_limit", account="aigc2d") == 2
    assert value("receiver_admission_queue_depth", account="aigc2d") == 0
    assert value("receiver_sse_connections") == 0
    assert ("receiver_sse_dropped_total", ()) in seen
