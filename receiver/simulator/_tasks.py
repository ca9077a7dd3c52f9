"""The simulator's nouns: a task, the request that made it, the buttons Midjourney offers.

One `SimTask` serves every provider: each dialect renders it (`_render`) and the engine
(`_engine`) walks it through its states, so a fact about a task lives in one place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, NamedTuple

AIGC2D_FIRST_ID = 442275063214085100  # past 2**53: JavaScript numbers cannot hold it
DESCRIBE_LINES = (
    "a small cat on a sunny windowsill, soft watercolor, pastel colors --ar 1:1",
    "an orange tabby looking out of a window, morning light, cozy interior --ar 1:1",
    "minimalist illustration of a cat by a window, flat colors, calm mood --ar 1:1",
    "photograph of a cat in warm sunlight, shallow depth of field, film grain --ar 1:1",
)
_KEYCAPS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣")
# What Midjourney's describe embed says: four numbered prompts, a blank line between them.
# novicezk copies it as is (DescribeSuccessHandler); trueai joins them with "\r\n"
# (TaskInfo.SetDescribeButtions).
DESCRIBE_TEXT = "\n\n".join(f"{n} {line}" for n, line in zip(_KEYCAPS, DESCRIBE_LINES,
                                                              strict=True))
DESCRIBE_TEXT_CRLF = "\r\n".join(f"{n} {line}" for n, line in zip(_KEYCAPS, DESCRIBE_LINES,
                                                                  strict=True))
FAIL_REASON = "[Simulated failure] Midjourney could not finish this job"
# Discord's answer to an interaction it refuses (a custom id the message does not carry,
# an index past 4): {"code": 50035, "message": "Invalid Form Body"}; both relays fail the
# task with the message.
DISCORD_REFUSED = "Invalid Form Body"
FINAL = frozenset({"SUCCESS", "FAILURE", "CANCEL"})


class Button(NamedTuple):
    custom_id: str
    label: str
    emoji: str


def grid_buttons(job: str) -> list[Button]:
    """What an image grid offers, in Midjourney's order: U1-U4, reroll, V1-V4."""
    return (
        [Button(f"MJ::JOB::upsample::{i}::{job}", f"U{i}", "") for i in range(1, 5)]
        + [Button(f"MJ::JOB::reroll::0::{job}::SOLO", "", "🔄")]
        + [Button(f"MJ::JOB::variation::{i}::{job}", f"V{i}", "") for i in range(1, 5)]
    )


def upscaled_buttons(job: str) -> list[Button]:
    """What an upscaled image offers: vary, vary region, zoom out, custom zoom, pan."""
    return [
        Button(f"MJ::JOB::high_variation::1::{job}::SOLO", "Vary (Strong)", "🪄"),
        Button(f"MJ::JOB::low_variation::1::{job}::SOLO", "Vary (Subtle)", "🪄"),
        Button(f"MJ::Inpaint::1::{job}::SOLO", "Vary (Region)", "🖌️"),
        Button(f"MJ::Outpaint::50::1::{job}::SOLO", "Zoom Out 2x", "🔍"),
        Button(f"MJ::Outpaint::75::1::{job}::SOLO", "Zoom Out 1.5x", "🔍"),
        Button(f"MJ::CustomZoom::{job}", "Custom Zoom", "🔍"),
        *(Button(f"MJ::JOB::pan_{d}::1::{job}::SOLO", "", e)
          for d, e in (("left", "⬅️"), ("right", "➡️"), ("up", "⬆️"), ("down", "⬇️"))),
    ]


def describe_buttons() -> list[Button]:
    """trueai's describe result (TaskInfo.SetDescribeButtions): one per prompt and a retry,
    labels emptied. Its retry emoji is written "\\u1F504" in C#, which is U+1F50 and a "4"."""
    return [*(Button(f"MJ::Job::PicReader::{n}", "", keycap)
              for n, keycap in enumerate(_KEYCAPS, start=1)),
            Button("MJ::Picread::Retry", "", "\u1f504")]


@dataclass(frozen=True)
class Submission:
    """A validated request, in the engine's terms (the dialect layer builds it)."""

    provider: str
    account: str
    mode: str
    action: str
    base_url: str
    prompt: str = ""
    callback_url: str | None = None
    state: str | None = None
    parent: SimTask | None = None
    button: Button | None = None
    custom_id: str | None = None  # the button pressed, as the request named it
    images: int = 0  # input images taken (uploaded by the relay)
    link: str | None = None  # trueai describe: the image's URL instead of a data URL
    description: str | None = None  # the relay's own description; else the engine's
    fail_at_start: str | None = None  # accepted, but refused once it runs
    modal: str | None = None  # trueai: parked in MODAL until its dialog is sent ("prompt"
    # for custom zoom and remix, "mask" for vary region)


class Outgoing(NamedTuple):
    url: str
    body: bytes
    content_type: str
    due: float  # loop time


@dataclass(eq=False)
class SimTask:
    provider: str
    id: int | str
    account: str
    mode: str
    action: str
    prompt: str
    description: str | None
    callback_url: str | None
    base_url: str
    submitted_at: float
    flavor: str = ""  # mjproxy: "trueai" or "novicezk"
    state: str | None = None
    parent_id: str | None = None
    custom_id: str | None = None
    status: str = "NOT_START"
    progress: int = 0
    image_url: str | None = None
    inputs: list[str] = field(default_factory=list)  # the uploaded input images' URLs
    final_prompt: str | None = None
    fail_reason: str | None = None
    buttons: list[Button] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    fails: bool = False
    fail_at_start: str | None = None
    needs: str | None = None  # trueai MODAL: what its dialog needs
    modal: dict[str, Any] | None = None  # trueai: what /mj/submit/modal sent
    nonce: str = ""
    instance_id: str = ""  # mjproxy: the Discord channel of the account
    message_id: str | None = None  # the finished Discord message
    progress_message_id: str | None = None
    job: str | None = None  # Midjourney's job hash (the buttons' and messageHash's)
    parent_final_prompt: str | None = None  # an action's finalPrompt until its own comes
    referenced_message_id: str | None = None  # novicezk: the parent's Discord message
    emitted: int = 0  # states rendered for callbacks (OhMyGPT alternates its wrapping)
    last_order: float | None = None  # mjproxy: the last state notified (status:progress)
    queued: bool = False  # counted in the account's unfinished tasks
    holds_slot: bool = False  # mjproxy: running in one of the account's slots
    held: Outgoing | None = None  # reorder: the callback that goes after the next one
    outbox: asyncio.Queue[Outgoing | None] | None = None
    runner: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return str(self.id)

    def image(self, suffix: str = "") -> str:
        return f"{self.base_url}/images/{self.provider}-{self.key}{suffix}.png"

    def order(self) -> float:
        """The relays' order of a status:progress (TaskStatus.order, plus the percentage):
        how both decide that a state is older than the last one notified."""
        base = {"NOT_START": 0.0, "SUBMITTED": 1.0, "MODAL": 2.0, "IN_PROGRESS": 3.0}
        if self.status == "IN_PROGRESS":
            return 3.0 + self.progress / 100
        return base.get(self.status, 4.0)
