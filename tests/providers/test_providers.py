"""Provider clients against the providers' answers (httpx.MockTransport stands in for the
providers' hosts; the simulator tests cover whole lifecycles over real sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.core.models import TaskStatus
from receiver.providers import (
    Aigc2dClient,
    BadProviderKey,
    BannedPrompt,
    CannotCancel,
    InvalidRequest,
    MjproxyClient,
    ModeMismatch,
    OhmygptClient,
    ProviderClient,
    ProviderDown,
    ProviderError,
    QueueFull,
    SubmitRequest,
    Transient,
    UnknownParent,
    UnknownTask,
    find_button,
)
from tests.conftest import sample
from tests.fixtures_providers import ProviderFixture, load_fixtures

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
    assert seen[-1].headers["authorization"] == "sk-test"  # trueai compares the whole header
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
        ({"code": 9, "description": "提交失败\uff0c队列已满\uff0c请稍后重试"}, QueueFull),
        ({"code": 24, "description": "可能包含敏感词", "properties": {"bannedWord": "gore"}},
         BannedPrompt),
        ({"code": 3, "description": "关联任务不存在或已失效"}, UnknownParent),
        ({"code": 3, "description": "无可用的账号实例"}, Transient),
        ({"code": 9, "description": "提交失败\uff0c系统异常"}, Transient),
        ({"code": 4, "description": "prompt too long"}, InvalidRequest),
        ({"success": False, "code": -1, "message": "该任务不支持重新生成",
          "timestamp": 1700000000000}, InvalidRequest),
        ({"success": False, "code": -1, "message": "队列数已达上限",
          "timestamp": "638476269330451234"}, QueueFull),
        ({"success": False, "code": -1, "message": "用户今日绘图次数已达上限",
          "timestamp": "638476269330451234"}, InvalidRequest),
    ],
)
def test_mjproxy_refusals(body: dict[str, Any], error: type[Exception]) -> None:
    c = client(MjproxyClient, answer(body))
    request = SubmitRequest("VARIATION", parent_task_id="1", custom_id="MJ::JOB::variation::1")
    with pytest.raises(error) as caught:
        submit(c, request)
    said = body.get("description") or body.get("message")
    assert said in caught.value.detail  # the provider's own words are kept
    if error is BannedPrompt:
        assert caught.value.word == "gore"  # type: ignore[attr-defined]


def test_ohmygpt_submit_and_refusals() -> None:
    seen.clear()
    c = client(OhmygptClient, answer(json.loads(sample("ohmygpt-submit-response.json"))))
    assert submit(c, SubmitRequest("IMAGINE", prompt="fox", mode="NORMAL")) == "2"
    assert seen[-1].url.path == "/api/v1/ai/draw/mj/imagine"
    assert json.loads(seen[-1].content) == {"model": "midjourney", "type": "NORMAL",
                                            "webhook": "https://r/cb", "prompt": "fox"}
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
    with pytest.raises(InvalidRequest, match="refused the request \\(HTTP 404\\)"):
        submit(client(MjproxyClient, html), IMAGINE)  # nothing was queued: fail the task
    for odd in ([], {"code": 1, "description": "ok", "result": None}, {"code": 1, "result": []}):
        with pytest.raises(ProviderDown) as caught:  # said yes, or something: not resent
            submit(client(MjproxyClient, answer(odd)), IMAGINE)
        assert not caught.value.retry_safe


# --- the two midjourney-proxy generations, dialogs, polling, cancel ------------------------

def routed(routes: dict[str, Any]) -> Handler:
    """Answer by path: a dict/list is JSON, bytes an exact body, an int an empty status."""
    def handler(request: httpx.Request) -> httpx.Response:
        reply = routes[request.url.path]
        if isinstance(reply, int):
            return httpx.Response(reply)
        if isinstance(reply, bytes):
            return httpx.Response(200, content=reply)
        return httpx.Response(200, json=reply)
    return handler


def test_trueai_dialog_is_completed_through_modal() -> None:
    seen.clear()
    c = client(MjproxyClient, routed({
        "/mj-fast/mj/submit/action": {"code": 21, "description": "Waiting for window confirm",
                                      "result": "77", "properties": {"remix": True}},
        "/mj-fast/mj/submit/modal": {"code": 1, "description": "提交成功", "result": "77"}}))
    zoom = SubmitRequest("ZOOM", prompt="a fox --zoom 1.5", parent_task_id="5",
                         custom_id="MJ::CustomZoom::abc", mode="FAST")
    assert submit(c, zoom) == "77"
    assert [r.url.path for r in seen] == ["/mj-fast/mj/submit/action", "/mj-fast/mj/submit/modal"]
    assert json.loads(seen[0].content) == {"customId": "MJ::CustomZoom::abc", "taskId": "5",
                                           "notifyHook": "https://r/cb"}
    assert json.loads(seen[1].content) == {"taskId": "77", "prompt": "a fox --zoom 1.5"}
    seen.clear()
    region = SubmitRequest("VARIATION", parent_task_id="5", custom_id="MJ::Inpaint::1::abc::SOLO",
                           mode="FAST", mask="data:image/png;base64,iVBORw0KGgo=")
    assert submit(c, region) == "77"
    assert json.loads(seen[1].content) == {"taskId": "77",
                                           "maskBase64": "data:image/png;base64,iVBORw0KGgo="}
    seen.clear()  # a prompt on a variation opens the remix dialog
    remix = SubmitRequest("VARIATION", prompt="in snow", parent_task_id="5",
                          custom_id="MJ::JOB::variation::1::abc", mode="FAST")
    submit(c, remix)
    assert json.loads(seen[0].content)["enableRemix"] is True
    refused = client(MjproxyClient, routed({
        "/mj/submit/action": {"code": 21, "result": "78"},
        "/mj/submit/modal": {"code": 4, "description": "prompt不能为空"}}))
    with pytest.raises(InvalidRequest, match="prompt不能为空"):
        submit(refused, SubmitRequest("ZOOM", parent_task_id="5", custom_id="MJ::CustomZoom::x"))


def test_novicezk_sends_changes_by_action_and_index_with_no_modes() -> None:
    seen.clear()
    c = client(MjproxyClient, answer({"code": 1, "result": "11"}), flavor="novicezk")
    assert c.modes == ()
    submit(c, SubmitRequest("UPSCALE", parent_task_id="5", custom_id="MJ::JOB::upsample::2::5"))
    submit(c, SubmitRequest("REROLL", parent_task_id="5",
                            custom_id="MJ::JOB::reroll::0::5::SOLO"))
    assert [r.url.path for r in seen] == ["/mj/submit/change"] * 2
    assert json.loads(seen[0].content) == {"taskId": "5", "action": "UPSCALE", "index": 2,
                                           "notifyHook": "https://r/cb"}
    assert json.loads(seen[1].content) == {"taskId": "5", "action": "REROLL",
                                           "notifyHook": "https://r/cb"}
    seen.clear()
    for bad in (SubmitRequest("IMAGINE", prompt="x", mode="FAST"),
                SubmitRequest("ZOOM", parent_task_id="5", custom_id="MJ::Outpaint::50::1::5")):
        with pytest.raises(InvalidRequest):
            submit(c, bad)
    assert seen == []  # refused before anything was sent
    exists = client(MjproxyClient, answer({"code": 21, "description": "任务已存在",
                                           "result": "42", "properties": {"status": "SUCCESS"}}),
                    flavor="novicezk")
    assert submit(exists, SubmitRequest("UPSCALE", parent_task_id="5",
                                        custom_id="MJ::JOB::upsample::1::5")) == "42"
    with pytest.raises(ValueError, match="MJPROXY_FLAVOR"):
        client(MjproxyClient, answer({}), flavor="plus")


@pytest.mark.parametrize(("status", "error"), [(401, BadProviderKey), (403, BadProviderKey),
                                               (429, Transient)])
def test_empty_refusals_by_status(status: int, error: type[ProviderError]) -> None:
    with pytest.raises(error) as caught:
        submit(client(MjproxyClient, routed({"/mj/submit/imagine": status})), IMAGINE)
    assert caught.value.retry_safe  # refused before anything was queued


def test_unknown_parent_is_a_404_with_code_3_on_trueai() -> None:
    c = client(MjproxyClient, lambda r: httpx.Response(
        404, json={"code": 3, "description": "关联任务不存在或已失效", "result": None}))
    with pytest.raises(UnknownParent, match="关联任务不存在或已失效"):
        submit(c, SubmitRequest("UPSCALE", parent_task_id="9", custom_id="MJ::JOB::upsample::1"))


@pytest.mark.parametrize("reply", [b"", 204, 404], ids=["novicezk-empty-200", "trueai-204", "404"])
def test_a_task_the_provider_does_not_know(reply: Any) -> None:
    c = client(MjproxyClient, routed({"/mj/task/7/fetch": reply}))
    with pytest.raises(UnknownTask):
        asyncio.run(c.fetch("7"))


def test_list_by_condition_polls_many_tasks_in_one_request() -> None:
    seen.clear()
    task = json.loads(sample("mjproxy-success.json"))
    c = client(MjproxyClient, routed({"/mj/task/list-by-condition": [task]}))
    answers = asyncio.run(c.fetch_many([task["id"], "404404"]))
    assert len(seen) == 1 and json.loads(seen[0].content) == {"ids": [task["id"], "404404"]}
    assert answers["404404"] is None
    found = answers[task["id"]]
    assert found is not None and found.status is TaskStatus.SUCCESS
    # a relay without the route: one fetch each
    old = client(MjproxyClient, routed({"/mj/task/list-by-condition": 404,
                                        f"/mj/task/{task['id']}/fetch": sample(
                                            "mjproxy-success.json"),
                                        "/mj/task/404404/fetch": b""}))
    answers = asyncio.run(old.fetch_many([task["id"], "404404"]))
    assert answers["404404"] is None and answers[task["id"]] is not None


def test_cancel_on_trueai_and_nowhere_else() -> None:
    seen.clear()
    canceled = {**json.loads(sample("mjproxy-progress.json")), "id": "7",
                "status": "FAILURE", "failReason": "取消任务", "progress": ""}
    c = client(MjproxyClient, routed({"/mj/task/7/cancel": b"", "/mj/task/7/fetch": canceled}))
    update = asyncio.run(c.cancel("7"))
    assert [r.url.path for r in seen] == ["/mj/task/7/cancel", "/mj/task/7/fetch"]
    assert update is not None and update.status in (TaskStatus.CANCEL, TaskStatus.FAILURE)
    for other in (client(MjproxyClient, answer({}), flavor="novicezk"),
                  client(OhmygptClient, answer({})), client(Aigc2dClient, answer({}))):
        with pytest.raises(CannotCancel):
            asyncio.run(other.cancel("7"))


def test_ohmygpt_sends_its_real_image_fields() -> None:
    seen.clear()
    c = client(OhmygptClient, answer({"statusCode": 200, "message": "Success", "data": 3}))
    png = "data:image/png;base64,iVBORw0KGgo="
    submit(c, SubmitRequest("IMAGINE", prompt="fox", images=[png]))
    submit(c, SubmitRequest("DESCRIBE", images=[png]))
    submit(c, SubmitRequest("BLEND", images=[png] * 4, dimensions="PORTRAIT"))
    submit(c, SubmitRequest("VARIATION", parent_task_id="2", custom_id="MJ::Inpaint::1::h",
                            mask=png))
    bodies = [json.loads(r.content) for r in seen]
    assert all(b["model"] == "midjourney" and b["type"] == "FAST" for b in bodies)
    assert bodies[0]["base64Array"] == [png] and "image" not in bodies[0]
    assert bodies[1]["base64"] == png and "image" not in bodies[1]
    assert bodies[2]["base64Array"] == [png] * 4 and "images" not in bodies[2]
    assert bodies[3] == {"model": "midjourney", "type": "FAST", "webhook": "https://r/cb",
                         "taskId": 2, "customId": "MJ::Inpaint::1::h", "base64Mask": png}
    seen.clear()
    with pytest.raises(InvalidRequest, match="2 to 4"):
        submit(c, SubmitRequest("BLEND", images=[png] * 5))
    assert seen == []


# --- every documented answer, from the fixtures built from the providers' sources ----------

EXPECTED: dict[str, type[ProviderError] | None] = {  # None: accepted, the id returned
    "answer-submitted": None, "answer-queued": None, "answer-code21-exists": None,
    "answer-code21-modal": None,  # completed through /mj/submit/modal
    "answer-queue-full": QueueFull, "answer-failure-system": Transient,
    "answer-transient-no-instance": Transient, "answer-transient-instance-down": Transient,
    "answer-banned": BannedPrompt, "answer-parent-not-found": UnknownParent,
    "answer-validation-base64": InvalidRequest, "answer-validation-parent-state": InvalidRequest,
    "answer-logic-exception": QueueFull,  # the user's concurrency limit: wait, not fail
    "http-401-unauthorized": BadProviderKey,
    "http-403-blacklisted": BadProviderKey, "http-429-rate-limited": Transient,
}
MJPROXY_ANSWERS = [f for f in load_fixtures("mjproxy")
                   if f.kind in ("answer", "http")]


def test_every_mjproxy_answer_fixture_is_classified() -> None:
    assert {f.name for f in MJPROXY_ANSWERS} <= set(EXPECTED)
    assert len(MJPROXY_ANSWERS) >= 20


@pytest.mark.parametrize("fixture", MJPROXY_ANSWERS, ids=lambda f: f.id)
def test_mjproxy_answers_from_the_sources(fixture: ProviderFixture) -> None:
    seen.clear()
    modal = {"code": 1, "description": "提交成功", "result": "modal-id"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/modal"):
            return httpx.Response(200, json=modal)
        return httpx.Response(fixture.http_status, content=fixture.body_bytes)

    assert fixture.flavour is not None
    c = client(MjproxyClient, handler, flavor=fixture.flavour)
    request = SubmitRequest("UPSCALE", parent_task_id="1", custom_id="MJ::JOB::upsample::1::h")
    expected = EXPECTED[fixture.name]
    if expected is None:
        result = fixture.body["result"] if fixture.name != "answer-code21-modal" else "modal-id"
        assert submit(c, request) == result
        return
    with pytest.raises(expected) as caught:
        submit(c, request)
    said = (fixture.body or {}).get("description") or (fixture.body or {}).get("message")
    if said:
        assert said in caught.value.detail  # the provider's words are never lost
