"""Every provider fixture (tests/fixtures/providers, built from the providers' own sources)
through the dialects: the canonical fields each callback or fetched task must give.

Answers to a submit and bare HTTP refusals are for the provider-client tests; here they only
have to load, be consistent, and be refused as tasks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from receiver.core.errors import InvalidPayload
from receiver.core.models import TaskStatus, Update
from receiver.providers.dialects import DIALECTS
from tests.fixtures_providers import FIXTURES, ProviderFixture, load_fixture, load_fixtures

TOKEN = "FIXTURE.TOKEN.abc"
GRID_LABELS = ["U1", "U2", "U3", "U4", "", "V1", "V2", "V3", "V4"]
NZ_GRID = ("https://cdn.discordapp.com/attachments/1118138338562560102/1224630491735326770/"
           "user_Cat_5c8b1f2a-8d3e-4b7e-9a6f-0e1d2c3b4a59.png")
TA_JOB = "9f1c0a6e-5d1b-4c3e-8f0a-2b7d4e6a1c90"
TA_GRID = ("https://cdn.discordapp.com/attachments/1118138338562560102/1224630491735326771/"
           f"user_Cat_{TA_JOB}.png")
NZ_DESCRIBED = (
    "1️⃣ A fluffy ginger cat sitting on a sunny windowsill, soft pastel illustration --ar 4:3"
    "\n\n2️⃣ an orange tabby cat looking out of a window, in the style of studio ghibli"
    " --ar 4:3\n\n3️⃣ cat by the window, warm afternoon light, watercolor --ar 4:3"
    "\n\n4️⃣ a cute cat portrait, cozy home interior, muted colors --ar 4:3")
TA_DESCRIBED = NZ_DESCRIBED.replace("\n\n", "\r\n")

S = TaskStatus
# What each task a fixture carries must give, field by field (a list: one per task of a
# list-by-condition answer). "buttons" here is the labels; "button_ids" the custom ids.
EXPECT: dict[str, list[dict[str, Any]]] = {
    "mjproxy/novicezk/callback-submitted": [dict(
        status=S.SUBMITTED, progress=0, provider_task_id="1712030133045210", action="IMAGINE",
        prompt="猫猫", final_prompt="Cat", image_url=None, buttons=None,
        submitted_at="2024-04-02T03:55:33.045Z", started_at="2024-04-02T03:55:33.517Z",
        finished_at=None)],
    "mjproxy/novicezk/callback-in-progress-start": [dict(
        status=S.IN_PROGRESS, progress=0, final_prompt="Cat --v 6.0", buttons=None)],
    "mjproxy/novicezk/callback-in-progress-waiting": [dict(
        status=S.IN_PROGRESS, progress=None, image_url=None, buttons=None)],
    "mjproxy/novicezk/callback-in-progress": [dict(
        status=S.IN_PROGRESS, progress=45, buttons=None,
        image_url=("https://cdn.discordapp.com/attachments/1118138338562560102/"
                   "1224630412345678901/user_Cat_5c8b1f2a-8d3e-4b7e-9a6f-0e1d2c3b4a59.webp"))],
    "mjproxy/novicezk/callback-success-imagine": [dict(
        status=S.SUCCESS, progress=100, provider_task_id="1712030133045210", action="IMAGINE",
        prompt="猫猫", final_prompt="Cat --v 6.0", image_url=NZ_GRID, image_urls=[NZ_GRID],
        buttons=GRID_LABELS, finished_at="2024-04-02T03:56:31.779Z",
        button_ids=[*(f"MJ::JOB::upsample::{i}::1712030133045210" for i in range(1, 5)),
                    "MJ::JOB::reroll::0::1712030133045210::SOLO",
                    *(f"MJ::JOB::variation::{i}::1712030133045210" for i in range(1, 5))])],
    "mjproxy/novicezk/fetch-success-imagine": [dict(
        status=S.SUCCESS, progress=100, provider_task_id="1712030133045210",
        buttons=GRID_LABELS)],
    "mjproxy/novicezk/callback-success-upscale": [dict(
        status=S.SUCCESS, action="UPSCALE", provider_task_id="1712030215871044",
        buttons=None)],
    "mjproxy/novicezk/callback-success-blend": [dict(
        status=S.SUCCESS, action="BLEND", provider_task_id="1712030301122333",
        buttons=GRID_LABELS)],
    "mjproxy/novicezk/callback-failure": [dict(
        status=S.FAILURE, progress=None, fail_reason="[Invalid parameter] Invalid value",
        buttons=None)],
    "mjproxy/novicezk/callback-failure-timeout": [dict(
        status=S.FAILURE, progress=None, fail_reason="任务超时")],
    "mjproxy/novicezk/callback-describe": [dict(
        status=S.SUCCESS, action="DESCRIBE", provider_task_id="1712030400123456",
        prompt=None, final_prompt=NZ_DESCRIBED, image_url=None, image_urls=None,
        buttons=None)],
    "mjproxy/novicezk/list-by-condition": [
        dict(status=S.IN_PROGRESS, progress=45, provider_task_id="1712030133045210"),
        dict(status=S.SUCCESS, provider_task_id="1712030133045999", buttons=GRID_LABELS)],
    "mjproxy/trueai/callback-submitted": [dict(
        status=S.SUBMITTED, progress=0, provider_task_id="1712030133045777",
        prompt="猫猫 --v 6.1", final_prompt="Cat --v 6.1", buttons=[])],
    "mjproxy/trueai/callback-in-progress": [dict(
        status=S.IN_PROGRESS, progress=45, buttons=[])],
    "mjproxy/trueai/callback-success-imagine": [dict(
        status=S.SUCCESS, progress=100, provider_task_id="1712030133045777",
        prompt="猫猫 --v 6.1", final_prompt="Cat --v 6.1", image_url=TA_GRID,
        image_urls=[TA_GRID, *(f"https://cdn.midjourney.com/{TA_JOB}/0_{i}.png"
                               for i in range(4))],
        buttons=GRID_LABELS,
        button_ids=[*(f"MJ::JOB::upsample::{i}::{TA_JOB}" for i in range(1, 5)),
                    f"MJ::JOB::reroll::0::{TA_JOB}::SOLO",
                    *(f"MJ::JOB::variation::{i}::{TA_JOB}" for i in range(1, 5))])],
    "mjproxy/trueai/fetch-success-imagine": [dict(
        status=S.SUCCESS, provider_task_id="1712030133045777", buttons=GRID_LABELS)],
    "mjproxy/trueai/callback-failure": [dict(
        status=S.FAILURE, progress=None, fail_reason="可能包含敏感词")],
    "mjproxy/trueai/callback-describe": [dict(
        status=S.SUCCESS, action="DESCRIBE", provider_task_id="1712030400123777",
        prompt=None, final_prompt=TA_DESCRIBED, image_url=None, image_urls=None,
        buttons=["", "", "", ""],
        button_ids=[f"MJ::Job::PicReader::{i}" for i in range(1, 5)])],
    "mjproxy/trueai/fetch-modal": [dict(
        status=S.MODAL, progress=None, action="VARIATION", provider_task_id="1712030500111222",
        prompt="猫猫 --v 6.1", final_prompt="Cat --v 6.1", buttons=[], started_at=None)],
    "mjproxy/trueai/fetch-canceled": [dict(
        status=S.CANCEL, progress=None, fail_reason="取消任务",
        provider_task_id="1712030600333444")],
    "mjproxy/trueai/list-by-condition": [dict(
        status=S.SUCCESS, provider_task_id="1712030133045777", buttons=GRID_LABELS)],
    "ohmygpt/-/fetch-query-success": [dict(
        status=S.SUCCESS, progress=100, provider_task_id="20", mode="NORMAL",
        buttons=["U1", "V2"], image_url="https://cdn.discordapp.com/attachments/1/2/fox.png")],
    "ohmygpt/-/callback-bare": [dict(
        status=S.IN_PROGRESS, progress=45, provider_task_id="20", image_url=None,
        buttons=[])],
    "ohmygpt/-/callback-wrapped": [dict(
        status=S.SUCCESS, progress=100, provider_task_id="20", buttons=["U1", "V2"])],
    "ohmygpt/-/callback-failure": [dict(
        status=S.FAILURE, progress=None, provider_task_id="21",
        fail_reason=("[Banned prompt detected] Sorry! Our AI moderator thinks this prompt is "
                     "probably against our community standards."))],
    "ohmygpt/-/callback-describe": [dict(
        status=S.SUCCESS, action="DESCRIBE", provider_task_id="22", prompt=None,
        image_url=None, image_urls=None)],  # the text: test_ohmygpt_describe_text...
    "aigc2d/-/callback-success": [dict(
        status=S.SUCCESS, progress=100, provider_task_id="442275063214085100",
        image_url="https://mjcdn.aigc2d.com/xxxxxx", cost={"amount": 100, "unit": "points"},
        submitted_at="2023-07-23T12:01:53.000Z")],
    "aigc2d/-/callback-failure": [dict(
        status=S.FAILURE, progress=0, provider_task_id="442275063214085137",
        fail_reason="task timeout", image_url=None, image_urls=None)],
    "aigc2d/-/callback-in-progress": [dict(
        status=S.IN_PROGRESS, progress=45, provider_task_id="442275063214085201",
        image_url=None, image_urls=None, finished_at=None)],
    "aigc2d/-/callback-describe": [dict(
        status=S.SUCCESS, action="DESCRIBE", provider_task_id="442275063214085303",
        prompt=None, image_url=None, image_urls=None,
        final_prompt=("1️⃣ a cat --ar 1:1\n\n2️⃣ a kitten --ar 1:1\n\n"
                      "3️⃣ a cat portrait --ar 1:1\n\n4️⃣ cat, studio light --ar 1:1"))],
}
TASKS = load_fixtures(kind_prefix="callback") + load_fixtures(kind_prefix="fetch") \
    + load_fixtures(kind_prefix="list")
EMPTY = [f for f in TASKS if f.raw == ""]
NON_EMPTY = [f for f in TASKS if f.raw != ""]
NOT_TASKS = load_fixtures(kind_prefix="answer") + load_fixtures(kind_prefix="http")


def _bodies(fixture: ProviderFixture) -> list[bytes]:
    """The task bodies a fixture carries: itself, or each task of a list answer."""
    if isinstance(fixture.body, list):
        return [json.dumps(task, ensure_ascii=False).encode() for task in fixture.body]
    return [fixture.body_bytes]


def _parse(fixture: ProviderFixture) -> list[Update]:
    return [DIALECTS[fixture.provider](body) for body in _bodies(fixture)]


def _check(update: Update, expected: dict[str, Any]) -> None:
    for name, want in expected.items():
        if name == "buttons":
            got = None if update.buttons is None else [b["label"] for b in update.buttons]
        elif name == "button_ids":
            got = None if update.buttons is None else [b["custom_id"] for b in update.buttons]
        else:
            got = getattr(update, name)
        assert got == want, f"{name}: {got!r} != {want!r}"


def test_there_are_fixtures_of_every_provider_and_kind() -> None:
    every = load_fixtures()
    assert {(f.provider, f.flavour) for f in every} == {
        ("mjproxy", "novicezk"), ("mjproxy", "trueai"), ("ohmygpt", None), ("aigc2d", None)}
    assert {f.kind for f in every} == {"callback", "fetch", "list", "answer", "http"}
    assert not list(FIXTURES.glob("*/*/*/**/*.json")), "fixtures nest two levels deep only"


def test_every_task_fixture_has_expectations() -> None:
    assert {f.id for f in NON_EMPTY} == set(EXPECT)


@pytest.mark.parametrize("fixture", NON_EMPTY, ids=lambda f: f.id)
def test_task_fixture_gives_its_canonical_fields(fixture: ProviderFixture) -> None:
    updates = _parse(fixture)
    expected = EXPECT[fixture.id]
    assert len(updates) == len(expected)
    for update, want in zip(updates, expected, strict=True):
        _check(update, want)
        update.fields()  # and it can be stored


@pytest.mark.parametrize("fixture", NON_EMPTY, ids=lambda f: f.id)
def test_task_fixture_invariants(fixture: ProviderFixture) -> None:
    for body, update in zip(_bodies(fixture), _parse(fixture), strict=True):
        assert update.raw == body
        # The id exactly as the provider wrote it, digit for digit, as a string.
        assert isinstance(update.provider_task_id, str)
        text = body.decode()
        key = {"mjproxy": "id", "ohmygpt": "taskId", "aigc2d": "task_id"}[fixture.provider]
        assert re.search(rf'"{key}":\s*"?{update.provider_task_id}[",}}]', text), text[:200]
        if update.action == "DESCRIBE":
            assert update.prompt is None
            assert update.image_url is None and update.image_urls is None
            assert update.final_prompt
            assert update.final_prompt == _described_text(fixture.provider, body)
        if fixture.provider == "mjproxy" and update.status is TaskStatus.SUCCESS \
                and update.action in ("IMAGINE", "VARIATION", "REROLL", "BLEND"):
            assert update.buttons is not None
            assert [b["label"] for b in update.buttons] == GRID_LABELS


def _described_text(provider: str, body: bytes) -> str:
    """Where each provider writes a DESCRIBE's text, exactly as written (not re-joined)."""
    doc = json.loads(body)
    if provider == "mjproxy":
        return str(doc["properties"].get("finalPrompt") or doc["promptEn"] or doc["prompt"])
    return str(doc.get("data", doc)["prompt"])


def test_ohmygpt_describe_text_is_the_prompt_as_written() -> None:
    fixture = load_fixture("ohmygpt/-/callback-describe")
    update = DIALECTS["ohmygpt"](fixture.body_bytes)
    assert update.final_prompt == fixture.body["prompt"]
    assert update.final_prompt is not None and update.final_prompt.count("\n\n") == 3


@pytest.mark.parametrize("fixture", NON_EMPTY, ids=lambda f: f.id)
def test_unknown_fields_are_not_an_error(fixture: ProviderFixture) -> None:
    for body, update in zip(_bodies(fixture), _parse(fixture), strict=True):
        doc = orjson.loads(body)
        target = doc["data"] if fixture.name == "callback-wrapped" else doc
        target["someFieldFromANewerVersion"] = {"nested": [1, "二", None]}
        target["another_one"] = 1.5
        again = DIALECTS[fixture.provider](orjson.dumps(doc))
        again.raw = update.raw
        assert again == update


@pytest.mark.parametrize("fixture", EMPTY, ids=lambda f: f.id)
def test_an_empty_fetch_answer_is_not_a_task(fixture: ProviderFixture) -> None:
    """novicezk answers an unknown id 200 with an empty body, trueai 204: the client must
    see 'unknown' before it parses; the dialect refuses it."""
    assert fixture.body is None and fixture.body_bytes == b""
    assert fixture.http_status == {"novicezk": 200, "trueai": 204}[str(fixture.flavour)]
    with pytest.raises(InvalidPayload):
        DIALECTS[fixture.provider](fixture.body_bytes)


@pytest.mark.parametrize("fixture", NOT_TASKS, ids=lambda f: f.id)
def test_answers_load_and_are_not_tasks(fixture: ProviderFixture) -> None:
    assert fixture.http_status in (200, 401, 403, 404, 429)
    if fixture.body is not None:
        assert json.loads(fixture.body_bytes) == fixture.body
    with pytest.raises(InvalidPayload):
        DIALECTS[fixture.provider](fixture.body_bytes)


def test_fixture_files_are_consistent() -> None:
    for fixture in load_fixtures():
        doc = json.loads(fixture.path.read_text(encoding="utf-8"))
        assert set(doc) <= {"source", "note", "http_status", "body", "raw"}, fixture.id
        assert fixture.source and fixture.note, fixture.id
        if fixture.raw and fixture.body is not None:
            assert json.loads(fixture.raw) == fixture.body, fixture.id
        if fixture.flavour == "trueai" and fixture.body is not None:
            # System.Text.Json's default encoder: no raw non-ASCII byte leaves trueai
            assert fixture.raw is not None and fixture.raw.isascii(), fixture.id
        if fixture.flavour == "novicezk" and fixture.body is not None:
            assert fixture.raw is None  # Jackson's compact UTF-8 is the default encoding


def test_callbacks_echo_the_callback_url_with_its_token() -> None:
    for fixture in load_fixtures(kind_prefix="callback"):
        if fixture.provider == "aigc2d":
            continue  # its callback body has no such field
        doc = fixture.body.get("data", fixture.body)
        hook = doc["properties"]["notifyHook"] if fixture.provider == "mjproxy" \
            else doc["webhookUrl"]
        assert hook == f"http://127.0.0.1:8000/callbacks/{fixture.provider}?token={TOKEN}"


def test_ids_past_2_to_the_53_are_kept_exact_in_raw() -> None:
    for fixture in load_fixtures(provider="aigc2d"):
        assert fixture.raw is not None
        task_id = fixture.body["task_id"]
        assert task_id > 2**53 and f'"task_id":{task_id}' in fixture.raw
    odd = load_fixture("aigc2d/-/callback-failure")
    assert float(odd.body["task_id"]) != odd.body["task_id"]  # no double holds it


SOURCES = {"novicezk/midjourney-proxy": Path("/tmp/src/novicezk"),
           "trueai-org/midjourney-proxy": Path("/tmp/src/trueai")}


@pytest.mark.skipif(not all(p.is_dir() for p in SOURCES.values()),
                    reason="the providers' sources are not cloned in /tmp/src")
def test_sources_name_real_files_and_lines() -> None:
    for fixture in load_fixtures():
        repo, _, rest = fixture.source.partition(":")
        if repo == "shared":
            continue  # /work/shared/samples and seeds
        assert repo in SOURCES, fixture.source
        path, _, line = rest.partition(":")
        line = line.split(" @")[0]
        if " @" in rest:
            continue  # a line in an older commit
        file = SOURCES[repo] / path
        assert file.is_file(), fixture.source
        if line:
            assert int(line) <= len(file.read_text(encoding="utf-8").splitlines()), \
                fixture.source
