"""Provider clients against the providers' answers (httpx.MockTransport stands in for the
providers' hosts; the simulator tests cover whole lifecycles over real sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.models import TaskStatus
from receiver.providers import (
    Aigc2dClient,
    BadProviderKey,
    BannedPrompt,
    InvalidRequest,
    MjproxyClient,
    ModeMismatch,
    OhmygptClient,
    ProviderClient,
    ProviderDown,
    QueueFull,
    SubmitRequest,
    UnknownParent,
    UnknownTask,
    find_button,
)
from tests.conftest import sample

Handler = Callable[[httpx.Request], httpx.Response]
seen: list[httpx.Request] = []


def client(cls: type[ProviderClient], handler: Handler, **kwargs: Any) -> ProviderClient:
    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return cls("https://provider.example", "sk-test", transport=httpx.MockTransport(record),
               **kwargs)


def answer(body: Any, status: int = 200) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def submit(c: ProviderClient, request: SubmitRequest, hook: str | None = "https://r/cb") -> str:
    return asyncio.run(c.submit(request, hook))


IMAGINE = SubmitRequest("IMAGINE", prompt="a red fox")


def test_mjproxy_submit_path_mode_auth_and_body() -> None:
    seen.clear()
    result = json.loads(sample("mjproxy-submit-response.json"))
    c = client(MjproxyClient, answer(result))
    assert submit(c, SubmitRequest("IMAGINE", prompt="a fox", mode="RELAX")) == "1320098173412546"
    request = seen[-1]
    assert request.url.path == "/mj-relax/mj/submit/imagine"
    assert request.headers["mj-api-secret"] == "sk-test"
    assert json.loads(request.content) == {"prompt": "a fox", "base64Array": [],
                                           "notifyHook": "https://r/cb"}
    bearer = client(MjproxyClient, answer(result), auth_header="Authorization")
    submit(bearer, IMAGINE, hook=None)
    assert seen[-1].headers["authorization"] == "Bearer sk-test"
    assert "notifyHook" not in json.loads(seen[-1].content)
    assert seen[-1].url.path == "/mj/submit/imagine"


def test_mjproxy_action_presses_the_parents_button() -> None:
    seen.clear()
    c = client(MjproxyClient, answer({"code": 1, "result": "99"}))
    buttons = [{"custom_id": b["customId"]}
               for b in json.loads(sample("mjproxy-success.json"))["buttons"]]
    custom = find_button(buttons, "UPSCALE", 1)
    assert custom is not None and "upsample::1" in custom
    submit(c, SubmitRequest("UPSCALE", parent_task_id="1689231405853400", custom_id=custom))
    assert seen[-1].url.path == "/mj/submit/action"
    assert json.loads(seen[-1].content)["customId"] == custom
    with pytest.raises(InvalidRequest):
        submit(c, SubmitRequest("UPSCALE", parent_task_id="1", index=1))  # no button


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"code": 23, "description": "队列已满\uff0c请稍后尝试"}, QueueFull),
        ({"code": 24, "description": "可能包含敏感词", "properties": {"bannedWord": "gore"}},
         BannedPrompt),
        ({"code": 4, "description": "关联任务不存在或已失效"}, UnknownParent),
        ({"code": 4, "description": "prompt too long"}, InvalidRequest),
    ],
)
def test_mjproxy_refusals(body: dict[str, Any], error: type[Exception]) -> None:
    c = client(MjproxyClient, answer(body))
    request = SubmitRequest("VARIATION", parent_task_id="1", custom_id="MJ::JOB::variation::1")
    with pytest.raises(error) as caught:
        submit(c, request)
    if error is BannedPrompt:
        assert caught.value.word == "gore"  # type: ignore[attr-defined]


def test_ohmygpt_submit_and_refusals() -> None:
    seen.clear()
    c = client(OhmygptClient, answer(json.loads(sample("ohmygpt-submit-response.json"))))
    assert submit(c, SubmitRequest("IMAGINE", prompt="fox", mode="NORMAL")) == "2"
    assert seen[-1].url.path == "/api/v1/ai/draw/mj/imagine"
    assert json.loads(seen[-1].content) == {"type": "NORMAL", "webhook": "https://r/cb",
                                            "prompt": "fox"}
    assert seen[-1].headers["authorization"] == "Bearer sk-test"
    for message, error in [("queue is full", QueueFull),
                           ("prompt contains banned word 'gore'", BannedPrompt),
                           ("invalid api key", BadProviderKey),
                           ("Mode mismatch: the parent ran in FAST", ModeMismatch),
                           ("type must be FAST or NORMAL", InvalidRequest),
                           ("parent task not found", UnknownParent)]:
        refusing = client(OhmygptClient, answer({"statusCode": 400, "message": message}))
        action = SubmitRequest("UPSCALE", parent_task_id="20", custom_id="MJ::JOB::upsample::1")
        with pytest.raises(error):
            submit(refusing, action)


def test_aigc2d_ids_stay_exact_both_ways() -> None:
    seen.clear()
    big = 442275063214085100
    c = client(Aigc2dClient, lambda r: httpx.Response(
        200, content=b'{"code":0,"message":"success","task_id":%d}' % (big + 1)))
    assert submit(c, SubmitRequest("UPSCALE", parent_task_id=str(big), index=3)) == str(big + 1)
    assert seen[-1].url.path == "/mj/upscale"
    assert b'"task_id": %d' % big in seen[-1].content or b'"task_id":%d' % big in seen[-1].content
    with pytest.raises(InvalidRequest):
        submit(c, SubmitRequest("PAN", parent_task_id=str(big), index=1))


def test_fetch_parses_the_dialect_and_404_is_unknown() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/404/fetch"):
            return httpx.Response(404, json={})
        return httpx.Response(200, content=sample("mjproxy-success.json"))

    c = client(MjproxyClient, handler)
    update = asyncio.run(c.fetch("1689231405853400"))
    assert (update.status, update.provider_task_id) == (TaskStatus.SUCCESS, "1689231405853400")
    with pytest.raises(UnknownTask):
        asyncio.run(c.fetch("404"))
    omg = client(OhmygptClient, lambda r: httpx.Response(
        200, content=sample("ohmygpt-query-success.json")))
    assert asyncio.run(omg.fetch("20")).image_url is not None
    assert json.loads(seen[-1].content) == {"taskId": 20}


def test_transport_failures_say_whether_a_retry_is_safe() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def hang_up(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    with pytest.raises(ProviderDown) as before_sending:
        submit(client(OhmygptClient, refuse), IMAGINE)
    assert before_sending.value.retry_safe
    with pytest.raises(ProviderDown) as after_sending:
        submit(client(OhmygptClient, hang_up), IMAGINE)
    assert not after_sending.value.retry_safe  # it may have been queued: never resubmit blind
    for status, error in [(401, BadProviderKey), (429, QueueFull), (502, ProviderDown)]:
        with pytest.raises(error):
            submit(client(Aigc2dClient, answer({}, status)), IMAGINE)


def test_buttons_are_found_by_action_and_position() -> None:
    buttons = [{"custom_id": c} for c in (
        "MJ::JOB::upsample::1::h", "MJ::JOB::upsample::2::h", "MJ::JOB::variation::2::h",
        "MJ::JOB::reroll::0::h::SOLO", "MJ::Outpaint::50::1::h::SOLO",
        "MJ::JOB::high_variation::1::h::SOLO", "MJ::JOB::pan_left::1::h::SOLO")]
    assert find_button(buttons, "UPSCALE", 2) == "MJ::JOB::upsample::2::h"
    assert find_button(buttons, "VARIATION", 2) == "MJ::JOB::variation::2::h"
    assert find_button(buttons, "VARIATION", 3) is None
    assert find_button(buttons, "ZOOM", None) == "MJ::Outpaint::50::1::h::SOLO"
    assert find_button(buttons, "PAN", None) == "MJ::JOB::pan_left::1::h::SOLO"
    assert find_button(buttons, "REROLL", None) == "MJ::JOB::reroll::0::h::SOLO"


def test_requests_are_checked_before_sending() -> None:
    seen.clear()
    c = client(OhmygptClient, answer({"statusCode": 200, "data": 1}))
    for bad in (SubmitRequest("UPSCALE", parent_task_id="abc", custom_id="MJ::JOB::upsample::1"),
                SubmitRequest("IMAGINE"), SubmitRequest("BLEND", images=["a"]),
                SubmitRequest("BLEND", images=["a"] * 6), SubmitRequest("DESCRIBE"),
                SubmitRequest("DANCE", prompt="x")):
        with pytest.raises(InvalidRequest):
            submit(c, bad)
    assert seen == []


def test_answers_without_a_task_id_are_refusals_or_ambiguous_never_a_crash() -> None:
    html = lambda request: httpx.Response(404, text="<html>Not Found</html>")  # noqa: E731
    with pytest.raises(InvalidRequest, match="refused the request \\(404\\)"):
        submit(client(MjproxyClient, html), IMAGINE)  # nothing was queued: fail the task
    for odd in ([], {"code": 1, "description": "ok", "result": None}, {"code": 1, "result": []}):
        with pytest.raises(ProviderDown) as caught:  # said yes, or something: not resent
            submit(client(MjproxyClient, answer(odd)), IMAGINE)
        assert not caught.value.retry_safe
