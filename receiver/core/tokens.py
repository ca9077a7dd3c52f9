"""Signed tokens: the only lock on callbacks, since providers sign nothing.

A callback token binds job id, tenant and provider, under a salt of its own purpose, with an
expiry. Keys rotate: the newest signs, all verify. Verification happens here and nowhere else.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, NamedTuple

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from receiver.core.constants import (
    CALLBACK_SALT,
    IMAGE_SALT,
    JOB_ID_RE,
    SUBSCRIBE_SALT,
    TENANT_RE,
)
from receiver.core.errors import Forbidden, Unauthorized


class TokenError(Unauthorized):
    """Root of the token errors."""

    code = "invalid_token"


class MissingToken(TokenError):
    code = "missing_token"


class BadToken(TokenError):
    code = "invalid_token"


class ExpiredToken(TokenError):
    code = "expired_token"


class WrongProvider(Forbidden):
    """A valid token used on another provider's callback route."""

    code = "wrong_provider"


class WrongJob(Forbidden):
    """A valid token used for a provider task that is not its job's."""

    code = "wrong_job"


class SubscribeClaims(NamedTuple):
    tenant: str
    # None: every task of the tenant
    task_id: str | None


class CallbackClaims(NamedTuple):
    job_id: str
    tenant: str
    provider: str


class TokenSigner:
    """Mints and verifies callback tokens.

    Verified tokens are cached (a task's callbacks reuse one token many times); the expiry is
    still checked on every use.
    """

    def __init__(
        self, keys: list[str], callback_ttl: int, subscribe_ttl: int = 3600,
        cache_size: int = 10_000, image_ttl: int = 3600,
    ) -> None:
        if not keys:
            raise ValueError("at least one secret key is needed")
        self.callback_ttl = callback_ttl
        self.subscribe_ttl = subscribe_ttl
        self._callback = URLSafeTimedSerializer(
            keys, salt=CALLBACK_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._subscribe = URLSafeTimedSerializer(
            keys, salt=SUBSCRIBE_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        self.image_ttl = image_ttl
        self._image = URLSafeTimedSerializer(
            keys, salt=IMAGE_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._cache: dict[str, tuple[CallbackClaims, float]] = {}
        self._cache_size = cache_size

    def mint_callback(self, claims: CallbackClaims) -> str:
        return self._callback.dumps({"j": claims.job_id, "t": claims.tenant, "p": claims.provider})

    def verify_callback(self, token: str | None, provider: str) -> CallbackClaims:
        if not token:
            raise MissingToken("this callback URL carries no token")
        cached = self._cache.get(token)
        if cached is None:
            cached = self._verify(token)
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[token] = cached
        claims, signed_at = cached
        if time.time() - signed_at > self.callback_ttl:
            raise ExpiredToken("the callback token has expired")
        if claims.provider != provider:
            raise WrongProvider(f"the token is for provider {claims.provider!r}, not {provider!r}")
        return claims

    def mint_subscribe(self, claims: SubscribeClaims) -> str:
        return self._subscribe.dumps({"t": claims.tenant, "k": claims.task_id})

    def verify_subscribe(self, token: str) -> SubscribeClaims:
        """A subscribe token's claims; short-lived, so not cached."""
        return SubscribeClaims(*_scoped(self._subscribe, token, self.subscribe_ttl,
                                        "subscribe", task_required=False))

    def mint_image(self, tenant: str, task_id: str) -> str:
        """A token for ``?token=`` on one task's archived images (an ``<img>`` sends no
        Authorization header), valid for ``image_ttl``."""
        return self._image.dumps({"t": tenant, "k": task_id})

    def verify_image(self, token: str) -> tuple[str, str]:
        """(tenant, task id) of an image token."""
        tenant, task = _scoped(self._image, token, self.image_ttl, "image", task_required=True)
        assert task is not None
        return tenant, task

    def _verify(self, token: str) -> tuple[CallbackClaims, float]:
        if not _TOKEN_CHARS.match(token):  # itsdangerous would drop what is not base64
            raise BadToken("the callback token is not valid")
        try:
            payload, signed_at = self._callback.loads(
                token, max_age=self.callback_ttl, return_timestamp=True
            )
        except SignatureExpired as exc:
            raise ExpiredToken("the callback token has expired") from exc
        except (BadSignature, UnicodeError) as exc:  # UnicodeError: not text a key signs
            raise BadToken("the callback token is not valid") from exc
        return _claims(payload), signed_at.timestamp()


def _scoped(serializer: URLSafeTimedSerializer, token: str, ttl: int, what: str,
            task_required: bool) -> tuple[str, str | None]:
    """(tenant, task id or None) of a short-lived token scoped to a tenant or one task."""
    try:
        payload = serializer.loads(token, max_age=ttl)
    except SignatureExpired as exc:
        raise ExpiredToken(f"the {what} token has expired") from exc
    except (BadSignature, UnicodeError) as exc:
        raise BadToken(f"the {what} token is not valid") from exc
    tenant, task = (payload.get("t"), payload.get("k")) if isinstance(payload, dict) else (
        None, None)
    if not (isinstance(tenant, str) and TENANT_RE.match(tenant)
            and ((task is None and not task_required)
                 or (isinstance(task, str) and JOB_ID_RE.match(task)))):
        raise BadToken(f"the {what} token is not valid")
    return tenant, task


# What our tokens are made of (URL-safe base64 and dots), so one token has one spelling
# (up to the spare bits of base64's last character, which carry nothing).
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_.-]{1,1024}\Z")


def _claims(payload: Any) -> CallbackClaims:
    if not isinstance(payload, dict):
        raise BadToken("the callback token is not valid")
    job, tenant, provider = payload.get("j"), payload.get("t"), payload.get("p")
    if not (
        isinstance(job, str) and JOB_ID_RE.match(job)
        and isinstance(tenant, str) and TENANT_RE.match(tenant)
        and isinstance(provider, str)
    ):
        raise BadToken("the callback token is not valid")
    return CallbackClaims(job, tenant, provider)
