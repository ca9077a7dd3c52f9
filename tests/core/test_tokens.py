"""Callback tokens: bound to job, tenant and provider; expiring; rotatable; tamper-evident."""

from __future__ import annotations

import hashlib
import time

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from receiver.core.constants import CALLBACK_SALT, IMAGE_SALT, SUBSCRIBE_SALT
from receiver.core.tokens import (
    BadToken,
    CallbackClaims,
    ExpiredToken,
    MissingToken,
    SubscribeClaims,
    TokenSigner,
    WrongProvider,
)

CLAIMS = CallbackClaims("0123456789abcdef0123", "acme", "mjproxy")
TTL = 3600


def old_token(key: str, age: int, salt: str = CALLBACK_SALT,
              payload: dict[str, str] | None = None) -> str:
    """A token signed ``age`` seconds ago, with the production salt and digest."""

    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age

    serializer = URLSafeTimedSerializer(
        key, salt=salt, signer=Past, signer_kwargs={"digest_method": hashlib.sha256}
    )
    return serializer.dumps(payload or {"j": CLAIMS.job_id, "t": CLAIMS.tenant,
                                        "p": CLAIMS.provider})


def test_round_trip() -> None:
    signer = TokenSigner(["k1"], TTL)
    assert signer.verify_callback(signer.mint_callback(CLAIMS), "mjproxy") == CLAIMS


def test_rotation_newest_signs_all_verify() -> None:
    before = TokenSigner(["k1"], TTL).mint_callback(CLAIMS)
    rotated = TokenSigner(["k1", "k2"], TTL)
    assert rotated.verify_callback(before, "mjproxy") == CLAIMS
    after = rotated.mint_callback(CLAIMS)
    assert TokenSigner(["k2"], TTL).verify_callback(after, "mjproxy") == CLAIMS
    with pytest.raises(BadToken):  # signed by k2, so a k1-only process refuses it
        TokenSigner(["k1"], TTL).verify_callback(after, "mjproxy")
    with pytest.raises(BadToken):  # k1 retired
        TokenSigner(["k2"], TTL).verify_callback(before, "mjproxy")


def test_expired_token_is_refused() -> None:
    signer = TokenSigner(["k1"], TTL)
    assert signer.verify_callback(old_token("k1", TTL - 60), "mjproxy") == CLAIMS
    with pytest.raises(ExpiredToken):
        signer.verify_callback(old_token("k1", TTL + 60), "mjproxy")


def test_cached_token_still_expires() -> None:
    signer = TokenSigner(["k1"], TTL)
    token = old_token("k1", TTL - 1)
    signer.verify_callback(token, "mjproxy")  # now cached
    signer.callback_ttl = 10  # the same token is now past its life
    with pytest.raises(ExpiredToken):
        signer.verify_callback(token, "mjproxy")


@pytest.mark.parametrize("position", [0, 10, -1, -10])
def test_tampered_token_is_refused(position: int) -> None:
    signer = TokenSigner(["k1"], TTL)
    token = list(signer.mint_callback(CLAIMS))
    # "A" (000000) and "Q" (010000) differ in a bit every base64 position uses (the last
    # character of a 32-byte signature carries two unused low bits: "A" -> "B" is no change)
    token[position] = "Q" if token[position] != "Q" else "A"
    with pytest.raises(BadToken):
        signer.verify_callback("".join(token), "mjproxy")


def test_payload_swapped_from_another_token_is_refused() -> None:
    signer = TokenSigner(["k1"], TTL)
    mine = signer.mint_callback(CLAIMS)
    other = signer.mint_callback(CallbackClaims("f" * 20, "acme", "mjproxy"))
    forged = other.split(".")[0] + "." + ".".join(mine.split(".")[1:])
    with pytest.raises(BadToken):
        signer.verify_callback(forged, "mjproxy")


def test_wrong_provider_and_missing_token() -> None:
    signer = TokenSigner(["k1"], TTL)
    token = signer.mint_callback(CLAIMS)
    with pytest.raises(WrongProvider):
        signer.verify_callback(token, "aigc2d")
    with pytest.raises(MissingToken):
        signer.verify_callback("", "mjproxy")
    with pytest.raises(BadToken):
        signer.verify_callback("garbage", "mjproxy")


def test_token_of_another_purpose_is_refused() -> None:
    with pytest.raises(BadToken):
        TokenSigner(["k1"], TTL).verify_callback(old_token("k1", 0, SUBSCRIBE_SALT), "mjproxy")


def test_an_image_token_names_one_task_and_passes_for_no_other_purpose() -> None:
    signer = TokenSigner(["k1"], TTL, subscribe_ttl=60, image_ttl=60)
    image = signer.mint_image("acme", "0123456789abcdef0123")
    assert signer.verify_image(image) == ("acme", "0123456789abcdef0123")
    subscribe = signer.mint_subscribe(SubscribeClaims("acme", "0123456789abcdef0123"))
    with pytest.raises(BadToken):
        signer.verify_image(subscribe)  # salted apart, both ways
    with pytest.raises(BadToken):
        signer.verify_subscribe(image)
    with pytest.raises(BadToken):  # a tenant-wide subscribe token's shape: no task
        signer.verify_image(signer._image.dumps({"t": "acme", "k": None}))
    with pytest.raises(ExpiredToken):  # signed 61 s ago, for a minute
        signer.verify_image(old_token("k1", 61, IMAGE_SALT, {"t": "acme", "k": CLAIMS.job_id}))
