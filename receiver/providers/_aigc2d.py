"""AIGC2D: snake_case, integer ids past 2^53 (kept exact: httpx encodes with the stdlib).

Its submit and query paths, request fields, answers and error bodies are not published: what
this client sends is our assumption, listed in README ("AIGC2D assumptions") and in
`ASSUMPTIONS`, one place to change when the real API is known.
"""

from __future__ import annotations

from typing import Any, ClassVar

from receiver.core.models import Update
from receiver.providers._answers import ACCEPTED, AIGC2D, Outcome, refusal
from receiver.providers._base import ProviderClient, SubmitRequest, int_id, require, task_id
from receiver.providers._errors import InvalidRequest

ASSUMPTIONS = {
    "submit path": "POST /mj/{imagine,upscale,variation,describe,blend}",
    "query path": "GET /mj/task/{task_id}",
    "request fields": "prompt; image (describe); images (blend, URLs); task_id + index "
                      "(upscale, variation); callback_url",
    "submit answer": '{"code": 0, "message": "success", "task_id": <integer>}',
    "error bodies": '{"code": <non-zero>, "message": ...}, matched by status and words',
    "times": "YYYY-MM-DD HH:MM:SS in UTC+8",
    "failure reason": "fail_reason (else failReason, else message)",
    "describe text": "prompt",
}


class Aigc2dClient(ProviderClient):
    name = "aigc2d"
    answers = AIGC2D
    PATHS: ClassVar[dict[str, str]] = {
        "IMAGINE": "imagine", "UPSCALE": "upscale", "VARIATION": "variation",
        "DESCRIBE": "describe", "BLEND": "blend"}

    def needs_data_urls(self) -> bool:
        return False  # an assumption: image URLs, as its callbacks give them

    async def submit(self, request: SubmitRequest, callback_url: str | None) -> str:
        require(request, self.name)
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
            body.update(task_id=int_id(request.parent_task_id, self.name), index=request.index)
        status, answer = await self._post(f"/mj/{path}", body)
        if answer is None:
            raise self._without_body(status)
        message = str(answer.get("message") or answer)
        outcome = self._classify(status, answer.get("code"), message)
        if outcome in ACCEPTED and answer.get("task_id") is not None:
            return task_id(answer["task_id"], self.name)
        raise refusal(Outcome.REFUSED if outcome in ACCEPTED else outcome, self.name, message)

    async def fetch(self, provider_task_id: str) -> Update:
        response = await self._request("GET", f"/mj/task/{provider_task_id}")
        return self._parse(response, provider_task_id)
