"""Tenant and operator routes over real HTTP."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import redis
from starlette.routing import Route

from tests.conftest import LiveServer, mint, sample


def test_callback_url_creates_the_task(acme: httpx.Client, server: LiveServer) -> None:
    answer = acme.post("/callback-urls", json={"provider": "ohmygpt", "prompt": "a red fox",
                                                "action": "imagine", "mode": "fast"})
    assert answer.status_code == 201
    body = answer.json()
    assert body["callback_url"].startswith(f"{server.url}/callbacks/ohmygpt?token=")
    task = body["task"]
    assert (task["id"], task["status"], task["action"], task["mode"], task["prompt"]) == (
        body["job_id"], "NOT_START", "IMAGINE", "FAST", "a red fox")
    assert (task["version"], task["event"], task["progress"]) == (1, "task.created", 0)
    assert task["image_urls"] == [] and task["buttons"] == []
    assert acme.get(f"/tasks/{body['job_id']}").json()["prompt"] == "a red fox"


def test_public_base_url_is_used(make_server: Callable[..., LiveServer], r: redis.Redis) -> None:
    server = make_server(public_base_url="https://hooks.example.com/")
    with server.client("key-acme") as acme:
        _, url = mint(acme)
    assert url.startswith("https://hooks.example.com/callbacks/mjproxy?token=")


def test_provider_task_id_given_at_mint_binds_the_job(acme: httpx.Client) -> None:
    job, url = mint(acme, provider_task_id=" 42 ")
    assert acme.get(f"/tasks/{job}").json()["provider_task_id"] == "42"
    ok = acme.post(url, content=b'{"id": 42, "status": "SUCCESS"}')
    assert ok.json()["result"] == "stored"
    job, url = mint(acme, provider_task_id="44")
    assert acme.post(url, content=b'{"id": 43, "status": "SUCCESS"}').status_code == 403
    taken = acme.post("/callback-urls", json={"provider": "mjproxy", "provider_task_id": "42"})
    assert taken.status_code == 409 and taken.json()["error"] == "provider_task_claimed"


def test_callback_url_bad_requests(acme: httpx.Client) -> None:
    for body in ({"provider": "nope"}, {}, {"provider": "mjproxy", "prompt": 5},
                 {"provider": "mjproxy", "provider_task_id": "  "}):
        answer = acme.post("/callback-urls", json=body)
        assert answer.status_code == 400, body
        assert answer.json()["error"] == "bad_request"
    assert acme.post("/callback-urls", content=b"{not json").status_code == 400
    assert acme.post("/callback-urls", content=b"[1]").status_code == 400


def test_api_keys(server: LiveServer) -> None:
    with server.client() as anonymous:
        answer = anonymous.get("/tasks")
        assert answer.status_code == 401
        assert answer.json()["error"] == "missing_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
    with server.client("wrong") as wrong:
        assert wrong.get("/tasks").json()["error"] == "invalid_api_key"
        assert wrong.post("/callback-urls", json={"provider": "mjproxy"}).status_code == 401


def test_tenants_see_only_their_own(server: LiveServer, acme: httpx.Client) -> None:
    job, url = mint(acme)
    assert acme.post(url, content=sample("mjproxy-success.json")).status_code == 200
    with server.client("key-beta") as beta:
        assert beta.get(f"/tasks/{job}").status_code == 404
        assert beta.get("/tasks").json() == {"tasks": [], "next_cursor": None}
        # beta's own job is beta's
        beta_job, _ = mint(beta)
        assert [t["id"] for t in beta.get("/tasks").json()["tasks"]] == [beta_job]
    assert [t["id"] for t in acme.get("/tasks").json()["tasks"]] == [job]


def test_list_pages_newest_first_with_status_filter(acme: httpx.Client) -> None:
    jobs = [mint(acme) for _ in range(7)]
    for job, url in jobs[:3]:
        assert acme.post(url, content=sample("mjproxy-success.json", job)).status_code == 200
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = acme.get("/tasks", params=params).json()
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [job for job, _ in reversed(jobs)]
    done = acme.get("/tasks", params={"status": "success"}).json()["tasks"]
    assert [t["id"] for t in done] == [job for job, _ in reversed(jobs[:3])]
    waiting = acme.get("/tasks", params={"status": "NOT_START", "limit": 200}).json()
    assert len(waiting["tasks"]) == 4 and waiting["next_cursor"] is None


def test_list_bad_parameters(acme: httpx.Client) -> None:
    for params in ({"status": "DONE"}, {"limit": 0}, {"limit": 201}, {"limit": "x"},
                   {"cursor": "../../etc"}):
        answer = acme.get("/tasks", params=params)
        assert answer.status_code == 400, params
        assert set(answer.json()) == {"error", "detail"}


def test_unknown_task_and_route_are_json_404(acme: httpx.Client) -> None:
    for path in ("/tasks/0123456789abcdef0123", "/tasks/not-an-id", "/nowhere"):
        answer = acme.get(path)
        assert answer.status_code == 404
        assert set(answer.json()) == {"error", "detail"}
    answer = acme.delete("/tasks")
    assert answer.status_code == 405 and answer.json()["error"] == "method_not_allowed"


def test_open_mode_serves_loopback_as_default_tenant(
    make_server: Callable[..., LiveServer], r: redis.Redis
) -> None:
    server = make_server(api_keys={})
    with server.client() as local:
        job, url = mint(local)
        assert local.get(f"/tasks/{job}").json()["tenant"] == "default"
        # a client forwarded by a proxy on this box is not loopback: refused
        outside = local.get("/tasks", headers={"X-Forwarded-For": "203.0.113.9"})
        assert outside.status_code == 403
        assert outside.json()["error"] == "loopback_only"
        # callbacks need no API key, only their token, from anywhere
        answer = local.post(url, content=sample("mjproxy-success.json"),
                            headers={"X-Forwarded-For": "203.0.113.9"})
        assert answer.status_code == 200


def test_health_ready_and_schema(server: LiveServer, r: redis.Redis) -> None:
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    routes = {route.path for route in server.server.config.app.routes
              if isinstance(route, Route)}  # not the dashboard's static files
    assert routes == set(schema["paths"])
