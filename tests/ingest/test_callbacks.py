"""POST /callbacks/{provider} over real HTTP: every answer of the SPEC's table."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import orjson
import redis

from receiver.core.tokens import CallbackClaims, TokenSigner
from tests.conftest import KEYS, LiveServer, every_value, history, mint, sample


def progress(task_id: str, pct: int) -> bytes:
    doc = json.loads(sample("mjproxy-progress.json"))
    doc.update(id=task_id, progress=f"{pct}%")
    return orjson.dumps(doc)


def stored_events(r: redis.Redis, tenant: str = "acme") -> int:
    return int(r.xlen(KEYS.stream(tenant)))


def test_sample_callbacks_are_stored(acme: httpx.Client, r: redis.Redis) -> None:
    cases = [
        ("mjproxy", "mjproxy-progress.json", "IN_PROGRESS"),
        ("mjproxy", "mjproxy-success.json", "SUCCESS"),
        ("mjproxy", "mjproxy-failure.json", "FAILURE"),
        ("ohmygpt", "ohmygpt-query-success.json", "SUCCESS"),
        ("aigc2d", "aigc2d-success.json", "SUCCESS"),
    ]
    for provider, name, status in cases:
        job, url = mint(acme, provider)
        # (the mjproxy samples share one provider task id, which belongs to one task)
        body = sample(name, f"t-{job}") if provider == "mjproxy" else sample(name)
        answer = acme.post(url, content=body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"result": "stored", "job_id": job, "version": 2}
        task = acme.get(f"/tasks/{job}").json()
        assert task["status"] == status
        assert task["provider"] == provider
        assert task["version"] == 2
        # the raw body is kept whole in the stored transition, but for the callback token
        # the provider echoes (the samples have it as "token=REDACTED")
        assert history(r, "acme", job)[-1][b"raw"] == body.replace(
            b"token=REDACTED", b"token=[redacted]")
    aigc2d = acme.get("/tasks", params={"limit": 1}).json()["tasks"][0]
    assert aigc2d["provider_task_id"] == "442275063214085100"  # a string, exact


def test_duplicate_and_stale_are_acknowledged_and_change_nothing(
    acme: httpx.Client, r: redis.Redis
) -> None:
    job, url = mint(acme)
    assert acme.post(url, content=progress("77", 40)).json()["result"] == "stored"
    assert acme.post(url, content=progress("77", 40)).json() == {
        "result": "duplicate", "job_id": job, "version": 2,
    }
    assert acme.post(url, content=progress("77", 60)).json()["version"] == 3
    stale = acme.post(url, content=progress("77", 50))
    assert stale.status_code == 200 and stale.json()["result"] == "stale"
    task = acme.get(f"/tasks/{job}").json()
    assert (task["progress"], task["version"]) == (60, 3)
    assert len(history(r, "acme", job)) == 3  # created, 40%, 60%


def test_no_token_is_401(server: LiveServer, r: redis.Redis) -> None:
    with server.client() as client:
        answer = client.post("/callbacks/mjproxy", content=sample("mjproxy-success.json"))
    assert answer.status_code == 401
    assert answer.json()["error"] == "missing_token"
    assert r.dbsize() == 0


def test_bad_token_is_401(server: LiveServer, r: redis.Redis) -> None:
    with server.client() as client:
        answer = client.post(
            "/callbacks/mjproxy", params={"token": "abc.def.ghi"},
            content=sample("mjproxy-success.json"),
        )
    assert answer.status_code == 401
    assert set(answer.json()) == {"error", "detail"}
    assert r.dbsize() == 0


def test_token_signed_with_an_unknown_key_is_401(acme: httpx.Client, r: redis.Redis) -> None:
    job, _ = mint(acme)
    forged = TokenSigner(["attacker-key"], 3600).mint_callback(
        CallbackClaims(job, "acme", "mjproxy")
    )
    before = stored_events(r)
    answer = acme.post("/callbacks/mjproxy", params={"token": forged},
                       content=sample("mjproxy-success.json"))
    assert answer.status_code == 401
    assert stored_events(r) == before
    assert acme.get(f"/tasks/{job}").json()["status"] == "NOT_START"


def test_expired_token_is_401_and_stores_nothing(make_server, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    server = make_server(callback_token_ttl=-1)  # every token is born expired
    with server.client("key-acme") as acme:
        job, url = mint(acme)
        answer = acme.post(url, content=sample("mjproxy-success.json"))
        assert answer.status_code == 401
        assert answer.json()["error"] == "expired_token"
        assert acme.get(f"/tasks/{job}").json()["version"] == 1


def test_tampered_token_is_401(acme: httpx.Client, r: redis.Redis) -> None:
    _job, url = mint(acme)
    tampered = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    before = stored_events(r)
    assert acme.post(tampered, content=sample("mjproxy-success.json")).status_code == 401
    assert stored_events(r) == before


def test_token_for_another_provider_is_403(acme: httpx.Client, r: redis.Redis) -> None:
    _job, url = mint(acme, "mjproxy")
    before = stored_events(r)
    answer = acme.post(url.replace("/callbacks/mjproxy", "/callbacks/aigc2d"),
                       content=sample("aigc2d-success.json"))
    assert answer.status_code == 403
    assert answer.json()["error"] == "wrong_provider"
    assert stored_events(r) == before


def test_token_for_job_a_never_writes_job_b(acme: httpx.Client, r: redis.Redis) -> None:
    job_a, url_a = mint(acme)
    job_b, url_b = mint(acme)
    assert acme.post(url_a, content=progress("A-1", 10)).status_code == 200
    assert acme.post(url_b, content=progress("B-1", 10)).status_code == 200
    before = stored_events(r)
    # job A's URL, job B's provider task: refused, nothing stored anywhere
    answer = acme.post(url_a, content=progress("B-1", 90))
    assert answer.status_code == 403
    assert answer.json()["error"] == "wrong_job"
    assert stored_events(r) == before
    assert acme.get(f"/tasks/{job_b}").json()["progress"] == 10
    assert acme.get(f"/tasks/{job_a}").json()["provider_task_id"] == "A-1"


def test_body_not_of_the_dialect_is_400(acme: httpx.Client, r: redis.Redis) -> None:
    _job, url = mint(acme, "aigc2d")
    before = stored_events(r)
    for body in (b"{", b"[]", b'{"task_id": 1}', sample("mjproxy-success.json")):
        answer = acme.post(url, content=body)
        assert answer.status_code == 400, body
        assert answer.json()["error"] == "invalid_payload"
    assert stored_events(r) == before


def test_body_over_the_limit_is_413(make_server, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    server = make_server(max_body_bytes=1024)
    with server.client("key-acme") as acme:
        job, url = mint(acme)
        big = progress("1", 10)[:-1] + b',"pad":"' + b"x" * 2000 + b'"}'
        assert acme.post(url, content=big).status_code == 413
        # without a Content-Length (chunked), the limit still holds
        answer = acme.post(url, content=iter([big[:600], big[600:]]))
        assert answer.status_code == 413
        assert answer.json()["error"] == "payload_too_large"
        assert acme.get(f"/tasks/{job}").json()["version"] == 1


def test_unknown_provider_is_404(acme: httpx.Client) -> None:
    _job, url = mint(acme)
    answer = acme.post(url.replace("/callbacks/mjproxy", "/callbacks/midjourney"),
                       content=b"{}")
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_provider"


def test_rotation_keeps_old_tokens_valid(make_server, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    from starlette.datastructures import Secret

    old = make_server(secret_keys=(Secret("old"),))
    with old.client("key-acme") as acme:
        _job, url = mint(acme)
    new = make_server(secret_keys=(Secret("old"), Secret("new")))
    with new.client("key-acme") as acme:
        moved = url.replace(old.url, new.url)
        assert acme.post(moved, content=progress("9", 30)).json()["result"] == "stored"
        _new_job, new_url = mint(acme)
    retired = make_server(secret_keys=(Secret("new"),))
    with retired.client("key-acme") as acme:
        assert acme.post(url.replace(old.url, retired.url),
                         content=progress("9", 60)).status_code == 401
        assert acme.post(new_url.replace(new.url, retired.url),
                         content=progress("10", 60)).json()["result"] == "stored"


def test_callback_for_a_job_whose_record_is_gone_recreates_it(
    acme: httpx.Client, r: redis.Redis
) -> None:
    job, url = mint(acme)
    r.delete(KEYS.task("acme", job))  # e.g. expired, or Redis lost it
    assert acme.post(url, content=sample("mjproxy-success.json")).status_code == 200
    task = acme.get(f"/tasks/{job}").json()
    assert (task["status"], task["tenant"], task["provider"]) == ("SUCCESS", "acme", "mjproxy")


def test_no_callback_token_is_stored_when_the_provider_echoes_it(
        acme: httpx.Client, r: redis.Redis) -> None:
    """midjourney-proxy echoes the callback URL in properties.notifyHook, OhMyGPT in
    webhookUrl (and a .NET relay may escape its '=')."""
    tokens = []
    for provider, name in [("mjproxy", "mjproxy-success.json"),
                           ("ohmygpt", "ohmygpt-query-success.json")]:
        job, url = mint(acme, provider)
        token = url.partition("token=")[2]
        tokens.append(token.encode())
        doc = json.loads(sample(name))
        if provider == "mjproxy":
            doc["properties"]["notifyHook"] = url
            body = orjson.dumps(doc)
        else:
            doc["data"]["webhookUrl"] = url
            body = orjson.dumps(doc).replace(b"token=", b"token\\u003d")
        assert token.encode() in body
        assert acme.post(url, content=body).status_code == 200
        stored = history(r, "acme", job)[-1][b"raw"]
        assert b"token=[redacted]" in stored  # the rest of the raw body kept as it came
    blob = every_value(r)
    assert b"[redacted]" in blob
    assert not any(token in blob for token in tokens)


def test_compressed_bodies_are_inflated_within_the_limit(acme: httpx.Client) -> None:
    body = sample("mjproxy-progress.json")
    job, url = mint(acme)
    gz = acme.post(url, content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert gz.status_code == 200 and gz.json()["result"] == "stored", gz.text
    deflated = zlib.compress(body.replace(b"IN_PROGRESS", b"SUCCESS"))
    ok = acme.post(url, content=deflated, headers={"Content-Encoding": "deflate"})
    assert ok.json()["result"] == "stored"
    assert acme.get(f"/tasks/{job}").json()["status"] == "SUCCESS"

    _, other = mint(acme)
    bomb = gzip.compress(b'{"id":"x","status":"IN_PROGRESS","x":"' + b" " * 5_000_000 + b'"}')
    assert len(bomb) < 10_000
    refused = acme.post(other, content=bomb, headers={"Content-Encoding": "gzip"})
    assert refused.status_code == 413 and "inflates" in refused.json()["detail"]
    brotli = acme.post(other, content=body, headers={"Content-Encoding": "br"})
    assert brotli.status_code == 415 and brotli.json()["error"] == "unsupported_encoding"
    broken = acme.post(other, content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400
    minted = acme.post("/callback-urls", content=gzip.compress(b'{"provider": "mjproxy"}'),
                       headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert minted.status_code == 201, minted.text
