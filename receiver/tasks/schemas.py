"""The tasks routes' request and response bodies, as typed models: requests are validated
by them (`receiver.services.http.json_model`), and ``/openapi.json`` is generated from them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic.json_schema import SkipJsonSchema

from receiver.core.constants import JOB_ID_RE
from receiver.core.models import EventKind
from receiver.core.schema import (
    EventId,
    JobId,
    Model,
    Task,
    TaskEvent,
    Tenant,
    ecma,
    extra,
    schema_extra,
)
from receiver.core.settings import PROVIDERS
from receiver.providers import ACTIONS

ALL_MODES = ("FAST", "NORMAL", "RELAX", "TURBO")  # what any provider offers
BUTTON_ACTIONS = ("UPSCALE", "VARIATION", "REROLL", "ZOOM", "PAN")
DIMENSIONS = ("PORTRAIT", "SQUARE", "LANDSCAPE")
MAX_PROMPT = 8192
MAX_IMAGE_TEXT = 16 * 1024 * 1024  # an image or mask given inline, as a data URL
MAX_PAGE = 200
MAX_FIELD = 8192  # a callback URL's fields

_PROVIDER = extra(enum=sorted(PROVIDERS))


def _blank_is_none(value: object) -> object:
    """A text given blank reads as not given (as the hand-written checks read it)."""
    return None if isinstance(value, str) and not value.strip() else value


def _stripped(value: object) -> object:
    text = _blank_is_none(value)
    return text.strip() if isinstance(text, str) else text


Blank = BeforeValidator(_blank_is_none)
Short = Annotated[str | None, Field(max_length=256)]
Image = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_TEXT)]
NotBlank = Annotated[str | None, Field(pattern="\\S", max_length=MAX_FIELD)]


class NewCallbackUrl(Model):
    provider: str = Field(json_schema_extra=_PROVIDER)
    action: NotBlank = Field(None, description="stored upper-case")
    mode: NotBlank = Field(None, description="stored upper-case")
    prompt: str | None = Field(None, max_length=MAX_FIELD)
    parent_id: str | None = Field(None, max_length=MAX_FIELD)
    provider_task_id: NotBlank = Field(
        None, description="binds the job to this provider task at once")


class CallbackUrl(Model):
    job_id: JobId
    callback_url: str = Field(json_schema_extra=extra(format="uri"),
                              description="give it to the provider as is")
    task: TaskEvent


class NewSubscribeToken(Model):
    task_id: JobId | None = Field(
        None, description="one task's events; leave it out for every task of the tenant")


class SubscribeToken(Model):
    token: str = Field(min_length=1)
    expires_in: int = Field(ge=1, description="seconds")
    events_url: str = Field(pattern="^/(tasks/[0-9a-f]{20}/)?events\\?token=",
                            json_schema_extra=extra(format="uri-reference"),
                            description="the event route, token included")


class TaskPage(Model):
    tasks: list[Task]
    next_cursor: JobId | None = Field(
        description="pass it back as cursor; null on the last page")


_NEW_TASK_KINDS = [
    {"description": "IMAGINE: a prompt", "required": ["prompt"],
     "not": {"required": ["parent_id"]},
     "properties": {"action": {"const": "IMAGINE"}, "prompt": {"pattern": "\\S"}}},
    {"description": "DESCRIBE: one image", "required": ["action", "images"],
     "not": {"required": ["parent_id"]},
     "properties": {"action": {"const": "DESCRIBE"}, "images": {"minItems": 1, "maxItems": 1}}},
    {"description": "BLEND: 2 to 5 images", "required": ["action", "images"],
     "not": {"required": ["parent_id"]},
     "properties": {"action": {"const": "BLEND"}, "images": {"minItems": 2, "maxItems": 5}}},
    {"description": "an action on a finished task: its button (button or custom_id), or "
                    "action and index",
     "required": ["parent_id"], "properties": {"action": {"enum": list(BUTTON_ACTIONS)}}},
]


class NewTask(Model):
    """IMAGINE (a prompt), DESCRIBE (one image), BLEND (2-5 images), or an action on a
    finished task of the tenant (parent_id, and a button: its custom_id or label, or action
    and index). action, mode and dimensions are case-insensitive."""

    model_config = schema_extra(anyOf=_NEW_TASK_KINDS)

    provider: Short = Field(None, json_schema_extra=_PROVIDER,
                            description="default: DEFAULT_PROVIDER, else the only configured "
                                        "one; it must be configured")
    action: Short = Field(None, json_schema_extra=extra(enum=ACTIONS),
                          description="default IMAGINE; with a button, the button's action")
    prompt: str | None = Field(None, max_length=MAX_PROMPT)
    images: list[Image] | None = Field([], max_length=5,
                                       description="image URLs or data URLs")
    parent_id: Annotated[JobId | None, BeforeValidator(_stripped)] = Field(
        None, description="the job id of the task to act on")
    button: Short = Field(None, description="the parent's button, by label (U1) or custom id")
    custom_id: Short = Field(None, description="the parent's button, by custom id")
    index: Annotated[int, Field(ge=1, le=4, strict=True)] | None = Field(
        None, description="the image of the grid (1-4), for UPSCALE and VARIATION")
    mode: Short = Field(None, json_schema_extra=extra(enum=ALL_MODES),
                        description="mjproxy FAST, RELAX, TURBO; ohmygpt FAST (default), "
                                    "NORMAL; aigc2d none; an action inherits its parent's")
    dimensions: Short = Field(None, json_schema_extra=extra(enum=DIMENSIONS),
                              description="for BLEND")
    mask: Annotated[Image | None, Blank] = Field(
        None, description="Vary Region's dialog: the area to redraw, a PNG data URL or "
                          "image URL")


class Transition(Model):
    event_id: EventId
    event: EventKind
    task: TaskEvent = Field(description="the task as this transition left it")
    raw: str | None = Field(description="the body the provider sent (its callback token "
                                        "redacted); null when it is not UTF-8")
    raw_base64: str | SkipJsonSchema[None] = Field(
        None, description="the body, base64, when it is not UTF-8")


class TaskHistory(Model):
    """Every stored transition of a task, oldest first."""

    task_id: JobId
    transitions: list[Transition]


class TaskImages(Model):
    """A task's archived images as signed URLs, for ``<img>`` tags."""

    task_id: JobId
    expires_in: int = Field(description="seconds the URLs' tokens are valid (IMAGE_URL_TTL)")
    image_url: str | None = Field(description="archived_image_url, signed")
    image_urls: list[str | None] = Field(description="archived_image_urls, signed")


class LedgerCounters(Model):
    tasks: int = Field(ge=0, description="tasks charged")
    spent: int = Field(description="charged when the provider accepted them")
    refunded: int = Field(description="given back for failed tasks")
    net: int = Field(description="spent - refunded")


class LedgerRow(LedgerCounters):
    provider: str
    mode: str | None
    action: str
    unit: str


class Budget(Model):
    limit: int = Field(ge=0, description="TENANT_BUDGETS: the most it may commit")
    committed: int = Field(description="charged net of refunds, plus its tasks not yet "
                                       "charged at their price")
    left: int


class Usage(Model):
    tenant: Tenant
    totals: dict[str, LedgerCounters] = Field(description="keyed by unit (tokens, points, ...)")
    by: list[LedgerRow] = Field(description="one row per provider, mode and action")
    budgets: dict[str, Budget] = Field(description="the tenant's budgets, keyed by unit")


class ProviderInfo(Model):
    name: str = Field(json_schema_extra=_PROVIDER)
    modes: list[str]
    default_mode: str | None
    flavor: Literal["trueai", "novicezk"] | None = Field(
        None, description="mjproxy's API generation")
    queue_limit: int = Field(ge=1, description="its enabled accounts' limits, summed")
    accounts: int = Field(ge=1, description="its enabled accounts (its pool)")


class Providers(Model):
    default: str | None = Field(json_schema_extra=extra(enum=[*sorted(PROVIDERS), None]),
                                description="the provider of a POST /tasks that names none; "
                                            "null: it must name one")
    providers: list[ProviderInfo]


CURSOR = {"type": "string", "pattern": ecma(JOB_ID_RE)}
