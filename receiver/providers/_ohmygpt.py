"""OhMyGPT: FAST or NORMAL account pools, integer ids, images as data URLs.

Every request carries ``model: "midjourney"`` (as all five public third-party clients send
it); reference and blend images go in ``base64Array``, a describe's image in ``base64``, a
vary-region mask in ``base64Mask``. Blend takes 2 to 4 images.
"""

from __future__ import annotations

from typing import Any

from receiver.core.models import Update
from receiver.providers._answers import ACCEPTED, OHMYGPT, Outcome, refusal
from receiver.providers._base import ProviderClient, SubmitRequest, int_id, require, task_id
from receiver.providers._errors import InvalidRequest


class OhmygptClient(ProviderClient):
    name = "ohmygpt"
    answers = OHMYGPT
    BASE = "/api/v1/ai/draw/mj"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("FAST", "NORMAL")

    def max_blend(self) -> int:
        return 4  # the seed: "2 or more and less than 5"

    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        require(request, self.name, self.max_blend())
        body: dict[str, Any] = {"model": "midjourney", "type": request.mode or "FAST"}
        if callback_url:
            body["webhook"] = callback_url
        if request.action == "IMAGINE":
            path = "imagine"
            body["prompt"] = request.prompt
            if request.images:
                body["base64Array"] = request.images
        elif request.action == "DESCRIBE":
            path = "describe"
            body["base64"] = request.images[0]
        elif request.action == "BLEND":
            path = "blend"
            body.update(base64Array=request.images, dimensions=request.dimensions or "SQUARE")
        else:
            if not (request.custom_id and request.parent_task_id):
                raise InvalidRequest(f"{request.action} needs the parent's button", self.name)
            path = "action"
            body.update(taskId=int_id(request.parent_task_id, self.name),
                        customId=request.custom_id)
            if request.mask:
                body["base64Mask"] = request.mask
            if request.prompt:
                body["prompt"] = request.prompt  # a dialog's text (not documented: a guess)
        status, answer = await self._post(f"{self.BASE}/{path}", body)
        if answer is None:
            raise self._without_body(status)
        message = str(answer.get("message") or answer)
        outcome = self._classify(status, answer.get("statusCode"), message)
        if outcome in ACCEPTED and answer.get("data") is not None:
            return task_id(answer["data"], self.name)
        # accepted without a task id: ambiguous, so not retried
        raise refusal(Outcome.REFUSED if outcome in ACCEPTED else outcome, self.name, message)

    async def fetch(self, provider_task_id: str) -> Update:
        response = await self._request("POST", f"{self.BASE}/query",
                                       json={"taskId": int_id(provider_task_id, self.name)})
        return self._parse(response, provider_task_id)

