"""midjourney-proxy, in its two API generations (``MJPROXY_FLAVOR``).

- ``trueai`` (trueai-org/midjourney-proxy and the plus edition): buttons pressed through
  ``/mj/submit/action``, mode prefixes, dialogs completed through ``/mj/submit/modal``, cancel.
- ``novicezk`` (novicezk/midjourney-proxy 2.x): no buttons, no modes; the grid's U1-U4, V1-V4
  and reroll go through ``/mj/submit/change`` by action and index. The dialect gives its
  finished grids those buttons by name, so a tenant presses "U1" the same way on both.

Both take images as data URLs only, and both have ``list-by-condition``: one request polls
every task an account has in flight.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
import orjson

from receiver.core.errors import ReceiverError
from receiver.core.models import Update
from receiver.core.settings import MJPROXY_FLAVORS
from receiver.providers._answers import ACCEPTED, MJPROXY, Outcome, refusal
from receiver.providers._base import (
    ProviderClient,
    SubmitRequest,
    dialog_input,
    grid_position,
    require,
    task_id,
)
from receiver.providers._errors import InvalidRequest, ProviderDown
from receiver.providers.dialects import DIALECTS

FLAVORS = MJPROXY_FLAVORS
_REMIX = frozenset({"VARIATION", "PAN", "REROLL"})  # trueai's remix dialog, with a prompt


class MjproxyClient(ProviderClient):
    """Auth by ``mj-api-secret``, or by ``Authorization`` holding the raw key (trueai compares
    the whole header: no ``Bearer`` prefix)."""

    name = "mjproxy"
    PREFIXES: ClassVar[dict[str | None, str]] = {
        None: "", "FAST": "/mj-fast", "RELAX": "/mj-relax", "TURBO": "/mj-turbo"}

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 auth_header: str = "mj-api-secret", flavor: str = "trueai") -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"MJPROXY_FLAVOR is one of {', '.join(FLAVORS)}, not {flavor!r}")
        self.auth_header, self.flavor = auth_header, flavor
        self.answers = MJPROXY[flavor]
        super().__init__(base_url, api_key, timeout, transport)

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {self.auth_header: api_key}

    @property
    def modes(self) -> tuple[str, ...]:
        return ("FAST", "RELAX", "TURBO") if self.flavor == "trueai" else ()

    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        require(request, self.name)
        if request.mode is not None and request.mode not in self.modes:
            offered = ", ".join(self.modes) or "no modes"
            raise InvalidRequest(f"mjproxy ({self.flavor}) has {offered}, not {request.mode}",
                                 self.name)
        prefix = self.PREFIXES[request.mode]
        hook = {"notifyHook": callback_url} if callback_url else {}
        path, body = self._route(request)
        status, answer = await self._post(f"{prefix}/mj/submit/{path}", {**body, **hook})
        outcome, ptid = self._accepted(status, answer)
        if outcome is Outcome.DIALOG:
            # trueai parked the task in MODAL: the dialog's input completes it.
            modal: dict[str, Any] = {"taskId": ptid}
            if request.prompt:
                modal["prompt"] = request.prompt
            if request.mask:
                modal["maskBase64"] = request.mask
            status, answer = await self._post(f"{prefix}/mj/submit/modal", modal)
            outcome, ptid = self._accepted(status, answer)
        return ptid

    def _route(self, request: SubmitRequest) -> tuple[str, dict[str, Any]]:
        if request.action == "IMAGINE":
            return "imagine", {"prompt": request.prompt, "base64Array": request.images}
        if request.action == "DESCRIBE":
            return "describe", {"base64": request.images[0]}
        if request.action == "BLEND":
            return "blend", {"base64Array": request.images,
                             "dimensions": request.dimensions or "SQUARE"}
        if not (request.custom_id and request.parent_task_id):
            raise InvalidRequest(f"{request.action} needs the parent's button", self.name)
        if self.flavor == "novicezk":
            position = grid_position(request.custom_id)
            if position is None:
                raise InvalidRequest("novicezk offers U1-U4, V1-V4 and reroll only, not "
                                     f"{request.custom_id[:60]!r}", self.name)
            action, index = position
            change: dict[str, Any] = {"taskId": request.parent_task_id, "action": action}
            if action != "REROLL":
                change["index"] = index
            return "change", change
        body: dict[str, Any] = {"customId": request.custom_id, "taskId": request.parent_task_id}
        if request.prompt and request.action in _REMIX and not dialog_input(request.custom_id):
            body["enableRemix"] = True  # the prompt goes in through the remix dialog
        return "action", body

    def _accepted(self, status: int, answer: dict[str, Any] | None) -> tuple[Outcome, str]:
        """The outcome and task id of an accepting answer; the provider's error otherwise."""
        if answer is None:
            raise self._without_body(status)
        code = answer.get("code")
        message = str(answer.get("description") or answer.get("message") or "")
        outcome = self._classify(status, code, message)
        if outcome in ACCEPTED:
            return outcome, task_id(answer.get("result"), self.name)
        properties = answer.get("properties")
        word = properties.get("bannedWord") if isinstance(properties, dict) else None
        word = word if isinstance(word, str) else None
        said = f"{message or 'refused'} (code {code})"
        if word:
            said = f"banned prompt ({word}): {said}"
        raise refusal(outcome, self.name, said, word)

    async def fetch(self, provider_task_id: str) -> Update:
        response = await self._request("GET", f"/mj/task/{provider_task_id}/fetch")
        return self._parse(response, provider_task_id)

    async def fetch_many(self, ids: list[str]) -> dict[str, Update | None]:
        """One ``list-by-condition`` for all of them: a task not listed is not known."""
        if not ids:
            return {}
        response = await self._request("POST", "/mj/task/list-by-condition", json={"ids": ids})
        try:
            listed = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            listed = None
        if response.status_code != 200 or not isinstance(listed, list):
            # An older relay without the route: one fetch each.
            return await super().fetch_many(ids)
        parse = DIALECTS[self.name]
        out: dict[str, Update | None] = dict.fromkeys(ids)
        for item in listed:
            if isinstance(item, dict) and str(item.get("id")) in out:
                try:
                    out[str(item["id"])] = parse(orjson.dumps(item))
                except ReceiverError:
                    del out[str(item["id"])]  # not a task: asked again next round
        return out

    async def cancel(self, provider_task_id: str) -> Update | None:
        if self.flavor != "trueai":
            return await super().cancel(provider_task_id)
        response = await self._request("POST", f"/mj/task/{provider_task_id}/cancel")
        if response.status_code >= 300:
            raise ProviderDown(f"mjproxy did not cancel task {provider_task_id} "
                               f"(HTTP {response.status_code})", self.name)
        # trueai answers an empty 200 and sends no callback: its state is read back.
        return await self.fetch(provider_task_id)
