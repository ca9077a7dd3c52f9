"""Tenant authentication: ``Authorization: Bearer <api key>``, or loopback in open mode."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from receiver.core.errors import Forbidden, Unauthorized
from receiver.core.settings import DEFAULT_TENANT, is_loopback
from receiver.services.container import services


class MissingApiKey(Unauthorized):
    code = "missing_api_key"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class LoopbackOnly(Forbidden):
    code = "loopback_only"


class MetricsTokenRequired(Unauthorized):
    code = "metrics_token_required"


class AdminKeyRequired(Unauthorized):
    code = "admin_key_required"


class AdminDisabled(Forbidden):
    code = "admin_disabled"


def bearer(request: Request) -> str:
    """The ``Authorization: Bearer <token>`` token, or "" without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate(request: Request) -> str:
    """The tenant the request acts for."""
    settings = services(request).settings
    if settings.open_mode:
        client = request.client
        if client is None or not is_loopback(client.host):
            raise LoopbackOnly(
                "no RECEIVER_API_KEYS are set, so tenant routes answer loopback clients only"
            )
        return DEFAULT_TENANT
    key = bearer(request)
    if not key:
        raise MissingApiKey("send your API key as 'Authorization: Bearer <key>'")
    tenant = None
    for known, owner in settings.api_keys.items():  # every key compared, in constant time
        if hmac.compare_digest(known.encode(), key.encode()):
            tenant = owner
    if tenant is None:
        raise InvalidApiKey("the API key is not valid")
    return tenant


def authenticate_metrics(request: Request) -> None:
    """``GET /metrics`` with METRICS_TOKEN set: that token, as a bearer token."""
    token = services(request).settings.metrics_token
    if token is not None and not hmac.compare_digest(bearer(request).encode(),
                                                     str(token).encode()):
        raise MetricsTokenRequired("send 'Authorization: Bearer <METRICS_TOKEN>'")


def authenticate_admin(request: Request) -> None:
    """An operator's route: one of RECEIVER_ADMIN_KEYS as a bearer token (every key compared
    in constant time); none set, no admin routes."""
    keys = services(request).settings.admin_keys
    if not keys:
        raise AdminDisabled("no RECEIVER_ADMIN_KEYS are set: the admin routes are off")
    given = bearer(request).encode()
    if not given or not any([hmac.compare_digest(given, str(key).encode()) for key in keys]):
        raise AdminKeyRequired("send an admin key as 'Authorization: Bearer <key>'")
