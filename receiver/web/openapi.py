"""The OpenAPI document, written out so clients and schema checkers get the whole contract.

`tests/test_schema.py` runs Schemathesis against it (every route, with and without an API
key): each status code, content type, header and body the service answers with is here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.core.constants import JOB_ID_RE, TENANT_RE
from receiver.core.models import EventKind, TaskStatus
from receiver.providers import ACTIONS
from receiver.providers.dialects import DIALECTS
from receiver.services.http import JSONResponse
from receiver.tasks.routes import MAX_PAGE
from receiver.tasks.submit import ALL_MODES, BUTTON_ACTIONS, DIMENSIONS, MAX_PROMPT


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any],
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _ok(description: str, schema: str) -> dict[str, Any]:
    return _json(description, _ref(schema))


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(description, _ref("Error"), headers)


def _pattern(regex: Any) -> str:
    """A Python ``^...\\Z`` pattern as an ECMA-262 one."""
    pattern: str = regex.pattern
    return pattern.removesuffix("\\Z") + "$"


_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time",
                  "description": "ISO 8601, UTC; null until known"}
_JOB_ID = {"type": "string", "pattern": _pattern(JOB_ID_RE),
           "description": "a job id of this service (20 hex digits)"}
_EVENT_ID = {"type": "string", "pattern": "^[0-9]+-[0-9]+$",
             "description": "milliseconds-sequence; grows strictly per tenant"}
_STATUSES = [s.value for s in TaskStatus]

_RETRY_AFTER = {"Retry-After": {
    "description": "seconds to wait before trying again", "required": True,
    "schema": {"type": "integer", "minimum": 1}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {
    "description": "the scheme to authenticate with", "required": True,
    "schema": {"type": "string", "const": "Bearer"}}}

_UNAUTHORIZED = _error("missing_api_key, invalid_api_key: no or an unknown API key",
                       _WWW_AUTHENTICATE)
_AUTH_ERRORS = {
    "401": _UNAUTHORIZED,
    "403": _error("loopback_only: open mode (no API keys) and a non-loopback client"),
}
_UNAVAILABLE = {"503": _error("store_unavailable: Redis could not store or read it; retry "
                              "(nothing was acknowledged)", _RETRY_AFTER)}
_TENANT_ERRORS = {**_AUTH_ERRORS, **_UNAVAILABLE}
_RATE_LIMITED = {"429": _error("rate_limited: too many requests; retry after Retry-After",
                               _RETRY_AFTER)}
_QUOTA = {"507": _error("storage_quota: the tenant wrote TENANT_MAX_BYTES in the last "
                        "TASK_TTL (Retry-After: when the oldest writes leave the count)",
                        _RETRY_AFTER)}
_TASK_QUOTA = ("task_quota: the tenant created TENANT_MAX_TASKS tasks in the last TASK_TTL "
               "(Retry-After: when the oldest of them leave the count)")
_CLAIMED = "provider_task_claimed: another task holds that provider task id"
_BODY_ERRORS = {
    "400": _error("bad_request: the body is not a JSON object, or a field is not valid"),
    "408": _error("body_timeout: the body did not arrive in time"),
    "413": _error("payload_too_large: the body is over MAX_BODY_BYTES (inflated, if gzip "
                  "or deflate); json_too_deep: nested deeper than MAX_JSON_DEPTH; "
                  "json_too_complex: more objects and arrays than MAX_JSON_CONTAINERS"),
    "415": _error("unsupported_encoding: a Content-Encoding other than gzip, deflate or "
                  "identity"),
}

_LEDGER_COUNTERS = {
    "tasks": {"type": "integer", "minimum": 0, "description": "tasks charged"},
    "spent": {"type": "integer", "description": "charged when the provider accepted them"},
    "refunded": {"type": "integer", "description": "given back for failed tasks"},
    "net": {"type": "integer", "description": "spent - refunded"},
}

_SSE_PARAMETERS = [
    {"name": "token", "in": "query", "schema": {"type": "string"},
     "description": "a subscribe token (POST /subscribe-tokens), instead of the "
                    "Authorization header; when given, it decides the tenant"},
    {"name": "last_event_id", "in": "query",
     "schema": {"type": "string", "pattern": "^[0-9]{1,15}-[0-9]{1,15}$"},
     "description": "resume after this event (or send the Last-Event-ID header)"},
    {"name": "Last-Event-ID", "in": "header",
     "schema": {"type": "string", "pattern": "^[0-9]{1,15}-[0-9]{1,15}$"},
     "description": "resume after this event: what an EventSource sends when it reconnects"},
]
_SSE_OK = {
    "description": "An event stream. Each event is one stored transition: `id` the event id, "
                   "`event` its kind, `data` the task JSON (TaskEvent). Comments (`: ping`) "
                   "keep the connection open; the first block sets `retry`. (The schema "
                   "describes one event, as OpenAPI 3.2's itemSchema does.)",
    "content": {"text/event-stream": {"schema": _ref("ServerSentEvent")}},
    "headers": {
        "Cache-Control": {"required": True, "schema": {"type": "string", "const": "no-store"}},
        "X-Accel-Buffering": {"required": True, "schema": {"type": "string", "const": "no"},
                              "description": "tells nginx not to buffer the stream"},
    },
}
_SSE_ERRORS = {
    "400": _error("bad_request: Last-Event-ID is not an event id this service gave out"),
    "401": _error("missing_api_key, invalid_api_key: no or an unknown API key (and no "
                  "token); invalid_token, expired_token: a bad or expired subscribe token",
                  _WWW_AUTHENTICATE),
    "403": _error("wrong_task: the subscribe token is for another task; loopback_only: open "
                  "mode and a non-loopback client"),
    **_RATE_LIMITED,
    **_UNAVAILABLE,
}

_PAGE_HEADERS = {
    name: {"required": True, "schema": {"type": "string", "minLength": 1}}
    for name in ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options",
                 "Referrer-Policy", "Cache-Control")
}

# What providers POST to their callback URL: the task in their dialect. Any other field is
# kept in the stored transition's `raw`.
_STATUS_IN = {"type": "string", "enum": _STATUSES,
              "description": "the provider's status (case-insensitive)"}
_PROGRESS_IN = {"type": ["string", "integer", "number"],
                "description": '"45%", "45" or 45; anything else ("" on failure) keeps the '
                               "stored progress"}
_PROVIDER_ID = {"oneOf": [{"type": "integer"},
                          {"type": "string", "pattern": "\\S", "maxLength": 128}],
                "description": "the provider's task id; an integer of any size is kept exact"}
_BUTTON_IN = {"type": "object", "required": ["customId"],
              "properties": {"customId": _STR, "label": _STR, "emoji": _STR}}
_MJPROXY_TASK = {
    "type": "object",
    "description": "midjourney-proxy and its relays (POST /callbacks/mjproxy)",
    "required": ["id", "status"],
    "properties": {
        "id": _PROVIDER_ID, "status": _STATUS_IN, "progress": _PROGRESS_IN,
        "action": _STR, "prompt": _STR, "promptEn": _STR,
        "imageUrl": _STR,
        "imageUrls": {"type": "array", "items": {"oneOf": [
            _STR, {"type": "object", "properties": {"url": _STR}}]}},
        "failReason": _STR,
        "buttons": {"type": "array", "items": _BUTTON_IN},
        "properties": {"type": "object", "properties": {"finalPrompt": _STR}},
        **{name: {"type": "integer", "description": "epoch milliseconds"}
           for name in ("submitTime", "startTime", "finishTime")},
    },
}
_OHMYGPT_TASK = {
    "type": "object",
    "description": "OhMyGPT (POST /callbacks/ohmygpt): the task bare, or wrapped in `data`",
    "required": ["taskId", "status"],
    "properties": {
        "taskId": _PROVIDER_ID, "status": _STATUS_IN, "progress": _PROGRESS_IN,
        "action": _STR, "taskType": {"type": "string", "description": "FAST or NORMAL"},
        "prompt": _STR, "finalPrompt": _STR, "imageDcUrl": _STR, "imageS3Url": _STR,
        "failReason": _STR,
        "actions": {"type": "array", "items": _BUTTON_IN},
        **{name: {"type": "string", "description": "ISO 8601"}
           for name in ("submitTime", "startTime", "finishTime")},
    },
}
_AIGC2D_TASK = {
    "type": "object",
    "description": "AIGC2D (POST /callbacks/aigc2d)",
    "required": ["task_id", "status"],
    "properties": {
        "task_id": _PROVIDER_ID, "status": _STATUS_IN, "progress": _PROGRESS_IN,
        "action": _STR, "prompt": _STR, "image_url": _STR,
        "fail_reason": _STR, "message": _STR,
        "point": {"type": "number", "description": "the task's price in points"},
        **{name: {"type": "string", "description": "YYYY-MM-DD HH:MM:SS, UTC+8"}
           for name in ("submit_time", "start_time", "finish_time")},
    },
}

SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "receiver",
        "version": __version__,
        "description": "Webhook receiver and job tracker for Midjourney-style image APIs. "
                       "Every error is JSON {error, detail}.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {
                    "error": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$",
                              "description": "a stable code, e.g. task_not_found"},
                    "detail": {"type": "string", "description": "a sentence for people"},
                },
            },
            "Button": {
                "type": "object",
                "required": ["custom_id", "label", "emoji"],
                "properties": {
                    "custom_id": _STR,
                    "label": {"type": "string", "description": "U1, V2, ...; may be empty"},
                    "emoji": {"type": "string", "description": "may be empty"},
                },
            },
            "Task": {
                "type": "object",
                "description": "The canonical task. Ids are strings, whatever their size.",
                "required": ["id", "tenant", "provider", "provider_task_id", "action", "mode",
                             "status", "progress", "prompt", "final_prompt", "image_url",
                             "image_urls", "buttons", "fail_reason", "parent_id", "cost",
                             "created_at", "submitted_at", "started_at", "finished_at",
                             "updated_at", "version"],
                "properties": {
                    "id": _JOB_ID,
                    "tenant": {"type": "string", "pattern": _pattern(TENANT_RE)},
                    "provider": {"type": "string", "enum": sorted(DIALECTS)},
                    "provider_task_id": _NULLABLE_STR,
                    "action": _NULLABLE_STR,
                    "mode": _NULLABLE_STR,
                    "status": {"type": "string", "enum": _STATUSES},
                    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                    "prompt": _NULLABLE_STR,
                    "final_prompt": _NULLABLE_STR,
                    "image_url": _NULLABLE_STR,
                    "image_urls": {"type": "array", "items": _STR},
                    "buttons": {"type": "array", "items": _ref("Button")},
                    "fail_reason": _NULLABLE_STR,
                    "parent_id": _NULLABLE_STR,
                    "cost": {
                        "type": ["object", "null"],
                        "required": ["amount", "unit"],
                        "properties": {"amount": {"type": "number"}, "unit": _STR},
                    },
                    "created_at": _TIME,
                    "submitted_at": _NULLABLE_TIME,
                    "started_at": _NULLABLE_TIME,
                    "finished_at": _NULLABLE_TIME,
                    "updated_at": _TIME,
                    "version": {"type": "integer", "minimum": 1,
                                "description": "grows by one with every stored transition"},
                },
            },
            "TaskEvent": {
                "description": "The task as one transition left it, with the event's kind "
                               "and id",
                "allOf": [_ref("Task"), {
                    "type": "object",
                    "required": ["event", "event_id"],
                    "properties": {
                        "event": {"type": "string", "enum": [k.value for k in EventKind]},
                        "event_id": _EVENT_ID,
                    },
                }],
            },
            "ServerSentEvent": {
                "type": "object",
                "description": "One event of an event stream",
                "required": ["id", "event", "data"],
                "properties": {
                    "id": _EVENT_ID,
                    "event": {"type": "string", "enum": [k.value for k in EventKind]},
                    "data": {"type": "string", "contentMediaType": "application/json",
                             "contentSchema": _ref("TaskEvent")},
                    "retry": {"type": "integer", "minimum": 0},
                },
            },
            "TaskPage": {
                "type": "object",
                "required": ["tasks", "next_cursor"],
                "properties": {
                    "tasks": {"type": "array", "items": _ref("Task")},
                    "next_cursor": {"oneOf": [_JOB_ID, {"type": "null"}],
                                    "description": "pass it back as cursor; null on the "
                                                   "last page"},
                },
            },
            "CallbackUrl": {
                "type": "object",
                "required": ["job_id", "callback_url", "task"],
                "properties": {
                    "job_id": _JOB_ID,
                    "callback_url": {"type": "string", "format": "uri",
                                     "description": "give it to the provider as is"},
                    "task": _ref("TaskEvent"),
                },
            },
            "SubscribeToken": {
                "type": "object",
                "required": ["token", "expires_in", "events_url"],
                "properties": {
                    "token": {"type": "string", "minLength": 1},
                    "expires_in": {"type": "integer", "minimum": 1,
                                   "description": "seconds"},
                    "events_url": {"type": "string", "format": "uri-reference",
                                   "pattern": "^/(tasks/[0-9a-f]{20}/)?events\\?token=",
                                   "description": "the event route, token included"},
                },
            },
            "CallbackResult": {
                "type": "object",
                "required": ["result", "job_id", "version"],
                "properties": {
                    "result": {"type": "string", "enum": ["stored", "duplicate", "stale"]},
                    "job_id": _JOB_ID,
                    "version": {"type": "integer", "minimum": 1,
                                "description": "the task's version now"},
                },
            },
            "CallbackVerifying": {
                "type": "object",
                "required": ["result", "job_id", "version"],
                "properties": {
                    "result": {"type": "string", "const": "verifying"},
                    "job_id": _JOB_ID,
                    "version": {"type": "null", "description": "nothing was stored"},
                },
            },
            "CallbackBody": {
                "description": "The task in the provider's dialect (the one named in the "
                               "path); fields not listed are kept as received",
                "anyOf": [
                    _MJPROXY_TASK,
                    _OHMYGPT_TASK,
                    {"type": "object", "required": ["data"],
                     "description": "OhMyGPT, wrapped like a query answer",
                     "properties": {"data": _OHMYGPT_TASK}},
                    _AIGC2D_TASK,
                ],
            },
            "NewCallbackUrl": {
                "type": "object",
                "required": ["provider"],
                "properties": {
                    "provider": {"type": "string", "enum": sorted(DIALECTS)},
                    "action": {"type": "string", "pattern": "\\S", "maxLength": 8192,
                               "description": "stored upper-case"},
                    "mode": {"type": "string", "pattern": "\\S", "maxLength": 8192,
                             "description": "stored upper-case"},
                    "prompt": {"type": "string", "maxLength": 8192},
                    "parent_id": {"type": "string", "maxLength": 8192},
                    "provider_task_id": {"type": "string", "pattern": "\\S",
                                         "maxLength": 8192,
                                         "description": "binds the job to this provider "
                                                        "task at once"},
                },
            },
            "NewTask": {
                "type": "object",
                "description": "IMAGINE (a prompt), DESCRIBE (one image), BLEND (2-5 images), "
                               "or an action on a finished task of the tenant (parent_id, "
                               "and a button: its custom_id or label, or action and index). "
                               "action, mode and dimensions are case-insensitive.",
                "anyOf": [
                    {"description": "IMAGINE: a prompt",
                     "required": ["prompt"], "not": {"required": ["parent_id"]},
                     "properties": {"action": {"const": "IMAGINE"},
                                    "prompt": {"pattern": "\\S"}}},
                    {"description": "DESCRIBE: one image",
                     "required": ["action", "images"], "not": {"required": ["parent_id"]},
                     "properties": {"action": {"const": "DESCRIBE"},
                                    "images": {"minItems": 1, "maxItems": 1}}},
                    {"description": "BLEND: 2 to 5 images",
                     "required": ["action", "images"], "not": {"required": ["parent_id"]},
                     "properties": {"action": {"const": "BLEND"},
                                    "images": {"minItems": 2, "maxItems": 5}}},
                    {"description": "an action on a finished task: its button (button or "
                                    "custom_id), or action and index",
                     "required": ["parent_id"],
                     "properties": {"action": {"enum": list(BUTTON_ACTIONS)}}},
                ],
                "properties": {
                    "provider": {"type": "string", "enum": sorted(DIALECTS),
                                 "description": "default: DEFAULT_PROVIDER, else the only "
                                                "configured one; it must be configured"},
                    "action": {"type": "string", "enum": list(ACTIONS),
                               "description": "default IMAGINE; with a button, the "
                                              "button's action"},
                    "prompt": {"type": "string", "maxLength": MAX_PROMPT},
                    "images": {"type": "array", "maxItems": 5,
                               "items": {"type": "string", "minLength": 1},
                               "description": "image URLs or data URLs"},
                    "parent_id": {**_JOB_ID, "description": "the job id of the task to act on"},
                    "button": {"type": "string", "maxLength": 256,
                               "description": "the parent's button, by label (U1) or "
                                              "custom id"},
                    "custom_id": {"type": "string", "maxLength": 256,
                                  "description": "the parent's button, by custom id"},
                    "index": {"type": "integer", "enum": [1, 2, 3, 4],
                              "description": "the image of the grid, for UPSCALE and "
                                             "VARIATION"},
                    "mode": {"type": "string",
                             "enum": list(ALL_MODES),
                             "description": "mjproxy FAST, RELAX, TURBO; ohmygpt FAST "
                                            "(default), NORMAL; aigc2d none; an action "
                                            "inherits its parent's"},
                    "dimensions": {"type": "string", "enum": list(DIMENSIONS),
                                   "description": "for BLEND"},
                    "mask": {"type": "string", "minLength": 1,
                             "description": "Vary Region's dialog: the area to redraw, a "
                                            "PNG data URL or image URL"},
                },
            },
            "Usage": {
                "type": "object",
                "required": ["tenant", "totals", "by"],
                "properties": {
                    "tenant": {"type": "string", "pattern": _pattern(TENANT_RE)},
                    "totals": {
                        "type": "object",
                        "description": "keyed by unit (tokens, points, ...)",
                        "additionalProperties": {
                            "type": "object",
                            "required": list(_LEDGER_COUNTERS),
                            "properties": _LEDGER_COUNTERS,
                        },
                    },
                    "by": {
                        "type": "array",
                        "description": "one row per provider, mode and action",
                        "items": {
                            "type": "object",
                            "required": ["provider", "mode", "action", "unit",
                                         *_LEDGER_COUNTERS],
                            "properties": {
                                "provider": _STR,
                                "mode": _NULLABLE_STR,
                                "action": _STR,
                                "unit": _STR,
                                **_LEDGER_COUNTERS,
                            },
                        },
                    },
                },
            },
            "Providers": {
                "type": "object",
                "required": ["default", "providers"],
                "properties": {
                    "default": {"type": ["string", "null"], "enum": [*sorted(DIALECTS), None],
                                "description": "the provider of a POST /tasks that names "
                                               "none; null: it must name one"},
                    "providers": {"type": "array", "items": {
                        "type": "object",
                        "required": ["name", "modes", "default_mode", "queue_limit"],
                        "properties": {
                            "name": {"type": "string", "enum": sorted(DIALECTS)},
                            "modes": {"type": "array", "items": _STR},
                            "default_mode": _NULLABLE_STR,
                            "flavor": {"type": ["string", "null"],
                                       "enum": ["trueai", "novicezk", None],
                                       "description": "mjproxy's API generation"},
                            "queue_limit": {"type": "integer", "minimum": 1},
                        },
                    }},
                },
            },
        },
    },
    "paths": {
        "/callbacks/{provider}": {
            "post": {
                "summary": "Accept a provider's task callback",
                "description": "Answered once Redis has stored the transition (or recognised "
                               "it as a duplicate or stale). No API key: the token in the "
                               "URL is the authority.",
                "parameters": [
                    {"name": "provider", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": sorted(DIALECTS)}},
                    {"name": "token", "in": "query", "required": True,
                     "schema": {"type": "string"},
                     "description": "the signed token of the minted callback URL"},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CallbackBody")}},
                },
                "responses": {
                    "200": _ok("Stored, or recognised as a duplicate or stale", "CallbackResult"),
                    "202": _ok("VERIFY_FINAL: a SUCCESS the provider could not be asked to "
                               "confirm now; nothing stored, polling settles it",
                               "CallbackVerifying"),
                    "400": _error("invalid_payload: the body is not a task of that dialect"),
                    "401": _error("missing_token, invalid_token, expired_token: no token, "
                                  "or a bad or expired one", _WWW_AUTHENTICATE),
                    "403": _error("wrong_provider: the token is for another provider; "
                                  "wrong_job: the job is bound to another provider task"),
                    "404": _error("unknown_provider: no such provider"),
                    "408": _BODY_ERRORS["408"],
                    "409": _error(f"{_CLAIMED}: nothing stored"),
                    "413": _BODY_ERRORS["413"],
                    "415": _BODY_ERRORS["415"],
                    "429": _error("rate_limited: too many callbacks for this task; retry "
                                  f"after Retry-After; {_TASK_QUOTA}", _RETRY_AFTER),
                    **_QUOTA,
                    "503": _error("store_unavailable: Redis could not store it; retry "
                                  "(nothing was acknowledged)", _RETRY_AFTER),
                },
            }
        },
        "/callback-urls": {
            "post": {
                "summary": "Mint a signed callback URL for a task submitted elsewhere",
                "description": "The task exists from then on (NOT_START).",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewCallbackUrl")}},
                },
                "responses": {
                    "201": _ok("The job and its callback URL", "CallbackUrl"),
                    **_BODY_ERRORS,
                    "400": _error("bad_request: the body is not a JSON object, or a field is "
                                  "not valid; untrusted_host: no PUBLIC_BASE_URL and a Host "
                                  "not in TRUSTED_HOSTS"),
                    "409": _error(_CLAIMED),
                    "429": _error("rate_limited: too many mints (MINT_RATE); retry after "
                                  f"Retry-After; {_TASK_QUOTA}", _RETRY_AFTER),
                    **_QUOTA,
                    **_TENANT_ERRORS,
                },
            }
        },
        "/tasks": {
            "get": {
                "summary": "The tenant's tasks, newest first",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "status", "in": "query",
                     "schema": {"type": "string", "enum": _STATUSES},
                     "description": "only tasks in this status (case-insensitive)"},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                                "default": 50}},
                    {"name": "cursor", "in": "query", "schema": _JOB_ID,
                     "description": "next_cursor of the previous page"},
                ],
                "responses": {
                    "200": _ok("A page of tasks", "TaskPage"),
                    "400": _error("bad_request: a status, limit or cursor that is not valid"),
                    **_TENANT_ERRORS,
                },
            },
            "post": {
                "summary": "Submit a task: recorded (NOT_START), queued, sent to the provider "
                           "when its account has a free slot",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewTask")}},
                },
                "responses": {
                    "202": _ok("The task, queued", "TaskEvent"),
                    **_BODY_ERRORS,
                    "400": _error("bad_request: not a JSON object, a provider that is not "
                                  "configured, an unknown action, a mode the provider does "
                                  "not have, missing prompt or images, a parent of another "
                                  "provider..."),
                    "404": _error("task_not_found: no parent task for this tenant; "
                                  "unknown_parent: the parent has no such button"),
                    "409": _error("mode_mismatch: a mode other than the parent's; "
                                  "parent_not_ready: the parent has not succeeded; "
                                  "parent_not_submitted_here: the parent came through "
                                  "POST /callback-urls, not POST /tasks"),
                    "429": _error("rate_limited: too many submissions (SUBMIT_RATE); retry "
                                  f"after Retry-After; {_TASK_QUOTA}", _RETRY_AFTER),
                    **_QUOTA,
                    **_TENANT_ERRORS,
                },
            },
        },
        "/tasks/{job_id}": {
            "get": {
                "summary": "One task",
                "security": [{"bearer": []}],
                "parameters": [{"name": "job_id", "in": "path", "required": True,
                                "schema": _JOB_ID}],
                "responses": {
                    "200": _ok("The task", "Task"),
                    "404": _error("task_not_found: no such task for this tenant"),
                    **_TENANT_ERRORS,
                },
            }
        },
        "/tasks/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a task: one still in our queue is CANCEL at once and never "
                           "sent; a sent one is canceled at the provider where it can be",
                "security": [{"bearer": []}],
                "parameters": [{"name": "job_id", "in": "path", "required": True,
                                "schema": _JOB_ID}],
                "responses": {
                    "200": _ok("The task after the cancel", "Task"),
                    "404": _error("task_not_found: no such task for this tenant"),
                    "409": _error("task_final: it has ended; cancel_in_flight: it is being "
                                  "sent right now; cannot_cancel: the provider cannot cancel "
                                  "a task it has been sent"),
                    "502": _error("provider_error: the provider did not cancel it"),
                    "503": _error("provider_down or store_unavailable: try again"),
                    **_TENANT_ERRORS,
                },
            }
        },
        "/tasks/{job_id}/events": {
            "get": {
                "summary": "Server-Sent Events of one task, from its current state; ends "
                           "after its terminal event",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": _JOB_ID},
                    *_SSE_PARAMETERS,
                ],
                "responses": {
                    "200": _SSE_OK,
                    "204": {"description": "The task has ended and Last-Event-ID is its end: "
                                           "nothing more will come (EventSource stops)"},
                    "404": _error("task_not_found: no such task for this tenant"),
                    **_SSE_ERRORS,
                },
            }
        },
        "/events": {
            "get": {
                "summary": "Server-Sent Events of every task of the tenant",
                "security": [{"bearer": []}],
                "parameters": _SSE_PARAMETERS,
                "responses": {
                    "200": _SSE_OK,
                    **_SSE_ERRORS,
                },
            }
        },
        "/subscribe-tokens": {
            "post": {
                "summary": "A short-lived token for ?token= on the event routes",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": {"task_id": {
                            **_JOB_ID, "description": "one task's events; leave it out "
                                                      "for every task of the tenant"}},
                    }}},
                },
                "responses": {
                    "201": _ok("The token and the events URL to use it on", "SubscribeToken"),
                    **_BODY_ERRORS,
                    "404": _error("task_not_found: no such task for this tenant"),
                    "429": _error("rate_limited: too many mints (MINT_RATE); retry after "
                                  "Retry-After", _RETRY_AFTER),
                    **_TENANT_ERRORS,
                },
            }
        },
        "/usage": {
            "get": {
                "summary": "The tenant's cost ledger: spent and refunded, by provider, mode and "
                           "action",
                "security": [{"bearer": []}],
                "responses": {
                    "200": _ok("The ledger", "Usage"),
                    **_TENANT_ERRORS,
                },
            }
        },
        "/providers": {"get": {
            "summary": "The providers POST /tasks can send to, their modes and the default",
            "security": [{"bearer": []}],
            "responses": {
                "200": _ok("The configured providers", "Providers"),
                **_AUTH_ERRORS,
            },
        }},
        "/": {"get": {
            "summary": "The live dashboard",
            "responses": {"200": {
                "description": "The page (it signs in with an API key itself)",
                "content": {"text/html": {"schema": {"type": "string"}}},
                "headers": _PAGE_HEADERS,
            }},
        }},
        "/healthz": {"get": {
            "summary": "Liveness",
            "responses": {"200": _json("The process serves", {
                "type": "object", "required": ["status"],
                "properties": {"status": {"type": "string", "const": "ok"}}})},
        }},
        "/readyz": {"get": {
            "summary": "Readiness: Redis answers",
            "responses": {
                "200": _json("Ready", {
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"type": "string", "const": "ready"}}}),
                "503": _error("store_unavailable: Redis does not answer", _RETRY_AFTER),
            },
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (callbacks by provider and outcome, transition "
                       "latency, Redis errors, SSE clients, admission queues and slots, "
                       "submissions, reconciler polls)",
            "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _error("metrics_token_required: METRICS_TOKEN is set and the "
                              "request does not carry it as a bearer token"),
                "503": _error("store_unavailable: Redis does not answer (queue depths are "
                              "read from it)", _RETRY_AFTER),
            },
        }},
        "/openapi.json": {"get": {
            "summary": "This document",
            "responses": {"200": _json("OpenAPI 3.1", {
                "type": "object", "required": ["openapi", "info", "paths"],
                "properties": {"openapi": {"type": "string", "const": "3.1.0"}}})},
        }},
    },
}


async def openapi_json(request: Request) -> Response:
    return JSONResponse(SCHEMA)
