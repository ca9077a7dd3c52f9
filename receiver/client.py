"""``receiver.client``: the service's API for a tenant's backend, without HTTP glue.

    from receiver.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as service:
        task = service.submit(prompt="a red fox")
        done = service.wait(task["id"], timeout=300)      # the final snapshot
        for snapshot in service.events():                  # every task, live, resumed
            ...

`AsyncClient` is the same with ``await`` (and ``async for`` over `AsyncClient.events`).
Tasks are the service's JSON snapshots, as dicts (``/openapi.json`` has their schema). A
refusal is raised as a `ServiceError` chosen by status, carrying the body's ``error`` as
``code`` and its ``detail``; a service that cannot be reached for ``reconnect_for`` seconds
is `Unreachable`. Timeouts are explicit: ``timeout`` per request, ``read_timeout`` between
two messages of a stream (the service pings every 15 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse, connect_sse

from receiver.core.models import TERMINAL_EVENTS

Task = dict[str, Any]


class ServiceError(Exception):
    """The service refused (``status``, and its ``{"error", "detail"}`` as ``code`` and
    ``detail``), or could not be reached (`Unreachable`, status 0)."""

    def __init__(self, status: int, code: str, detail: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


class BadRequest(ServiceError):
    """400, 413, 415, 431: the request as sent can never succeed."""


class Unauthorized(ServiceError):
    """401, 403: no key, a wrong one, or a route this key may not use."""


class NotFound(ServiceError):
    """404: no such task for this tenant (or no such route)."""


class Conflict(ServiceError):
    """409: not now, or not for this task (a parent not finished, a claimed id...)."""


class RateLimited(ServiceError):
    """429: too many requests, or the tenant's task quota; ``retry_after`` seconds."""


class Unavailable(ServiceError):
    """5xx, and 507 (the tenant's storage quota): nothing was acknowledged; retry later."""


class Unreachable(ServiceError):
    """The service did not answer (connection refused, reset, timed out)."""


class WaitTimeout(TimeoutError):
    """`Client.wait` ran out of time before the task ended."""


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest, 413: BadRequest, 415: BadRequest, 431: BadRequest,
    401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 429: RateLimited,
}


def _refusal(response: httpx.Response) -> ServiceError:
    try:
        body = orjson.loads(response.content)
        code, detail = str(body["error"]), str(body["detail"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code, detail = "http_error", response.text[:200]
    retry = response.headers.get("retry-after")
    kind = _BY_STATUS.get(response.status_code,
                          Unavailable if response.status_code >= 500 else ServiceError)
    return kind(response.status_code, code, detail,
                float(retry) if retry and retry.isdigit() else None)


def _json(response: httpx.Response) -> Any:
    if response.is_success:
        return orjson.loads(response.content)
    raise _refusal(response)


def _bytes(response: httpx.Response) -> bytes:
    if response.is_success:
        return response.content
    raise _refusal(response)


def _image_path(url: str) -> str:
    """An archived image's path on the service: the URL may name the service otherwise
    (PUBLIC_BASE_URL, an inner host) than this client reaches it."""
    path = httpx.URL(url).raw_path.decode("ascii")
    if not path.startswith("/images/"):
        raise ValueError(f"not an archived image's URL: {url[:200]!r}")
    return path


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _stream_path(task_id: str | None) -> str:
    return f"/tasks/{task_id}/events" if task_id else "/events"


class _Base:
    def __init__(self, base_url: str, api_key: str | None, timeout: float,
                 read_timeout: float, reconnect_for: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout)
        self.stream_timeout = httpx.Timeout(timeout, read=read_timeout)
        self.reconnect_for = reconnect_for

    def _resume(self, last: str | None) -> dict[str, str]:
        return {"Last-Event-ID": last} if last else {}

    def _retry_or_raise(self, response: httpx.Response, down_since: float | None) -> None:
        """A stream refused: a 4xx for good; a 5xx (Redis away, a restart) is retried for
        ``reconnect_for`` seconds, as a dropped connection is."""
        if response.status_code < 500 or (
                down_since is not None and time.monotonic() - down_since > self.reconnect_for):
            raise _refusal(response)


class Client(_Base):
    """The service's API, blocking. Use it as a context manager, or `close` it."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 read_timeout: float = 60.0, reconnect_for: float = 60.0) -> None:
        super().__init__(base_url, api_key, timeout, read_timeout, reconnect_for)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers,
                                  timeout=self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _json(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{self.base_url}: {exc!r}") from exc

    def submit(self, **fields: Any) -> Task:
        """``POST /tasks``: record and queue a task (``prompt``, ``provider``, ``action``,
        ``parent_id``, ``button``, ...); its first snapshot (NOT_START)."""
        task: Task = self._call("POST", "/tasks", json=_fields(fields))
        return task

    def get(self, task_id: str) -> Task:
        task: Task = self._call("GET", f"/tasks/{task_id}")
        return task

    def list(self, status: str | None = None, limit: int = 50,
             cursor: str | None = None) -> list[Task]:
        """The tenant's tasks, newest first; ``cursor``: the last id of the previous page."""
        page = self._call("GET", "/tasks",
                          params=_fields({"status": status, "limit": limit, "cursor": cursor}))
        tasks: list[Task] = page["tasks"]
        return tasks

    def cancel(self, task_id: str) -> Task:
        task: Task = self._call("POST", f"/tasks/{task_id}/cancel")
        return task

    def callback_url(self, provider: str, **fields: Any) -> dict[str, Any]:
        """``POST /callback-urls`` for a task submitted elsewhere: ``job_id``,
        ``callback_url`` and ``task``."""
        minted: dict[str, Any] = self._call("POST", "/callback-urls",
                                            json=_fields({"provider": provider, **fields}))
        return minted

    def images(self, task_id: str) -> dict[str, Any]:
        """``GET /tasks/{id}/images``: the task's archived images as signed URLs for
        ``<img>`` tags (``image_url``, ``image_urls``, valid ``expires_in`` seconds)."""
        signed: dict[str, Any] = self._call("GET", f"/tasks/{task_id}/images")
        return signed

    def image(self, url: str) -> bytes:
        """An archived image's bytes (a task's ``archived_image_url`` or one of its
        ``archived_image_urls``), fetched with the API key."""
        try:
            return _bytes(self._http.get(_image_path(url)))
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{self.base_url}: {exc!r}") from exc

    def events(self, task_id: str | None = None, last_event_id: str | None = None
               ) -> Iterator[Task]:
        """Snapshots as the service stores them: one task's (from its current state, ending
        after its terminal event) or every task's (for ever). A dropped connection is
        resumed with Last-Event-ID: nothing is skipped or repeated."""
        return self._events(task_id, last_event_id, None)

    def wait(self, task_id: str, timeout: float) -> Task:
        """The task's final snapshot, once it has ended; `WaitTimeout` after ``timeout``."""
        deadline = time.monotonic() + timeout
        final: Task | None = None
        for snapshot in self._events(task_id, None, deadline):
            final = snapshot
        if final is None or final["status"] not in ("SUCCESS", "FAILURE", "CANCEL"):
            return self.get(task_id)  # it had ended before (the stream said 204)
        return final

    def _events(self, task_id: str | None, last: str | None, deadline: float | None
                ) -> Iterator[Task]:
        path, down_since = _stream_path(task_id), None
        while True:
            timeout = self.stream_timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"task {task_id} had not ended")
                timeout = httpx.Timeout(self.timeout.connect, read=min(left, 60.0))
            try:
                with connect_sse(self._http, "GET", path, headers=self._resume(last),
                                 timeout=timeout) as source:
                    response = source.response
                    if response.status_code == 204:
                        return  # the task ended, and Last-Event-ID was its end
                    if response.status_code != 200:
                        response.read()
                        self._retry_or_raise(response, down_since)
                        down_since = down_since or time.monotonic()
                    else:
                        down_since = None
                        for sse in source.iter_sse():
                            if not sse.data:
                                continue
                            last = sse.id or last
                            yield orjson.loads(sse.data)
                            if task_id is not None and sse.event in TERMINAL_EVENTS:
                                return
            except httpx.TransportError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"task {task_id} had not ended") from exc
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.reconnect_for:
                    raise Unreachable(0, "unreachable", f"{self.base_url}: {exc!r}") from exc
            time.sleep(0.5)  # cut off, or a 5xx: again, from where it was


class AsyncClient(_Base):
    """`Client`, awaited."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 read_timeout: float = 60.0, reconnect_for: float = 60.0) -> None:
        super().__init__(base_url, api_key, timeout, read_timeout, reconnect_for)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                       timeout=self.timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _json(await self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{self.base_url}: {exc!r}") from exc

    async def submit(self, **fields: Any) -> Task:
        task: Task = await self._call("POST", "/tasks", json=_fields(fields))
        return task

    async def get(self, task_id: str) -> Task:
        task: Task = await self._call("GET", f"/tasks/{task_id}")
        return task

    async def list(self, status: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> list[Task]:
        page = await self._call(
            "GET", "/tasks", params=_fields({"status": status, "limit": limit, "cursor": cursor}))
        tasks: list[Task] = page["tasks"]
        return tasks

    async def cancel(self, task_id: str) -> Task:
        task: Task = await self._call("POST", f"/tasks/{task_id}/cancel")
        return task

    async def callback_url(self, provider: str, **fields: Any) -> dict[str, Any]:
        minted: dict[str, Any] = await self._call(
            "POST", "/callback-urls", json=_fields({"provider": provider, **fields}))
        return minted

    async def images(self, task_id: str) -> dict[str, Any]:
        """As `Client.images`."""
        signed: dict[str, Any] = await self._call("GET", f"/tasks/{task_id}/images")
        return signed

    async def image(self, url: str) -> bytes:
        """As `Client.image`."""
        try:
            return _bytes(await self._http.get(_image_path(url)))
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{self.base_url}: {exc!r}") from exc

    def events(self, task_id: str | None = None, last_event_id: str | None = None
               ) -> AsyncIterator[Task]:
        """As `Client.events`."""
        return self._events(task_id, last_event_id)

    async def wait(self, task_id: str, timeout: float) -> Task:
        final: Task | None = None
        try:
            async with asyncio.timeout(timeout):
                async for snapshot in self._events(task_id, None):
                    final = snapshot
        except TimeoutError:
            raise WaitTimeout(f"task {task_id} had not ended") from None
        if final is None or final["status"] not in ("SUCCESS", "FAILURE", "CANCEL"):
            return await self.get(task_id)
        return final

    async def _events(self, task_id: str | None, last: str | None) -> AsyncIterator[Task]:
        path, down_since = _stream_path(task_id), None
        while True:
            try:
                async with aconnect_sse(self._http, "GET", path, headers=self._resume(last),
                                        timeout=self.stream_timeout) as source:
                    response = source.response
                    if response.status_code == 204:
                        return
                    if response.status_code != 200:
                        await response.aread()
                        self._retry_or_raise(response, down_since)
                        down_since = down_since or time.monotonic()
                    else:
                        down_since = None
                        async for sse in source.aiter_sse():
                            if not sse.data:
                                continue
                            last = sse.id or last
                            yield orjson.loads(sse.data)
                            if task_id is not None and sse.event in TERMINAL_EVENTS:
                                return
            except httpx.TransportError as exc:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.reconnect_for:
                    raise Unreachable(0, "unreachable", f"{self.base_url}: {exc!r}") from exc
            await asyncio.sleep(0.5)
