"""The OpenAPI document, written out so clients and schema checkers get the whole contract."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.api import JSONResponse
from receiver.dialects import DIALECTS
from receiver.models import EventKind, TaskStatus
from receiver.providers import ACTIONS
from receiver.submitter import DIMENSIONS, MAX_PROMPT, MODES


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_NULLABLE_STR = {"type": ["string", "null"]}
_TENANT_ERRORS = {
    "401": _error("No or invalid API key"),
    "403": _error("Open mode (no API keys) and a non-loopback client"),
    "503": _error("Redis is unavailable"),
}

_LEDGER_COUNTERS = {
    "tasks": {"type": "integer", "description": "tasks charged"},
    "spent": {"type": "integer", "description": "charged when the provider accepted them"},
    "refunded": {"type": "integer", "description": "given back for failed tasks"},
    "net": {"type": "integer", "description": "spent - refunded"},
}

_SSE_PARAMETERS = [
    {"name": "token", "in": "query", "schema": {"type": "string"},
     "description": "a subscribe token, instead of the Authorization header"},
    {"name": "last_event_id", "in": "query", "schema": {"type": "string"},
     "description": "resume after this event (or send the Last-Event-ID header)"},
    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
]
_SSE_OK = {
    "description": "text/event-stream: id = event id, event = kind, data = the task (Task)",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}

SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "receiver",
        "version": __version__,
        "description": "Webhook receiver and job tracker for Midjourney-style image APIs.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            },
            "Button": {
                "type": "object",
                "properties": {
                    "custom_id": {"type": "string"},
                    "label": {"type": "string"},
                    "emoji": {"type": "string"},
                },
            },
            "Task": {
                "type": "object",
                "required": ["id", "tenant", "provider", "status", "progress", "version"],
                "properties": {
                    "id": {"type": "string"},
                    "tenant": {"type": "string"},
                    "provider": {"type": "string", "enum": sorted(DIALECTS)},
                    "provider_task_id": _NULLABLE_STR,
                    "action": _NULLABLE_STR,
                    "mode": _NULLABLE_STR,
                    "status": {"type": "string", "enum": [s.value for s in TaskStatus]},
                    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                    "prompt": _NULLABLE_STR,
                    "final_prompt": _NULLABLE_STR,
                    "image_url": _NULLABLE_STR,
                    "image_urls": {"type": "array", "items": {"type": "string"}},
                    "buttons": {"type": "array", "items": {"$ref": "#/components/schemas/Button"}},
                    "fail_reason": _NULLABLE_STR,
                    "parent_id": _NULLABLE_STR,
                    "cost": {
                        "type": ["object", "null"],
                        "properties": {"amount": {"type": "number"}, "unit": {"type": "string"}},
                    },
                    "created_at": {"type": "string", "format": "date-time"},
                    "submitted_at": _NULLABLE_STR,
                    "started_at": _NULLABLE_STR,
                    "finished_at": _NULLABLE_STR,
                    "updated_at": {"type": "string", "format": "date-time"},
                    "version": {"type": "integer", "minimum": 1},
                    "event": {"type": "string", "enum": [k.value for k in EventKind]},
                    "event_id": {"type": "string"},
                },
            },
            "TaskPage": {
                "type": "object",
                "required": ["tasks", "next_cursor"],
                "properties": {
                    "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                    "next_cursor": _NULLABLE_STR,
                },
            },
            "CallbackUrl": {
                "type": "object",
                "required": ["job_id", "callback_url", "task"],
                "properties": {
                    "job_id": {"type": "string"},
                    "callback_url": {"type": "string"},
                    "task": {"$ref": "#/components/schemas/Task"},
                },
            },
            "SubscribeToken": {
                "type": "object",
                "required": ["token", "expires_in", "events_url"],
                "properties": {
                    "token": {"type": "string"},
                    "expires_in": {"type": "integer"},
                    "events_url": {"type": "string"},
                },
            },
            "CallbackResult": {
                "type": "object",
                "required": ["result", "job_id", "version"],
                "properties": {
                    "result": {"type": "string",
                               "enum": ["stored", "duplicate", "stale", "verifying"]},
                    "job_id": {"type": "string"},
                    "version": {"type": ["integer", "null"],
                                "description": "null when the result is verifying"},
                },
            },
            "NewTask": {
                "type": "object",
                "description": "IMAGINE (a prompt), DESCRIBE (one image), BLEND (2-5 images), "
                               "or an action on a finished task of the tenant (parent_id, "
                               "and a button: its custom_id or label, or action and index). "
                               "action, mode and dimensions are case-insensitive.",
                "properties": {
                    "provider": {"type": "string", "enum": sorted(DIALECTS),
                                 "description": "default: DEFAULT_PROVIDER, else the only "
                                                "configured one"},
                    "action": {"type": "string", "enum": list(ACTIONS),
                               "description": "default IMAGINE; with a button, the "
                                              "button's action"},
                    "prompt": {"type": "string", "maxLength": MAX_PROMPT},
                    "images": {"type": "array", "maxItems": 5,
                               "items": {"type": "string", "minLength": 1},
                               "description": "image URLs or data URLs"},
                    "parent_id": {"type": "string",
                                  "description": "the job id of the task to act on"},
                    "button": {"type": "string",
                               "description": "the parent's button, by label (U1) or "
                                              "custom id"},
                    "custom_id": {"type": "string",
                                  "description": "the parent's button, by custom id"},
                    "index": {"type": "integer", "enum": [1, 2, 3, 4],
                              "description": "the image of the grid, for UPSCALE and "
                                             "VARIATION"},
                    "mode": {"type": "string",
                             "enum": sorted({m for ms in MODES.values() for m in ms}),
                             "description": "mjproxy FAST, RELAX, TURBO; ohmygpt FAST "
                                            "(default), NORMAL; aigc2d none; an action "
                                            "inherits its parent's"},
                    "dimensions": {"type": "string", "enum": list(DIMENSIONS),
                                   "description": "for BLEND"},
                },
            },
            "Usage": {
                "type": "object",
                "required": ["tenant", "totals", "by"],
                "properties": {
                    "tenant": {"type": "string"},
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
                                "provider": {"type": "string"},
                                "mode": _NULLABLE_STR,
                                "action": {"type": "string"},
                                "unit": {"type": "string"},
                                **_LEDGER_COUNTERS,
                            },
                        },
                    },
                },
            },
        },
    },
    "paths": {
        "/callbacks/{provider}": {
            "post": {
                "summary": "Accept a provider's task callback",
                "parameters": [
                    {"name": "provider", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "token", "in": "query", "required": True,
                     "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _ok("Stored, or recognised as a duplicate or stale", "CallbackResult"),
                    "202": _ok("VERIFY_FINAL: a SUCCESS the provider could not be asked to "
                               "confirm now; nothing stored, polling settles it", "CallbackResult"),
                    "400": _error("The body is not a task of that dialect"),
                    "401": _error("No token, or a bad or expired one"),
                    "403": _error("The token is for another job or provider"),
                    "404": _error("Unknown provider"),
                    "413": _error("The body is over the limit"),
                    "503": _error("Redis could not store it; retry"),
                },
            }
        },
        "/callback-urls": {
            "post": {
                "summary": "Mint a signed callback URL for a task submitted elsewhere",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "required": ["provider"],
                        "properties": {
                            "provider": {"type": "string", "enum": sorted(DIALECTS)},
                            "action": {"type": "string"},
                            "mode": {"type": "string"},
                            "prompt": {"type": "string"},
                            "parent_id": {"type": "string"},
                            "provider_task_id": {"type": "string"},
                        },
                    }}},
                },
                "responses": {
                    "201": _ok("The job and its callback URL", "CallbackUrl"),
                    "400": _error("Bad request body"),
                    "413": _error("The body is over the limit"),
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
                     "schema": {"type": "string", "enum": [s.value for s in TaskStatus]}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _ok("A page of tasks", "TaskPage"),
                    "400": _error("Bad query parameter"),
                    **_TENANT_ERRORS,
                },
            },
            "post": {
                "summary": "Submit a task: recorded (NOT_START), queued, sent to the provider "
                           "when its account has a free slot",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/NewTask"}}},
                },
                "responses": {
                    "202": _ok("The task, queued", "Task"),
                    "400": _error("Bad request body: unknown provider or action, a mode the "
                                  "provider does not have, missing prompt or images, a "
                                  "parent of another provider..."),
                    "404": _error("task_not_found: no parent task for this tenant; "
                                  "unknown_parent: the parent has no such button"),
                    "409": _error("mode_mismatch: a mode other than the parent's; "
                                  "parent_not_ready: the parent has not succeeded"),
                    "413": _error("The body is over the limit"),
                    **_TENANT_ERRORS,
                },
            },
        },
        "/tasks/{job_id}": {
            "get": {
                "summary": "One task",
                "security": [{"bearer": []}],
                "parameters": [{"name": "job_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": _ok("The task", "Task"),
                    "404": _error("No such task for this tenant"),
                    **_TENANT_ERRORS,
                },
            }
        },
        "/tasks/{job_id}/events": {
            "get": {
                "summary": "Server-Sent Events of one task; ends after its terminal event",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    *_SSE_PARAMETERS,
                ],
                "responses": {
                    "200": _SSE_OK,
                    "204": {"description": "The task has ended and Last-Event-ID is its end: "
                                           "nothing more will come (EventSource stops)"},
                    "400": _error("Bad Last-Event-ID"),
                    "404": _error("No such task for this tenant"),
                    **_TENANT_ERRORS,
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
                    "400": _error("Bad Last-Event-ID"),
                    **_TENANT_ERRORS,
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
                        "properties": {"task_id": {"type": "string"}},
                    }}},
                },
                "responses": {
                    "201": _ok("The token and the events URL to use it on", "SubscribeToken"),
                    "400": _error("Bad request body"),
                    "404": _error("No such task for this tenant"),
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
            "responses": {"200": {"description": "Configured providers", "content": {
                "application/json": {"schema": {
                    "type": "object", "required": ["default", "providers"],
                    "properties": {
                        "default": {"type": ["string", "null"]},
                        "providers": {"type": "array", "items": {
                            "type": "object",
                            "required": ["name", "modes", "default_mode", "queue_limit"],
                            "properties": {
                                "name": {"type": "string"},
                                "modes": {"type": "array", "items": {"type": "string"}},
                                "default_mode": {"type": ["string", "null"]},
                                "queue_limit": {"type": "integer"}}}}}}}}},
                **_TENANT_ERRORS}}},
        "/": {"get": {"summary": "The live dashboard (HTML)", "responses": {"200": {
            "description": "The page", "content": {"text/html": {"schema": {
                "type": "string"}}}}}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {
            "description": "The process serves"}}}},
        "/readyz": {"get": {"summary": "Readiness (Redis reachable)", "responses": {
            "200": {"description": "Ready"}, "503": _error("Redis is unavailable")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (callbacks by provider and "
                             "outcome, transition latency, Redis errors, SSE clients, admission "
                             "queues and slots, submissions, reconciler polls)",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {
                                                       "type": "string"}}}},
                                           "503": _error("Redis is unavailable")}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {
            "description": "OpenAPI 3.1"}}}},
    },
}


async def openapi_json(request: Request) -> Response:
    return JSONResponse(SCHEMA)
