"""The API's shapes as typed models: what a task looks like, what an error looks like.

`receiver.web.openapi` generates ``/openapi.json``'s components from these models and from
the request and response models each capability declares beside its routes (``docs``
modules); request bodies are validated by those same models (`receiver.services.http`).
The hot path does not go through them: a task's JSON is assembled by the transition script
and served as stored, and providers' callbacks are read by `receiver.providers.dialects`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from receiver.core.constants import JOB_ID_RE, TENANT_RE
from receiver.core.models import EventKind, TaskStatus
from receiver.core.settings import PROVIDERS


def ecma(regex: re.Pattern[str]) -> str:
    """A Python ``^...\\Z`` pattern as an ECMA-262 one (JSON Schema's)."""
    return regex.pattern.removesuffix("\\Z") + "$"


def ref(name: str) -> JsonDict:
    """A reference to a schema among the document's components."""
    return {"$ref": f"#/components/schemas/{name}"}


def extra(**keywords: Any) -> JsonDict:
    """JSON Schema keywords a field's type cannot say (an enum read from a table, ...)."""
    return keywords


JobId = Annotated[str, Field(pattern=ecma(JOB_ID_RE),
                             description="a job id of this service (20 hex digits)")]
Tenant = Annotated[str, Field(pattern=ecma(TENANT_RE))]
EventId = Annotated[str, Field(pattern="^[0-9]+-[0-9]+$",
                               description="milliseconds-sequence; grows strictly per tenant")]
Time = Annotated[str, Field(json_schema_extra=extra(format="date-time"),
                            description="ISO 8601, UTC")]
MaybeTime = Annotated[str | None, Field(json_schema_extra=extra(format="date-time"),
                                        description="ISO 8601, UTC; null until known")]


class Model(BaseModel):
    """What every model of the API shares: generated schemas name no Python class."""

    model_config = ConfigDict(title=None, extra="ignore")


class Error(Model):
    """Every error: ``{"error", "detail"}``."""

    error: str = Field(pattern="^[a-z][a-z0-9_]*$",
                       description="a stable code, e.g. task_not_found")
    detail: str = Field(description="a sentence for people")


class Button(Model):
    custom_id: str
    label: str = Field(description="U1, V2, ...; may be empty")
    emoji: str = Field(description="may be empty")


class Cost(Model):
    amount: float
    unit: str


class Task(Model):
    """The canonical task. Ids are strings, whatever their size."""

    id: JobId
    tenant: Tenant
    provider: str = Field(json_schema_extra=extra(enum=sorted(PROVIDERS)))
    provider_task_id: str | None
    action: str | None
    mode: str | None
    status: TaskStatus
    progress: int = Field(ge=0, le=100)
    prompt: str | None
    final_prompt: str | None
    image_url: str | None
    image_urls: list[str]
    archived_image_url: str | None = Field(
        description="image_url as kept by this service (GET /images/...), once archived "
                    "(event task.archived), null until then or if it could not be")
    archived_image_urls: list[str | None] = Field(
        description="image_urls as kept by this service, in their order (null: not kept)")
    buttons: list[Button]
    fail_reason: str | None
    parent_id: str | None
    cost: Cost | None
    created_at: Time
    submitted_at: MaybeTime
    started_at: MaybeTime
    finished_at: MaybeTime
    updated_at: Time
    version: int = Field(ge=1, description="grows by one with every stored transition")


class TaskEvent(Task):
    """The task as one transition left it, with the event's kind and id."""

    event: EventKind
    event_id: EventId


def schema_extra(**extra: Any) -> ConfigDict:
    """A model's config with JSON Schema keywords its fields cannot say (anyOf, ...)."""
    return ConfigDict(title=None, extra="ignore", json_schema_extra=extra)
