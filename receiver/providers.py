"""Provider clients: submit a task with our callback URL, and fetch a task's state.

One httpx client per provider, with explicit timeouts and limits. Every answer that is not a
submitted task becomes a `ProviderError` that says what happened (queue full, a banned word,
a bad key, an unknown parent, the provider down) and whether trying again could submit the
task twice (`retry_safe`: only when nothing reached the provider).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from receiver.dialects import DIALECTS
from receiver.errors import ReceiverError
from receiver.models import Update


class ProviderError(ReceiverError):
    status_code = 502
    code = "provider_error"
    retry_safe = False  # could a retry submit the task twice?

    def __init__(self, detail: str, provider: str = "") -> None:
        super().__init__(detail)
        self.provider = provider


class QueueFull(ProviderError):
    status_code = 429
    code = "provider_queue_full"
    retry_safe = True  # refused: nothing was queued


class BannedPrompt(ProviderError):
    status_code = 400
    code = "banned_prompt"

    def __init__(self, detail: str, provider: str = "", word: str | None = None) -> None:
        super().__init__(detail, provider)
        self.word = word


class InvalidRequest(ProviderError):
    status_code = 400
    code = "provider_refused"


class BadProviderKey(ProviderError):
    code = "provider_auth"


class UnknownParent(ProviderError):
    status_code = 404
    code = "unknown_parent"


class UnknownTask(ProviderError):
    status_code = 404
    code = "unknown_provider_task"


class ModeMismatch(ProviderError):
    """An action in another mode than its parent's: the modes are separate account pools."""

    status_code = 409
    code = "mode_mismatch"


class ProviderDown(ProviderError):
    status_code = 503
    code = "provider_down"

    def __init__(self, detail: str, provider: str = "", retry_safe: bool = False) -> None:
        super().__init__(detail, provider)
        self.retry_safe = retry_safe


ACTIONS = ("IMAGINE", "UPSCALE", "VARIATION", "REROLL", "ZOOM", "PAN", "DESCRIBE", "BLEND")
# A button's custom id names its action somewhere in it: MJ::JOB::upsample::1::<hash>,
# MJ::JOB::high_variation::1::…, MJ::Outpaint::50::1::…, MJ::CustomZoom::…, MJ::JOB::pan_left::…
_BUTTON_MARKERS = (("upsample", "UPSCALE"), ("variation", "VARIATION"), ("reroll", "REROLL"),
                   ("outpaint", "ZOOM"), ("customzoom", "ZOOM"), ("pan_", "PAN"))


@dataclass(frozen=True)
class SubmitRequest:
    action: str
    prompt: str | None = None
    images: list[str] = field(default_factory=list)  # base64 data URLs or image URLs
    parent_task_id: str | None = None  # the provider's id of the parent task
    custom_id: str | None = None  # the parent's button to press
    index: int | None = None  # 1-4, for UPSCALE and VARIATION by position
    mode: str | None = None
    dimensions: str | None = None


def button_action(custom_id: str) -> str | None:
    """The action a button performs, from its custom id."""
    lowered = custom_id.lower()
    return next((action for marker, action in _BUTTON_MARKERS if marker in lowered), None)


def find_button(buttons: list[dict[str, str]], action: str, index: int | None) -> str | None:
    """The custom id of the parent's button for ``action`` (and, for the grid's U1-U4 and
    V1-V4, ``index``: MJ::JOB::upsample::<index>::…), if it has one."""
    for button in buttons:
        custom_id = button["custom_id"]
        if button_action(custom_id) != action:
            continue
        parts = custom_id.split("::")
        if index is None or (len(parts) > 3 and parts[1] == "JOB" and parts[3] == str(index)):
            return custom_id
    return None


class ProviderClient(ABC):
    name: str

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=self.auth_headers(api_key),
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
            transport=transport,
        )

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    @abstractmethod
    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        """The provider's task id."""

    @abstractmethod
    async def fetch(self, provider_task_id: str) -> Update:
        """What the provider says of the task now (for the reconciler)."""

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The provider's JSON object. A 4xx without one is a refusal (a wrong path, a body
        too large: nothing was queued); a 2xx without one may have queued the task."""
        response = await self._request("POST", path, json=body)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            return answer
        if 400 <= response.status_code < 500:
            raise InvalidRequest(f"{self.name} refused the request ({response.status_code})",
                                 self.name)
        raise ProviderDown(f"{self.name} answered something that is not a JSON object "
                           f"({response.status_code})", self.name)

    def _parse(self, response: httpx.Response, provider_task_id: str) -> Update:
        if response.status_code == 404:
            raise UnknownTask(f"{self.name} has no task {provider_task_id}", self.name)
        return DIALECTS[self.name](response.content)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
            raise ProviderDown(f"{self.name} cannot be reached: {exc}", self.name,
                               retry_safe=True) from exc
        except httpx.HTTPError as exc:  # it may have been received: do not resubmit blindly
            raise ProviderDown(f"{self.name} did not answer: {exc!r}", self.name) from exc
        if response.status_code in (401, 403):
            raise BadProviderKey(f"{self.name} refused the API key", self.name)
        if response.status_code == 429:
            raise QueueFull(f"{self.name}: queue full", self.name)
        if response.status_code >= 500:
            raise ProviderDown(f"{self.name} answered {response.status_code}", self.name)
        return response


def _require(request: SubmitRequest, provider: str) -> None:
    if request.action not in ACTIONS:
        raise InvalidRequest(f"unknown action {request.action!r}", provider)
    if request.action == "IMAGINE" and not request.prompt:
        raise InvalidRequest("IMAGINE needs a prompt", provider)
    if request.action == "BLEND" and not 2 <= len(request.images) <= 5:
        raise InvalidRequest("BLEND takes 2 to 5 images", provider)
    if request.action == "DESCRIBE" and len(request.images) != 1:
        raise InvalidRequest("DESCRIBE takes one image", provider)


def _refusal(provider: str, message: str, request: SubmitRequest | None = None) -> ProviderError:
    """A provider's refusal, told by its message (the dialects without error codes)."""
    text = message.lower()
    if ("queue" in text and ("full" in text or "limit" in text)) or "队列已满" in text:
        return QueueFull(f"{provider}: {message}", provider)
    if "banned" in text or "sensitive" in text or "敏感" in text:
        quoted = _QUOTED.search(message)
        return BannedPrompt(f"{provider}: {message}", provider, quoted[1] if quoted else None)
    if any(w in text for w in ("api key", "apikey", "invalid key", "unauthorized")):
        return BadProviderKey(f"{provider}: {message}", provider)
    if "mode" in text and any(w in text for w in ("mismatch", "match", "differ")):
        return ModeMismatch(f"{provider}: {message}", provider)
    acting = request is not None and request.parent_task_id is not None
    if acting and ("not found" in text or "unknown" in text or "不存在" in text):
        return UnknownParent(f"{provider}: {message}", provider)
    return InvalidRequest(f"{provider}: {message}", provider)


def _task_id(value: Any, provider: str) -> str:
    """The id in an accepting answer. Anything else: it said yes but not to what, so the
    task may be queued there (not retried)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= 128:
        return value.strip()
    raise ProviderDown(f"{provider} accepted the task without a usable id ({value!r:.40})",
                       provider)


def _int_id(value: str, provider: str) -> int:
    """The integer ids of ohmygpt and aigc2d (kept as decimal strings everywhere else)."""
    if not value.isascii() or not value.isdigit():
        raise InvalidRequest(f"{provider} task ids are integers, not {value[:40]!r}", provider)
    return int(value)


# the banned word, quoted in ASCII or CJK quotes
_QUOTED = re.compile("[\"'\u201c\u2018]([^\"'\u201d\u2019]+)[\"'\u201d\u2019]")


class MjproxyClient(ProviderClient):
    """midjourney-proxy and its relays: the mode is a path prefix; auth by ``mj-api-secret``
    (or ``Authorization`` with ``auth_header="Authorization"``)."""

    name = "mjproxy"
    MODES: ClassVar[dict[str | None, str]] = {
        None: "", "FAST": "/mj-fast", "RELAX": "/mj-relax", "TURBO": "/mj-turbo"}

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 auth_header: str = "mj-api-secret") -> None:
        self.auth_header = auth_header
        super().__init__(base_url, api_key, timeout, transport)

    def auth_headers(self, api_key: str) -> dict[str, str]:
        if self.auth_header.lower() == "authorization":
            return {"Authorization": f"Bearer {api_key}"}
        return {self.auth_header: api_key}

    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        _require(request, self.name)
        if request.mode not in self.MODES:
            raise InvalidRequest(f"mjproxy modes are FAST, RELAX, TURBO, not {request.mode}")
        hook = {"notifyHook": callback_url} if callback_url else {}
        if request.action == "IMAGINE":
            path, body = "imagine", {"prompt": request.prompt, "base64Array": request.images}
        elif request.action == "DESCRIBE":
            path, body = "describe", {"base64": request.images[0]}
        elif request.action == "BLEND":
            path, body = "blend", {"base64Array": request.images,
                                   "dimensions": request.dimensions or "SQUARE"}
        else:
            if not (request.custom_id and request.parent_task_id):
                raise InvalidRequest(f"{request.action} needs the parent's button", self.name)
            path, body = "action", {"customId": request.custom_id,
                                    "taskId": request.parent_task_id}
        answer = await self._post(f"{self.MODES[request.mode]}/mj/submit/{path}",
                                  {**body, **hook})
        code, description = answer.get("code"), str(answer.get("description") or "")
        if code in (1, 21, 22):  # submitted, already exists, waiting in the queue
            return _task_id(answer.get("result"), self.name)
        if code == 23:
            raise QueueFull(f"mjproxy: {description}", self.name)
        if code == 24:
            word = (answer.get("properties") or {}).get("bannedWord")
            raise BannedPrompt(f"mjproxy: banned prompt ({word or description})", self.name,
                               word)
        raise _refusal(self.name, f"{description} (code {code})", request)

    async def fetch(self, provider_task_id: str) -> Update:
        response = await self._request("GET", f"/mj/task/{provider_task_id}/fetch")
        return self._parse(response, provider_task_id)


class OhmygptClient(ProviderClient):
    """OhMyGPT: FAST or NORMAL account pools; ids are integers."""

    name = "ohmygpt"
    BASE = "/api/v1/ai/draw/mj"

    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        _require(request, self.name)
        body: dict[str, Any] = {"type": request.mode or "FAST"}
        if callback_url:
            body["webhook"] = callback_url
        if request.action == "IMAGINE":
            path = "imagine"
            body["prompt"] = request.prompt
        elif request.action == "DESCRIBE":
            path = "describe"
            body["image"] = request.images[0]
        elif request.action == "BLEND":
            path = "blend"
            body.update(images=request.images, dimensions=request.dimensions or "SQUARE")
        else:
            if not (request.custom_id and request.parent_task_id):
                raise InvalidRequest(f"{request.action} needs the parent's button", self.name)
            path = "action"
            body.update(taskId=_int_id(request.parent_task_id, self.name),
                        customId=request.custom_id)
        answer = await self._post(f"{self.BASE}/{path}", body)
        if answer.get("statusCode") == 200 and answer.get("data") is not None:
            return _task_id(answer["data"], self.name)
        raise _refusal(self.name, str(answer.get("message") or answer), request)

    async def fetch(self, provider_task_id: str) -> Update:
        response = await self._request("POST", f"{self.BASE}/query",
                                       json={"taskId": _int_id(provider_task_id, self.name)})
        return self._parse(response, provider_task_id)


class Aigc2dClient(ProviderClient):
    """AIGC2D: snake_case, integer ids past 2^53 (kept exact: httpx encodes with the stdlib)."""

    name = "aigc2d"
    PATHS: ClassVar[dict[str, str]] = {
        "IMAGINE": "imagine", "UPSCALE": "upscale", "VARIATION": "variation",
        "DESCRIBE": "describe", "BLEND": "blend"}

    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        _require(request, self.name)
        path = self.PATHS.get(request.action)
        if path is None:
            raise InvalidRequest(f"aigc2d offers {', '.join(self.PATHS)}", self.name)
        body: dict[str, Any] = {"callback_url": callback_url} if callback_url else {}
        if request.action == "IMAGINE":
            body["prompt"] = request.prompt
        elif request.action == "DESCRIBE":
            body["image"] = request.images[0]
        elif request.action == "BLEND":
            body["images"] = request.images
        else:
            if request.parent_task_id is None or request.index is None:
                raise InvalidRequest(f"{request.action} needs the parent and an index 1-4",
                                     self.name)
            body.update(task_id=_int_id(request.parent_task_id, self.name), index=request.index)
        answer = await self._post(f"/mj/{path}", body)
        if answer.get("code") == 0 and answer.get("task_id") is not None:
            return _task_id(answer["task_id"], self.name)
        raise _refusal(self.name, str(answer.get("message") or answer), request)

    async def fetch(self, provider_task_id: str) -> Update:
        response = await self._request("GET", f"/mj/task/{provider_task_id}")
        return self._parse(response, provider_task_id)


CLIENTS: dict[str, type[ProviderClient]] = {
    client.name: client for client in (MjproxyClient, OhmygptClient, Aigc2dClient)
}
