"""Property: whatever the order and however many duplicates, a task ends in its true final
state, and each distinct step is stored at most once, in rank order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from receiver.cli.redis_server import RedisServer
from tests.conftest import LiveServer, base_settings, forget_claims, history, mint

Step = tuple[str, int]  # (status, progress)


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[httpx.Client]:
    server = LiveServer(base_settings(redis_server.url, mint_rate=0)).start()
    with server.client("key-acme") as c:
        yield c
    server.stop()


@pytest.fixture(scope="module")
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


def payload(provider: str, ptid: int, step: Step, wrap: bool) -> bytes:
    status, pct = step
    image = f"https://cdn.example/{ptid}/{status}-{pct}.png"
    fail = "[Banned prompt] nope" if status == "FAILURE" else None
    doc: dict[str, Any]
    if provider == "mjproxy":
        doc = {"id": str(ptid), "status": status, "failReason": fail, "imageUrl": image,
               "progress": "" if status == "FAILURE" else f"{pct}%", "action": "IMAGINE"}
    elif provider == "ohmygpt":
        doc = {"taskId": ptid, "status": status, "progress": f"{pct}%", "failReason": fail,
               "imageDcUrl": image, "taskType": "FAST"}
        doc = {"statusCode": 200, "data": doc} if wrap else doc
    else:
        doc = {"code": 0, "task_id": ptid, "status": status, "progress": f"{pct}%",
               "image_url": image, "fail_reason": fail, "point": 100}
    return orjson.dumps(doc)


def rank(step: Step) -> int:
    status, pct = step
    return {"SUBMITTED": 100, "IN_PROGRESS": 200 + pct}.get(status, 1000)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[str, list[Step], list[Step]]:
    """(provider, the true sequence, a delivery: every step at least once, shuffled)."""
    provider = draw(st.sampled_from(["mjproxy", "ohmygpt", "aigc2d"]))
    progress = sorted(draw(st.sets(st.integers(0, 99), max_size=6)))
    final = draw(st.sampled_from(["SUCCESS", "SUCCESS", "FAILURE"]))
    truth: list[Step] = [("SUBMITTED", 0)] * draw(st.booleans())
    truth += [("IN_PROGRESS", p) for p in progress] + [(final, 100)]
    extra = draw(st.lists(st.sampled_from(truth), max_size=8))
    delivery = draw(st.permutations(truth + extra))
    return provider, truth, delivery


@given(deliveries(), st.integers(2**53, 2**63), st.booleans())
def test_any_order_with_duplicates_ends_in_the_true_final_state(
    client: httpx.Client, rdb: redis.Redis, case: tuple[str, list[Step], list[Step]],
    ptid: int, wrap: bool,
) -> None:
    provider, truth, delivery = case
    forget_claims(rdb)
    job, url = mint(client, provider)
    for step in delivery:
        answer = client.post(url, content=payload(provider, ptid, step, wrap))
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] in ("stored", "duplicate", "stale")

    stored = [orjson.loads(f[b"data"]) for f in history(rdb, "acme", job)][1:]  # past created
    stored_steps = [(e["status"], e["progress"]) for e in stored]
    # no step twice, each one true, in strictly increasing rank
    ranks = [rank(s) for s in stored_steps]
    assert ranks == sorted(set(ranks))
    assert all(any(rank(t) == rank(s) for t in truth) for s in stored_steps)
    # the end is the true end
    final = truth[-1][0]
    task = client.get(f"/tasks/{job}").json()
    assert task["status"] == final
    assert task["provider_task_id"] == str(ptid)
    if final == "SUCCESS":
        assert task["image_url"] == f"https://cdn.example/{ptid}/SUCCESS-100.png"
        assert task["progress"] == 100
    else:
        assert task["fail_reason"] == "[Banned prompt] nope"
    assert task["version"] == 1 + len(stored)
    assert [e["version"] for e in stored] == list(range(2, 2 + len(stored)))


@given(deliveries())
def test_in_order_with_duplicates_stores_each_distinct_step_once(
    client: httpx.Client, rdb: redis.Redis, case: tuple[str, list[Step], list[Step]],
) -> None:
    provider, truth, delivery = case
    in_order = sorted(delivery, key=rank)  # duplicates stay, next to their original
    forget_claims(rdb)
    job, url = mint(client, provider)
    results = [client.post(url, content=payload(provider, 42, s, False)).json()["result"]
               for s in in_order]
    assert results.count("stored") == len(truth)
    assert results.count("duplicate") == len(in_order) - len(truth)
    stored = [orjson.loads(f[b"data"]) for f in history(rdb, "acme", job)][1:]
    assert [(e["status"], e["progress"] if e["status"] != "FAILURE" else 100)
            for e in stored] == truth
