"""Schemathesis against the OpenAPI document: every operation, with an API key and without,
against a real uvicorn and Redis. No 5xx (Redis is up, so not even the documented 503), and
every status code, content type, header and body (each event of an event stream too) is one
the schema documents.

The document is loaded from `receiver.openapi.SCHEMA`, and `test_served_document` checks
that it is what GET /openapi.json serves (Schemathesis's fixture-based loader,
``schemathesis.pytest.from_fixture``, fails on pytest 9: it sets ``Node._nodeid``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.datastructures import Secret

from receiver.cli.redis_server import RedisServer
from receiver.core.settings import PROVIDERS, ProviderAccount
from receiver.providers.dialects import DIALECTS
from receiver.web.openapi import SCHEMA
from tests.conftest import SAMPLES, LiveServer, base_settings, mint

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
KEY = {"Authorization": "Bearer key-acme"}
SSE = {"/events", "/tasks/{job_id}/events"}
# An event stream is read until it ends, or this long: what is stored arrives at once, and
# the streams that stay open (every task of the tenant, an unfinished task) are cut off.
SSE_SECONDS = 0.5
EXAMPLES = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

DOCUMENT = orjson.loads(orjson.dumps(SCHEMA))
# An explicit config: no schemathesis.toml lying around changes what runs.
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config())
# Without a key every operation stops at the door: fewer examples, no coverage phase.
anonymous = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict(
    {"phases": {"coverage": {"enabled": False}}}))


@pytest.fixture(scope="module")
def make(redis_server: RedisServer) -> Iterator[Callable[..., LiveServer]]:
    """Servers with every provider configured (POST /tasks records and queues), none
    reachable and no worker: nothing is sent anywhere."""
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    started: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        accounts = {p: ProviderAccount(p, "http://127.0.0.1:9", Secret(f"sk-{p}"), 3)
                    for p in PROVIDERS}
        server = LiveServer(base_settings(redis_server.url, accounts=accounts,
                                          default_provider="ohmygpt", mint_rate=0,
                                          **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def live(make: Callable[..., LiveServer]) -> LiveServer:
    # Rate limits off: every example reaches the route (their 429s are checked below).
    return make(callback_rate=0, submit_rate=0)


@pytest.fixture(scope="module")
def acme(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client("key-acme") as client:
        yield client


def call(case: Any, live: LiveServer, headers: dict[str, str] | None) -> None:
    timeout = SSE_SECONDS if case.operation.path in SSE else 5
    case.call_and_validate(live.url, headers=headers, checks=CHECKS, timeout=timeout)


def with_key(case: Any, live: LiveServer, acme: httpx.Client) -> None:
    """A callback gets a freshly minted token for its provider, so its body reaches the
    dialect and the store."""
    if case.operation.path == "/callbacks/{provider}":
        provider = (case.path_parameters or {}).get("provider")
        if provider in DIALECTS:
            token = mint(acme, provider)[1].partition("?token=")[2]
            case.query = {**(case.query or {}), "token": token}
    call(case, live, KEY)


@schema.exclude(path=list(SSE)).parametrize()
@EXAMPLES
def test_with_key(case: Any, live: LiveServer, acme: httpx.Client) -> None:
    with_key(case, live, acme)


@schema.include(path=list(SSE)).parametrize()
@settings(EXAMPLES, max_examples=10)
def test_event_streams_with_key(case: Any, live: LiveServer, acme: httpx.Client) -> None:
    """Fewer examples: a stream that stays open costs SSE_SECONDS."""
    with_key(case, live, acme)


@anonymous.parametrize()
@settings(EXAMPLES, max_examples=15)
def test_anonymous(case: Any, live: LiveServer) -> None:
    """No API key; for callbacks, whatever token was generated."""
    call(case, live, None)


def test_served_document(live: LiveServer) -> None:
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    answer = httpx.get(f"{live.url}/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == DOCUMENT


def validate(method: str, path: str, answer: httpx.Response, **path_parameters: str) -> None:
    """Check a response that generated requests do not reach against the schema."""
    case = schema[path][method].Case(path_parameters=path_parameters or None)
    case.validate_response(answer, checks=CHECKS)


def test_event_streams(live: LiveServer, acme: httpx.Client) -> None:
    """The 200 streams (each event's data checked against TaskEvent) and the 204 of an
    ended task."""
    job, url = mint(acme, "mjproxy")
    for body in ({"id": "7", "status": "IN_PROGRESS", "progress": "45%"},
                 {"id": "7", "status": "SUCCESS", "imageUrl": "https://cdn.example/a.png",
                  "buttons": [{"customId": "MJ::JOB::upsample::1::x", "label": "U1"}]}):
        assert acme.post(url, json=body).status_code == 200
    ended = acme.get(f"/tasks/{job}/events")  # from its current state, which is its end
    assert ended.status_code == 200 and "event: task.succeeded" in ended.text
    validate("GET", "/tasks/{job_id}/events", ended, job_id=job)
    last = ended.text.split("id: ")[-1].split()[0]
    done = acme.get(f"/tasks/{job}/events", headers={"Last-Event-ID": last})
    assert done.status_code == 204
    validate("GET", "/tasks/{job_id}/events", done, job_id=job)

    # every event of the tenant, by subscribe token, replayed from the start; then hang up
    token = acme.post("/subscribe-tokens", json={}).json()["token"]
    chunks = b""
    with httpx.stream("GET", f"{live.url}/events",
                      params={"token": token, "last_event_id": "0-0"}) as stream:
        deadline = time.monotonic() + 5
        for chunk in stream.iter_bytes():
            chunks += chunk
            if chunks.count(b"\nevent: ") >= 3 or time.monotonic() > deadline:
                break
        partial = httpx.Response(stream.status_code, headers=stream.headers, content=chunks,
                                 request=stream.request)
        partial.elapsed = datetime.timedelta()
    assert chunks.count(b"\nevent: ") >= 3, chunks
    validate("GET", "/events", partial)


def test_limits(make: Callable[..., LiveServer]) -> None:
    """429 (with Retry-After) and 413 as documented."""
    server = make(callback_rate=0.01, callback_burst=1, submit_rate=0.01, submit_burst=1,
                  max_body_bytes=1024)
    with server.client("key-acme") as acme:
        task = {"provider": "mjproxy", "prompt": "a cat"}
        assert acme.post("/tasks", json=task).status_code == 202
        limited = acme.post("/tasks", json=task)
        assert limited.status_code == 429
        validate("POST", "/tasks", limited)
        _, url = mint(acme, "aigc2d")
        assert acme.post(url, json={"task_id": 1, "status": "SUBMITTED"}).status_code == 200
        limited = acme.post(url, json={"task_id": 1, "status": "IN_PROGRESS"})
        assert limited.status_code == 429
        validate("POST", "/callbacks/{provider}", limited, provider="aigc2d")
        large = acme.post("/callback-urls", json={"provider": "mjproxy", "prompt": "x" * 2000})
        assert large.status_code == 413
        validate("POST", "/callback-urls", large)


@pytest.mark.parametrize("name", ["mjproxy-progress.json", "mjproxy-success.json",
                                  "mjproxy-failure.json", "ohmygpt-query-success.json",
                                  "aigc2d-success.json"])
def test_callbacks_as_the_providers_send_them_fit_the_documented_body(name: str) -> None:
    """midjourney-proxy writes nulls (failReason, imageUrl, finishTime): the document must
    take what providers really send, not only what our simulator sends."""
    schema = {"$ref": "#/components/schemas/CallbackBody",
              "components": DOCUMENT["components"]}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(
        orjson.loads((SAMPLES / name).read_bytes()))]
    assert not errors, errors
