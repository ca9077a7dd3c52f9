"""The domain errors. Each knows its HTTP status and error code; `receiver.web.app` turns
them into ``{"error", "detail"}`` responses at one boundary.

These are the bases. A capability's own errors subclass them beside the code that raises
them (``TaskNotFound(NotFound)`` in `receiver.services.http`, the providers' answers in
`receiver.providers._errors`); tests/core/test_errors.py walks the whole tree: one root,
every code unique, every code documented in /openapi.json."""

from __future__ import annotations


class ReceiverError(Exception):
    """Root of every error this service answers with."""

    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str] | None:
        return None


class BadRequest(ReceiverError):
    status_code = 400
    code = "bad_request"


class InvalidPayload(BadRequest):
    """A callback body that is not a task of the provider's dialect."""

    code = "invalid_payload"


class Unauthorized(ReceiverError):
    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ReceiverError):
    status_code = 403
    code = "forbidden"


class NotFound(ReceiverError):
    status_code = 404
    code = "not_found"


class Conflict(ReceiverError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ReceiverError):
    status_code = 413
    code = "payload_too_large"


class StoreUnavailable(ReceiverError):
    """Redis could not store or read: the sender may retry, nothing was acknowledged."""

    status_code = 503
    code = "store_unavailable"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"}
