"""The tasks routes as ``/openapi.json`` shows them (see `receiver.core.docs`)."""

from __future__ import annotations

from receiver.core.docs import (
    AUTH_ERRORS,
    BODY_ERRORS,
    CLAIMED,
    JOB_ID_PARAMETER,
    QUOTA,
    RETRY_AFTER,
    TASK_QUOTA,
    TENANT_ERRORS,
    WWW_AUTHENTICATE,
    Answer,
    Operation,
    error,
    ok,
)
from receiver.core.models import TaskStatus
from receiver.core.schema import Task, TaskEvent
from receiver.tasks.schemas import (
    CURSOR,
    MAX_PAGE,
    CallbackUrl,
    NewCallbackUrl,
    NewSubscribeToken,
    NewTask,
    Providers,
    SubscribeToken,
    TaskHistory,
    TaskImages,
    TaskPage,
    Usage,
)

_NOT_FOUND = {404: error("task_not_found: no such task for this tenant")}

OPERATIONS: dict[str, dict[str, Operation]] = {
    "/callback-urls": {"post": Operation(
        "Mint a signed callback URL for a task submitted elsewhere",
        description="The task exists from then on (NOT_START).",
        body=NewCallbackUrl,
        responses={
            201: ok("The job and its callback URL", CallbackUrl),
            **BODY_ERRORS,
            400: error("bad_request: the body is not a JSON object, or a field is not valid; "
                       "untrusted_host: no PUBLIC_BASE_URL and a Host not in TRUSTED_HOSTS"),
            409: error(CLAIMED),
            429: error("rate_limited: too many mints (MINT_RATE); retry after Retry-After; "
                       f"{TASK_QUOTA}", RETRY_AFTER),
            **QUOTA, **TENANT_ERRORS,
        })},
    "/tasks": {
        "get": Operation(
            "The tenant's tasks, newest first",
            parameters=[
                {"name": "status", "in": "query",
                 "schema": {"type": "string", "enum": [s.value for s in TaskStatus]},
                 "description": "only tasks in this status (case-insensitive)"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                            "default": 50}},
                {"name": "cursor", "in": "query", "schema": CURSOR,
                 "description": "next_cursor of the previous page"},
            ],
            responses={
                200: ok("A page of tasks", TaskPage),
                400: error("bad_request: a status, limit or cursor that is not valid"),
                **TENANT_ERRORS,
            }),
        "post": Operation(
            "Submit a task: recorded (NOT_START), queued, sent to the provider when its "
            "account has a free slot",
            body=NewTask,
            responses={
                202: ok("The task, queued", TaskEvent),
                **BODY_ERRORS,
                400: error("bad_request: not a JSON object, a provider that is not "
                           "configured, an unknown action, a mode the provider does not "
                           "have, missing prompt or images, a parent of another provider...; "
                           "image_refused: an image URL that may not be fetched (a private "
                           "address, too big, not an image)"),
                404: error("task_not_found: no parent task for this tenant; unknown_parent: "
                           "the parent has no such button"),
                409: error("mode_mismatch: a mode other than the parent's; parent_not_ready: "
                           "the parent has not succeeded; parent_not_submitted_here: the "
                           "parent came through POST /callback-urls, not POST /tasks; "
                           "parent_account_gone: the account that made the parent is "
                           "disabled or no longer configured (no other knows the parent)"),
                402: error("budget_exceeded: the task's price would take the tenant past "
                           "its budget in that unit (TENANT_BUDGETS); nothing stored"),
                429: error("rate_limited: too many submissions (SUBMIT_RATE); retry after "
                           f"Retry-After; {TASK_QUOTA}", RETRY_AFTER),
                **QUOTA, **TENANT_ERRORS,
            }),
    },
    "/tasks/{job_id}": {"get": Operation(
        "One task", parameters=[JOB_ID_PARAMETER],
        responses={200: ok("The task", Task), **_NOT_FOUND, **TENANT_ERRORS})},
    "/tasks/{job_id}/history": {"get": Operation(
        "Every stored transition of one task, with the provider's raw body, oldest first "
        "(a finished task's history is compacted in Redis; this reads it back whole)",
        parameters=[JOB_ID_PARAMETER],
        responses={200: ok("The transitions", TaskHistory), **_NOT_FOUND, **TENANT_ERRORS})},
    "/tasks/{job_id}/images": {"get": Operation(
        "The task's archived images as signed URLs, for <img> tags (which send no "
        "Authorization header): each valid IMAGE_URL_TTL seconds, for this task only",
        parameters=[JOB_ID_PARAMETER],
        responses={200: ok("The signed URLs", TaskImages), **_NOT_FOUND, **TENANT_ERRORS})},
    "/images/{job_id}/{name}": {"get": Operation(
        "One archived image of the tenant's task (the URL in archived_image_url(s))",
        description="Kept by the worker when the task succeeded, by content (sha256), so it "
                    "outlives the provider's link; gone with its task (TASK_TTL). Immutable "
                    "(private) cache headers; If-None-Match answers 304.",
        parameters=[JOB_ID_PARAMETER,
                    {"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string",
                                "pattern": "^[0-9a-f]{64}\\.(png|jpg|gif|webp)$"}},
                    {"name": "token", "in": "query", "schema": {"type": "string"},
                     "description": "a signed image token (GET /tasks/{id}/images), "
                                    "instead of the Authorization header"}],
        responses={
            200: Answer("The image", {"type": "string", "format": "binary"},
                        media_type="image/*"),
            304: Answer("Not modified (If-None-Match)", None),
            401: error("missing_api_key, invalid_api_key: no or an unknown API key (and no "
                       "token); invalid_token, expired_token: a bad or expired image token",
                       WWW_AUTHENTICATE),
            403: error("loopback_only: open mode (no API keys) and a non-loopback client"),
            404: error("task_not_found: no such task for this tenant; image_not_found: the "
                       "task has no such archived image, the token is another task's, or "
                       "the image is no longer kept"),
            503: error("store_unavailable: Redis did not answer; image_store_unavailable: "
                       "IMAGE_STORE did not (retry after Retry-After)", RETRY_AFTER),
        })},
    "/tasks/{job_id}/cancel": {"post": Operation(
        "Cancel a task: one still in our queue is CANCEL at once and never sent; a sent one "
        "is canceled at the provider where it can be",
        parameters=[JOB_ID_PARAMETER],
        responses={
            200: ok("The task after the cancel", Task),
            400: error("provider_refused, banned_prompt: the provider refused the cancel"),
            404: error("task_not_found: no such task for this tenant; unknown_provider_task: "
                       "the provider does not know the task"),
            409: error("task_final: it has ended; cancel_in_flight: it is being sent right "
                       "now; cannot_cancel: the provider cannot cancel a task it has been "
                       "sent"),
            429: error("provider_queue_full: the provider is too busy to answer; try again"),
            502: error("provider_error: the provider did not cancel it; provider_auth: the "
                       "provider refused our key"),
            503: error("provider_busy, provider_down: the provider cannot be reached now; "
                       "store_unavailable: Redis could not read or store it (Retry-After)",
                       {"Retry-After": {**RETRY_AFTER["Retry-After"], "required": False}}),
            **AUTH_ERRORS,
        })},
    "/subscribe-tokens": {"post": Operation(
        "A short-lived token for ?token= on the event routes",
        body=NewSubscribeToken, body_required=False,
        responses={
            201: ok("The token and the events URL to use it on", SubscribeToken),
            **BODY_ERRORS,
            **_NOT_FOUND,
            429: error("rate_limited: too many mints (MINT_RATE); retry after Retry-After",
                       RETRY_AFTER),
            **TENANT_ERRORS,
        })},
    "/usage": {"get": Operation(
        "The tenant's cost ledger: spent and refunded, by provider, mode and action",
        responses={200: ok("The ledger", Usage), **TENANT_ERRORS})},
    "/providers": {"get": Operation(
        "The providers POST /tasks can send to, their modes and the default",
        responses={200: ok("The configured providers", Providers), **AUTH_ERRORS})},
}
