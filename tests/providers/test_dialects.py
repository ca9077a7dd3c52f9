"""Every sample in shared/samples parses; the seeds' shapes and edge cases too."""

from __future__ import annotations

import contextlib
import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.core.errors import InvalidPayload
from receiver.core.models import TaskStatus
from receiver.providers.dialects import DIALECTS, parse_aigc2d, parse_mjproxy, parse_ohmygpt
from tests.conftest import SAMPLES, sample

# Sample files that are not task payloads (answers to a submit) and must be refused as one.
NOT_TASKS = {"mjproxy-submit-response.json", "ohmygpt-submit-response.json"}


def test_every_sample_file_is_covered() -> None:
    names = {p.name for p in SAMPLES.glob("*.json")}
    assert names, "no samples found"
    for name in names:
        provider = name.split("-")[0]
        assert provider in DIALECTS, name
        if name in NOT_TASKS:
            with pytest.raises(InvalidPayload):
                DIALECTS[provider](sample(name))
        else:
            update = DIALECTS[provider](sample(name))
            assert update.provider_task_id
            assert update.raw == sample(name)


def test_mjproxy_progress() -> None:
    u = parse_mjproxy(sample("mjproxy-progress.json"))
    assert u.status is TaskStatus.IN_PROGRESS
    assert u.progress == 45
    assert u.provider_task_id == "1689231405853400"
    assert u.action == "IMAGINE"
    assert u.prompt == "猫猫"
    assert u.final_prompt == "Cat"
    assert u.image_url == "https://cdn.discordapp.com/attachments/1/2/preview.webp"
    assert u.submitted_at == "2023-07-13T06:56:45.854Z"
    assert u.started_at == "2023-07-13T06:57:22.755Z"
    assert u.finished_at is None
    assert u.buttons == []


def test_mjproxy_success_has_buttons_and_full_progress() -> None:
    u = parse_mjproxy(sample("mjproxy-success.json"))
    assert u.status is TaskStatus.SUCCESS
    assert u.progress == 100
    assert u.image_urls == ["https://cdn.discordapp.com/attachments/1/2/grid.png"]
    assert u.buttons is not None
    assert [b["label"] for b in u.buttons] == ["U1", "V1", ""]
    assert u.buttons[2] == {
        "custom_id": "MJ::JOB::reroll::0::9f1c0a6e-5d1b-4c3e-8f0a-2b7d4e6a1c90::SOLO",
        "label": "",
        "emoji": "🔄",
    }
    assert u.finished_at == "2023-07-13T06:59:04.312Z"


def test_mjproxy_failure_keeps_reason_and_has_no_progress() -> None:
    u = parse_mjproxy(sample("mjproxy-failure.json"))
    assert u.status is TaskStatus.FAILURE
    assert u.progress is None  # "" on failure: the stored progress is kept
    assert u.fail_reason is not None and u.fail_reason.startswith("[Banned prompt]")
    assert "progress" not in u.fields()


def test_ohmygpt_wrapped_and_bare_give_the_same_task() -> None:
    wrapped = sample("ohmygpt-query-success.json")
    bare = orjson.dumps(json.loads(wrapped)["data"])
    for body in (wrapped, bare):
        u = parse_ohmygpt(body)
        assert u.provider_task_id == "20"
        assert u.status is TaskStatus.SUCCESS
        assert u.mode == "NORMAL"
        assert u.progress == 100
        assert u.image_url == "https://cdn.discordapp.com/attachments/1/2/fox.png"
        assert u.submitted_at == "2023-08-31T13:59:14.000Z"
        assert u.finished_at == "2023-08-31T14:00:31.000Z"
        assert u.buttons is not None and [b["label"] for b in u.buttons] == ["U1", "V2"]


def test_ohmygpt_prefers_s3_url_and_keeps_both() -> None:
    doc = json.loads(sample("ohmygpt-query-success.json"))["data"]
    doc["imageS3Url"] = "https://s3.example/fox.png"
    u = parse_ohmygpt(orjson.dumps(doc))
    assert u.image_url == "https://s3.example/fox.png"
    assert u.image_urls == ["https://s3.example/fox.png", doc["imageDcUrl"]]


def test_aigc2d_id_past_2_to_the_53_stays_exact() -> None:
    u = parse_aigc2d(sample("aigc2d-success.json"))
    assert u.provider_task_id == "442275063214085100"
    assert int(u.provider_task_id) == 442275063214085100


def test_id_past_64_bits_stays_exact() -> None:
    body = b'{"task_id": 123456789012345678901234567890, "status": "SUCCESS"}'
    assert parse_aigc2d(body).provider_task_id == "123456789012345678901234567890"
    wrapped = b'{"data": {"taskId": 98765432109876543210987, "status": "SUBMITTED"}}'
    assert parse_ohmygpt(wrapped).provider_task_id == "98765432109876543210987"


def test_aigc2d_times_are_utc8_and_point_is_cost() -> None:
    u = parse_aigc2d(sample("aigc2d-success.json"))
    assert u.submitted_at == "2023-07-23T12:01:53.000Z"  # 20:01:53 in UTC+8
    assert u.finished_at == "2023-07-23T12:02:42.000Z"
    assert u.cost == {"amount": 100, "unit": "points"}
    assert u.image_urls == ["https://mjcdn.aigc2d.com/xxxxxx"]


def test_aigc2d_failure_reason_from_message() -> None:
    body = b'{"code": 0, "message": "prompt banned", "task_id": 7, "status": "FAILURE"}'
    assert parse_aigc2d(body).fail_reason == "prompt banned"


@pytest.mark.parametrize(
    ("provider", "body", "why"),
    [
        ("mjproxy", b"not json", "not JSON"),
        ("mjproxy", b"[1, 2]", "not a JSON object"),
        ("mjproxy", b'{"id": "1"}', "no status"),
        ("mjproxy", b'{"id": "1", "status": "DANCING"}', "unknown task status"),
        ("mjproxy", b'{"status": "SUCCESS"}', "no id"),
        ("mjproxy", b'{"id": "", "status": "SUCCESS"}', "id"),
        ("mjproxy", b'{"id": true, "status": "SUCCESS"}', "no id"),
        ("aigc2d", b'{"task_id": 1.5, "status": "SUCCESS"}', "task_id"),
        ("ohmygpt", b'{"statusCode": 200, "data": 2}', "no status"),
    ],
)
def test_bad_bodies_are_refused(provider: str, body: bytes, why: str) -> None:
    with pytest.raises(InvalidPayload, match=why):
        DIALECTS[provider](body)


def test_lowercase_status_and_numeric_progress() -> None:
    u = parse_mjproxy(b'{"id": 5, "status": "in_progress", "progress": 62.5}')
    assert (u.status, u.progress, u.provider_task_id) == (TaskStatus.IN_PROGRESS, 62, "5")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_an_update_or_invalid_payload(body: bytes) -> None:
    for provider in DIALECTS:
        try:
            update = DIALECTS[provider](body)
        except InvalidPayload:
            continue
        assert update.provider_task_id


ANY_VALUE = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.lists(st.integers() | st.text(max_size=5) | st.dictionaries(
        st.sampled_from(["customId", "label", "emoji", "url"]), st.text(max_size=5)), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers())
)
FIELDS = ["progress", "imageUrl", "imageUrls", "buttons", "actions", "submitTime", "startTime",
          "finishTime", "submit_time", "finish_time", "properties", "point", "failReason",
          "fail_reason", "message", "imageDcUrl", "imageS3Url", "image_url", "taskType",
          "prompt", "action"]


@given(
    st.sampled_from([s.value for s in TaskStatus] + ["in_progress", " success "]),
    st.integers(0, 2**80) | st.text(min_size=1, max_size=30),
    st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE),
    st.booleans(),
)
def test_any_field_values_give_an_update_or_a_400(
    status: str, task_id: object, fields: dict[str, object], wrap: bool
) -> None:
    """Past the status and id, every other field may be anything: never a 500."""
    for provider, key in (("mjproxy", "id"), ("ohmygpt", "taskId"), ("aigc2d", "task_id")):
        doc: dict[str, object] = {**fields, "status": status, key: task_id}
        body = json.dumps({"data": doc} if wrap and provider == "ohmygpt" else doc).encode()
        with contextlib.suppress(InvalidPayload):
            update = DIALECTS[provider](body)
            assert update.progress is None or 0 <= update.progress <= 100
            update.fields()


@pytest.mark.parametrize(
    ("provider", "extra"),
    [
        ("mjproxy", {"progress": "²%"}),
        ("mjproxy", {"progress": "1e999"}),
        ("mjproxy", {"progress": "-inf"}),
        ("mjproxy", {"submitTime": 10**30}),
        ("ohmygpt", {"submitTime": "0001-01-01T00:00:00+01:00"}),
        ("ohmygpt", {"finishTime": "9999-12-31T23:59:59-01:00"}),
        ("aigc2d", {"submit_time": "0001-01-01 00:00:00"}),
    ],
)
def test_values_out_of_range_are_dropped_not_a_crash(
    provider: str, extra: dict[str, object]
) -> None:
    key = {"mjproxy": "id", "ohmygpt": "taskId", "aigc2d": "task_id"}[provider]
    update = DIALECTS[provider](json.dumps({key: 1, "status": "IN_PROGRESS", **extra}).encode())
    assert (update.progress, update.submitted_at, update.finished_at) == (None, None, None)


def test_years_before_1000_are_zero_padded() -> None:
    body = b'{"task_id": 1, "status": "SUCCESS", "submit_time": "0999-01-01 08:00:00"}'
    assert parse_aigc2d(body).submitted_at == "0999-01-01T00:00:00.000Z"


# --- DESCRIBE: the text is the output, the image the input ----------------------------------

DESCRIBED = ("1️⃣ A ginger cat on a windowsill --ar 4:3\n\n2️⃣ an orange tabby cat --ar 4:3"
             "\n\n3️⃣ cat by the window, watercolor --ar 4:3\n\n4️⃣ a cute cat portrait --ar 4:3")
INPUT_IMAGE = "https://cdn.discordapp.com/attachments/1/2/1712030400123456.png"


def test_mjproxy_novicezk_describe_text_is_the_final_prompt_and_the_image_is_dropped() -> None:
    # DescribeSuccessHandler: prompt = promptEn = finalPrompt = the text; imageUrl = the input
    body = orjson.dumps({
        "id": "1712030400123456", "action": "DESCRIBE", "status": "SUCCESS",
        "prompt": DESCRIBED, "promptEn": DESCRIBED, "imageUrl": INPUT_IMAGE,
        "progress": "100%", "properties": {"finalPrompt": DESCRIBED}})
    u = parse_mjproxy(body)
    assert u.final_prompt == DESCRIBED
    assert (u.prompt, u.image_url, u.image_urls, u.buttons) == (None, None, None, None)
    assert not {"prompt", "image_url", "image_urls"} & set(u.fields())


def test_mjproxy_trueai_describe_keeps_its_crlf_text_as_written() -> None:
    # TaskInfo.SetDescribeButtions: promptEn and finalPrompt joined by "\r\n", prompt null
    joined = DESCRIBED.replace("\n\n", "\r\n")
    body = orjson.dumps({
        "id": "1712030400123777", "action": "DESCRIBE", "status": "SUCCESS", "prompt": None,
        "promptEn": joined, "imageUrl": INPUT_IMAGE,
        "imageUrls": [{"url": INPUT_IMAGE, "thumbnail": None}],
        "properties": {"finalPrompt": joined},
        "buttons": [{"customId": "MJ::Job::PicReader::1", "emoji": "1️⃣", "label": ""}]})
    u = parse_mjproxy(body)
    assert u.final_prompt == joined  # not re-joined, not split
    assert (u.prompt, u.image_url, u.image_urls) == (None, None, None)
    assert u.buttons == [{"custom_id": "MJ::Job::PicReader::1", "label": "", "emoji": "1️⃣"}]


def test_mjproxy_describe_under_way_has_no_prompt_or_image_either() -> None:
    body = orjson.dumps({"id": "7", "action": "DESCRIBE", "status": "IN_PROGRESS",
                         "progress": "0%", "imageUrl": INPUT_IMAGE, "prompt": None})
    u = parse_mjproxy(body)
    assert (u.prompt, u.final_prompt, u.image_url, u.image_urls) == (None, None, None, None)


def test_mjproxy_describe_text_only_in_prompt_is_still_the_final_prompt() -> None:
    body = orjson.dumps({"id": "7", "action": "describe", "status": "SUCCESS",
                         "prompt": DESCRIBED})
    u = parse_mjproxy(body)
    assert (u.final_prompt, u.prompt) == (DESCRIBED, None)


@pytest.mark.parametrize(
    ("provider", "doc"),
    [
        ("ohmygpt", {"taskId": 22, "imageDcUrl": INPUT_IMAGE, "imageS3Url": INPUT_IMAGE}),
        ("aigc2d", {"task_id": 442275063214085303, "image_url": INPUT_IMAGE}),
    ],
)
def test_ohmygpt_and_aigc2d_describe_drop_the_input_image(
    provider: str, doc: dict[str, object]
) -> None:
    body = orjson.dumps({**doc, "action": "DESCRIBE", "status": "SUCCESS",
                         "prompt": DESCRIBED})
    u = DIALECTS[provider](body)
    assert (u.final_prompt, u.prompt) == (DESCRIBED, None)
    assert (u.image_url, u.image_urls) == (None, None)


# --- novicezk grids get the buttons its API offers by name ----------------------------------

NZ_ID = "1712030133045210"
NZ_GRID_BUTTONS = [
    *({"custom_id": f"MJ::JOB::upsample::{i}::{NZ_ID}", "label": f"U{i}", "emoji": ""}
      for i in range(1, 5)),
    {"custom_id": f"MJ::JOB::reroll::0::{NZ_ID}::SOLO", "label": "", "emoji": "🔄"},
    *({"custom_id": f"MJ::JOB::variation::{i}::{NZ_ID}", "label": f"V{i}", "emoji": ""}
      for i in range(1, 5)),
]


def _novicezk(status: str, action: str, **extra: object) -> bytes:
    """A novicezk Task as Jackson writes it: no buttons key at all."""
    return orjson.dumps({"id": NZ_ID, "properties": {}, "action": action, "status": status,
                         "progress": "100%" if status == "SUCCESS" else "0%", **extra})


@pytest.mark.parametrize("action", ["IMAGINE", "VARIATION", "REROLL", "BLEND"])
def test_novicezk_grid_without_a_buttons_key_gets_midjourneys_buttons(action: str) -> None:
    u = parse_mjproxy(_novicezk("SUCCESS", action))
    assert u.buttons == NZ_GRID_BUTTONS  # U1-U4, reroll, V1-V4


@pytest.mark.parametrize(
    ("status", "action", "extra", "want"),
    [
        ("SUCCESS", "UPSCALE", {}, None),  # not a grid: novicezk refuses it as a parent
        ("SUCCESS", "DESCRIBE", {}, None),
        ("IN_PROGRESS", "IMAGINE", {}, None),  # not finished
        ("FAILURE", "IMAGINE", {}, None),
        ("SUCCESS", "IMAGINE", {"buttons": []}, []),  # trueai said "none": believe it
    ],
)
def test_no_buttons_are_made_up_otherwise(
    status: str, action: str, extra: dict[str, object], want: object
) -> None:
    assert parse_mjproxy(_novicezk(status, action, **extra)).buttons == want


def test_grid_buttons_are_fresh_dicts_built_once_per_id() -> None:
    from receiver.providers.dialects import _grid_button_parts

    _grid_button_parts.cache_clear()
    first = parse_mjproxy(_novicezk("SUCCESS", "IMAGINE"))
    assert first.buttons is not None
    first.buttons[0]["label"] = "changed"
    again = parse_mjproxy(_novicezk("SUCCESS", "IMAGINE"))
    assert again.buttons == NZ_GRID_BUTTONS
    info = _grid_button_parts.cache_info()
    assert (info.misses, info.hits) == (1, 1)


# --- trueai's cancel, text progress, AIGC2D's empty image -----------------------------------


def test_trueai_cancel_reason_is_a_cancel() -> None:
    body = orjson.dumps({"id": "1712030600333444", "status": "FAILURE", "progress": "",
                         "failReason": "取消任务", "action": "IMAGINE"})
    u = parse_mjproxy(body)
    assert u.status is TaskStatus.CANCEL
    assert u.fail_reason == "取消任务"
    assert u.fields()["status"] == "CANCEL"


@pytest.mark.parametrize("reason", ["取消任务 ", "任务取消", "任务超时", "可能包含敏感词", None])
def test_other_failures_stay_failures(reason: str | None) -> None:
    body = orjson.dumps({"id": "1", "status": "FAILURE", "failReason": reason})
    assert parse_mjproxy(body).status is TaskStatus.FAILURE


@pytest.mark.parametrize(
    ("progress", "want"),
    [("Waiting to start", None), ("0%", 0), ("", None), ("45%", 45), ("100%", 100),
     ("Stopped", None), ("paused", None), ("relaxed", None), (None, None)],
)
def test_text_progress_is_a_number_or_none(progress: str | None, want: int | None) -> None:
    # novicezk copies the text in the Discord message's parentheses into progress
    body = orjson.dumps({"id": "1", "status": "IN_PROGRESS", "progress": progress})
    u = parse_mjproxy(body)
    assert u.progress == want
    assert ("progress" in u.fields()) is (want is not None)


def test_aigc2d_empty_image_url_is_no_image() -> None:
    body = b'{"task_id": 7, "status": "IN_PROGRESS", "progress": "45%", "image_url": ""}'
    u = parse_aigc2d(body)
    assert (u.image_url, u.image_urls) == (None, None)
    assert "image_url" not in u.fields()
