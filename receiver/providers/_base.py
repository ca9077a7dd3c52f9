"""What every provider client shares: the request, the HTTP plumbing, buttons."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from receiver.core.buttons import button_action
from receiver.core.models import Update
from receiver.providers._answers import Outcome, Row, classify, refusal
from receiver.providers._errors import (
    CannotCancel,
    InvalidRequest,
    ProviderDown,
    UnknownTask,
)
from receiver.providers.dialects import DIALECTS

ACTIONS = ("IMAGINE", "UPSCALE", "VARIATION", "REROLL", "ZOOM", "PAN", "DESCRIBE", "BLEND")
# Buttons that open a dialog, and the input it needs (trueai answers them with code 21).
DIALOGS = (("MJ::CustomZoom::", "prompt"), ("MJ::Inpaint::", "mask"))


@dataclass(frozen=True)
class SubmitRequest:
    action: str
    prompt: str | None = None
    images: list[str] = field(default_factory=list)  # data URLs (or image URLs: aigc2d)
    parent_task_id: str | None = None  # the provider's id of the parent task
    custom_id: str | None = None  # the parent's button to press
    index: int | None = None  # 1-4, for UPSCALE and VARIATION by position
    mode: str | None = None
    dimensions: str | None = None
    mask: str | None = None  # vary region: the mask, a data URL


def dialog_input(custom_id: str | None) -> str | None:
    """What the dialog a button opens needs (``"prompt"`` or ``"mask"``), or None."""
    if custom_id is None:
        return None
    return next((need for prefix, need in DIALOGS if custom_id.startswith(prefix)), None)


def grid_position(custom_id: str) -> tuple[str, int] | None:
    """``("UPSCALE", 2)`` for ``MJ::JOB::upsample::2::…``: the grid's U1-U4, V1-V4, reroll."""
    parts = custom_id.split("::")
    if len(parts) < 4 or parts[:2] != ["MJ", "JOB"] or not parts[3].isdigit():
        return None
    action = {"upsample": "UPSCALE", "variation": "VARIATION", "reroll": "REROLL"}.get(parts[2])
    return None if action is None else (action, int(parts[3]))


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
    answers: tuple[Row, ...] = ()

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=self.auth_headers(api_key),
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
            transport=transport,
            trust_env=False,
        )

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this provider's requests can name (an action keeps its parent's)."""
        return ()

    def needs_data_urls(self) -> bool:
        """Whether image inputs must reach this provider as data URLs."""
        return True

    def max_blend(self) -> int:
        return 5

    @abstractmethod
    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        """The provider's task id."""

    @abstractmethod
    async def fetch(self, provider_task_id: str) -> Update:
        """What the provider says of the task now (for the reconciler)."""

    async def fetch_many(self, ids: list[str]) -> dict[str, Update | None]:
        """Each task the provider answers for: its state, or None when it does not know it.
        An id whose poll failed is left out (asked again next round)."""
        async def one(ptid: str) -> tuple[str, Update | BaseException | None]:
            try:
                return ptid, await self.fetch(ptid)
            except UnknownTask:
                return ptid, None
            except Exception as exc:
                return ptid, exc

        out: dict[str, Update | None] = {}
        for ptid, result in await asyncio.gather(*(one(i) for i in ids)):
            if not isinstance(result, BaseException):
                out[ptid] = result
        return out

    async def cancel(self, provider_task_id: str) -> Update | None:
        """Cancel a sent task; what the provider says of it afterwards (None: not known)."""
        raise CannotCancel(f"{self.name} cannot cancel a task it has been sent", self.name)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """The HTTP status and the JSON object answered, if any."""
        response = await self._request("POST", path, json=body)
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        return response.status_code, answer if isinstance(answer, dict) else None

    def _classify(self, status: int, code: Any, message: str) -> Outcome:
        if isinstance(code, int) and not isinstance(code, bool):
            return classify(self.answers, code, message)
        return classify(self.answers, status, message)

    def _without_body(self, status: int) -> Exception:
        """An answer with no JSON object: by its status (401, 403, 429 are in the tables)."""
        outcome = classify(self.answers, status, "")
        if outcome is not Outcome.REFUSED and outcome not in (
                Outcome.SUBMITTED, Outcome.QUEUED, Outcome.EXISTS, Outcome.DIALOG):
            return refusal(outcome, self.name, f"HTTP {status}")
        if 400 <= status < 500:  # a wrong path, a body too large: nothing was queued
            return InvalidRequest(f"{self.name} refused the request (HTTP {status})", self.name)
        # a 2xx without an answer may have queued the task: not retried
        return ProviderDown(f"{self.name} answered something that is not a JSON object "
                            f"(HTTP {status})", self.name)

    def _parse(self, response: httpx.Response, provider_task_id: str) -> Update:
        """A polled task; `UnknownTask` for midjourney-proxy's empty 200, trueai's 204, 404."""
        if response.status_code in (204, 404) or not response.content.strip():
            raise UnknownTask(f"{self.name} does not know task {provider_task_id}", self.name)
        return DIALECTS[self.name](response.content)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
            raise ProviderDown(f"{self.name} cannot be reached: {exc}", self.name,
                               retry_safe=True) from exc
        except httpx.HTTPError as exc:  # it may have been received: do not resubmit blindly
            raise ProviderDown(f"{self.name} did not answer: {exc!r}", self.name) from exc
        if response.status_code >= 500:
            raise ProviderDown(f"{self.name} answered {response.status_code}", self.name)
        return response


def require(request: SubmitRequest, provider: str, max_blend: int = 5) -> None:
    """What every provider refuses, checked before anything is sent."""
    if request.action not in ACTIONS:
        raise InvalidRequest(f"unknown action {request.action!r}", provider)
    if request.action == "IMAGINE" and not request.prompt:
        raise InvalidRequest("IMAGINE needs a prompt", provider)
    if request.action == "BLEND" and not 2 <= len(request.images) <= max_blend:
        raise InvalidRequest(f"BLEND takes 2 to {max_blend} images", provider)
    if request.action == "DESCRIBE" and len(request.images) != 1:
        raise InvalidRequest("DESCRIBE takes one image", provider)


def task_id(value: Any, provider: str) -> str:
    """The id in an accepting answer. Anything else: it said yes but not to what, so the
    task may be queued there (not retried)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= 128:
        return value.strip()
    raise ProviderDown(f"{provider} accepted the task without a usable id ({value!r:.40})",
                       provider)


def int_id(value: str, provider: str) -> int:
    """The integer ids of ohmygpt and aigc2d (kept as decimal strings everywhere else)."""
    if not value.isascii() or not value.isdigit():
        raise InvalidRequest(f"{provider} task ids are integers, not {value[:40]!r}", provider)
    return int(value)
