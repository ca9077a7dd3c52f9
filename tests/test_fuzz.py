"""Fuzzing the dialect parsers, the token checker and the callback route (hypothesis).

The contract: whatever bytes arrive, a parser returns an `Update` or raises `InvalidPayload`
(400), the token checker returns the exact claims it signed or raises a 401/403, and over
HTTP a callback that is not valid is a 4xx with ``{"error", "detail"}``, never a 5xx, and
stores nothing. ``FUZZ_SCALE=20`` (``make chaos``) multiplies every example count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeTimedSerializer

from receiver.cli.redis_server import RedisServer
from receiver.core.constants import CALLBACK_SALT, JOB_ID_RE, SUBSCRIBE_SALT, TENANT_RE
from receiver.core.errors import InvalidPayload, ReceiverError
from receiver.core.limits import TooComplex, TooDeep, check_json
from receiver.core.models import TaskStatus, Update
from receiver.core.tokens import CallbackClaims, SubscribeClaims, TokenSigner
from receiver.providers.dialects import DIALECTS
from receiver.store.tasks import redact_tokens
from tests.conftest import (
    KEYS,
    SAMPLES,
    LiveServer,
    base_settings,
    forget_claims,
    history,
    history_entries,
    mint,
)

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
PURE = settings(max_examples=2000 * SCALE, deadline=None)
PURE_SLOW = settings(max_examples=1000 * SCALE, deadline=None)  # costlier to generate
TOKENS = settings(max_examples=500 * SCALE, deadline=None)
HTTP = settings(max_examples=150 * SCALE, deadline=None)

PROVIDERS = sorted(DIALECTS)
SAMPLE_BODIES = [p.read_bytes() for p in sorted(SAMPLES.glob("*.json"))]
VALID_SAMPLE = {"mjproxy": "mjproxy-success.json", "ohmygpt": "ohmygpt-query-success.json",
                "aigc2d": "aigc2d-success.json"}
ID_KEY = {"mjproxy": "id", "ohmygpt": "taskId", "aigc2d": "task_id"}
ISO_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
LIMIT = 8192  # the live server's max_body_bytes, small so that 413 is reachable


# --- JSON texts, including what no Python value serialises to ---------------------------


class Raw(str):
    """A JSON fragment written as is: numbers past float range or int-to-str limits."""


@dataclass(frozen=True)
class Obj:
    """A JSON object as ordered pairs, so a key may repeat."""

    pairs: tuple[tuple[str, Any], ...]


def dump(value: Any, ascii_only: bool = False) -> bytes:
    """JSON text of ``value``; lone surrogates become invalid UTF-8 as a careless sender's
    would, NaN and Infinity come out as the stdlib writes them."""
    return _text(value, ascii_only).encode("utf-8", "surrogatepass")


def _text(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, list):
        return "[" + ",".join(_text(v, ascii_only) for v in value) + "]"
    pairs = value.pairs if isinstance(value, Obj) else tuple(value.items())
    return "{" + ",".join(
        f"{_text(k, ascii_only)}:{_text(v, ascii_only)}" for k, v in pairs) + "}"


surrogates = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
texts = st.one_of(
    st.text(max_size=20),
    st.text(st.characters() | surrogates, max_size=6),
    st.sampled_from(["", " ", "\x00", "null", "NaN", "-Infinity", "1e999", "\u2028", "%"]),
)
huge_numbers = st.one_of(
    st.integers(1, 6000).map(lambda n: Raw("9" * n)),  # past float, past 4300 digits
    st.integers(10**18, 10**400).map(lambda n: Raw(str(n))),
    st.builds(lambda m, f, e: Raw(f"{m}.{f}e{e}"),
              st.integers(-(10**6), 10**6), st.integers(0, 10**9), st.integers(-400, 400)),
)
numbers = st.one_of(
    st.integers(),
    st.integers(2**53 - 2, 2**64 + 2),
    st.integers(-(2**64) - 2, -(2**63) + 2),
    st.floats(),
    huge_numbers,
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(texts, inner, max_size=4),
        st.lists(st.tuples(texts, inner), max_size=4).map(lambda p: Obj(tuple(p))),
    ),
    max_leaves=10,
)

# --- dialect-shaped objects: the real keys, holding anything ----------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, by weight (``st.one_of`` flattens nested ``one_of``s and
    weighs every leaf alike)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]

    @st.composite
    def pick(draw: st.DrawFn) -> Any:
        return draw(table[draw(st.integers(0, len(table) - 1))])

    return pick()


VALID_STATUSES = [s.value for s in TaskStatus]
statuses = weighted(
    (6, st.sampled_from(VALID_STATUSES)),
    (1, st.sampled_from(["FAILED", "success", " in_progress\n", "\u017fuccess", "Success\t",
                         "", "MODAL ", "NOT START"])),
    (1, scalars),
)
progresses = weighted(
    (2, st.integers(-5, 105).map(lambda p: f"{p}%")),
    (1, (st.sampled_from([4299, 4300, 4301, 6000]) | st.integers(1, 6000)).map(
        lambda n: "9" * n + "%")),  # 4300: the int-from-str digit limit
    (1, st.builds(lambda x, f: f.format(x), numbers, st.sampled_from(
        ["{}%", " {} ", "{}", "{}%%", "+{}%", "{}\n%"]))),
    (1, st.sampled_from(["", "%", "%%", "\u0664\u0665%", "\uff11\uff10\uff10%", "\u00b2%",
                         "nan%", "inf", "-inf%", "1e999", "1_0%", "0x10%"])),
    (1, scalars),
)
ids = st.one_of(
    st.integers(),
    st.integers(2**53, 2**64 + 10),
    huge_numbers,
    st.text("0123456789abcdef-", min_size=1, max_size=24),
    st.text(max_size=140),
    st.sampled_from(["", " ", "\t42\n", "0", "-1", "x" * 128, "x" * 129]),
    scalars,
)
offsets = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
instants = st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999999))
iso_times = st.one_of(
    st.builds(lambda d, tz: d.replace(tzinfo=tz).isoformat(), instants, st.none() | offsets),
    st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "2024-02-30",
                     "2024-06-01T12:00:00Z", "  2024-06-01 12:00 "]),
    scalars,
)
utc8_times = st.one_of(
    instants.map(lambda d: f"{d.year:04d}-{d.month:02d}-{d.day:02d} "
                           f"{d.hour:02d}:{d.minute:02d}:{d.second:02d}"),
    st.sampled_from(["0001-01-01 00:00:00", "0001-01-01 07:59:59", "9999-12-31 23:59:59"]),
    scalars,
)
epoch_ms = st.one_of(numbers, st.integers(-62135596800000 - 10, 253402300799999 + 10))
# one level of containers: st.recursive costs several times more to draw, per example
shallow = st.lists(scalars, max_size=3) | st.dictionaries(texts, scalars, max_size=3)
buttons = st.lists(st.one_of(
    st.fixed_dictionaries({"customId": texts}, optional={"label": scalars, "emoji": scalars}),
    scalars,
), max_size=3) | shallow
urls = st.lists(st.one_of(texts, st.fixed_dictionaries({"url": scalars})), max_size=3) | shallow

FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": ids, "taskId": ids, "task_id": ids,
    "progress": progresses, "action": scalars, "taskType": scalars, "prompt": scalars,
    "promptEn": scalars, "finalPrompt": scalars, "failReason": scalars, "fail_reason": scalars,
    "message": scalars, "imageUrl": scalars, "image_url": scalars, "imageDcUrl": scalars,
    "imageS3Url": scalars, "imageUrls": urls, "buttons": buttons, "actions": buttons,
    "properties": st.fixed_dictionaries({}, optional={"finalPrompt": scalars}) | scalars,
    "point": numbers | scalars, "code": scalars, "statusCode": scalars,
    "submitTime": epoch_ms | iso_times, "startTime": epoch_ms | iso_times,
    "finishTime": epoch_ms | iso_times, "submit_time": utc8_times, "start_time": utc8_times,
    "finish_time": utc8_times, "junk": shallow | json_values,
}
good_ids = st.one_of(st.integers(0, 2**70), st.text("0123456789abcdef", min_size=1, max_size=20),
                     st.integers(10**18, 10**40).map(lambda n: Raw(str(n))))


@st.composite
def tasks(draw: st.DrawFn) -> dict[str, Any]:
    """Status and id mostly valid (a parser reads the other fields only past them), then a
    few of the real keys holding anything."""
    doc = {"status": draw(statuses)}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=8)):
        doc[key] = draw(FIELDS[key])
    if "progress" not in doc and draw(st.booleans()):
        doc["progress"] = draw(progresses)
    for key in ("id", "taskId", "task_id"):
        if key not in doc and draw(st.integers(0, 3)):
            doc[key] = draw(good_ids)
    return doc


@st.composite
def shaped(draw: st.DrawFn) -> Any:
    """A task object of any dialect: bare, wrapped in ``data``, with repeated keys, or with a
    field nested deep (the JSON parsers' depth limits)."""
    doc = draw(tasks())
    kind = draw(st.sampled_from(["bare", "wrapped", "repeated", "deep"]))
    if kind == "wrapped":
        return {"statusCode": draw(scalars), "data": doc, **draw(
            st.fixed_dictionaries({}, optional={"taskId": ids, "status": statuses}))}
    if kind == "repeated":
        pairs = list(doc.items())
        pairs += draw(st.lists(st.tuples(st.sampled_from(sorted(FIELDS)), ids), max_size=3))
        return Obj(tuple(draw(st.permutations(pairs))))
    if kind == "deep":  # around the service's limit (32), and up to orjson's (1024)
        depth = draw(st.integers(0, 40) | st.integers(0, 1100))
        doc["junk"] = Raw("[" * depth + "]" * depth)
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real sample, byte-mutated: truncated, bits flipped, bytes inserted or deleted."""
    body = bytearray(draw(st.sampled_from(SAMPLE_BODIES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, len(body)))
        if op == "truncate":
            del body[at:]
        elif op == "flip" and at < len(body):
            body[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"9" * 30, b"\\ud800",
                 b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"e999", b"-", b"."]))
        elif op == "delete":
            del body[at:at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            body[at:at] = body[at:at + draw(st.integers(1, 32))]
    return bytes(body)


@st.composite
def sample_with_a_field_replaced(draw: st.DrawFn) -> bytes:
    """A real sample whose fields (top level or in ``data``) get random values."""
    doc = json.loads(draw(st.sampled_from(SAMPLE_BODIES)))
    target = doc["data"] if isinstance(doc.get("data"), dict) and draw(st.booleans()) else doc
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(target)) | st.sampled_from(sorted(FIELDS)))
        target[key] = draw(FIELDS.get(key, json_values) | json_values)
    return dump(doc, draw(st.booleans()))


json_bodies = st.builds(dump, json_values, st.booleans())
shaped_bodies = st.builds(dump, shaped(), st.booleans())
bodies = st.one_of(st.binary(max_size=300), json_bodies, shaped_bodies, mutated(),
                   sample_with_a_field_replaced())


# --- 1. the parsers, as pure functions ----------------------------------------------------


def check_parse(provider: str, body: bytes) -> Update | None:
    """The parser's answer if it is one the contract allows: an `Update` that can be
    stored, or None for `InvalidPayload`. Any other exception propagates: a bug."""
    try:
        update = DIALECTS[provider](body)
    except InvalidPayload as exc:
        assert exc.status_code == 400 and exc.code == "invalid_payload" and exc.detail
        return None
    assert isinstance(update, Update)
    assert isinstance(update.status, TaskStatus)
    assert update.progress is None or (
        type(update.progress) is int and 0 <= update.progress <= 100)
    ptid = update.provider_task_id
    assert isinstance(ptid, str) and ptid and ptid == ptid.strip()
    assert len(ptid) <= 128 or re.fullmatch(r"-?[0-9]+", ptid)
    for name in ("submitted_at", "started_at", "finished_at"):
        value = getattr(update, name)
        assert value is None or ISO_RE.match(value), (name, value)
    assert update.raw is body
    for value in update.fields().values():  # what the store serialises, field by field
        orjson.dumps(value)
    return update


def check_all(body: bytes) -> dict[str, Update | None]:
    return {provider: check_parse(provider, body) for provider in PROVIDERS}


def is_json_object(body: bytes) -> bool:
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False


@PURE
@given(st.binary(max_size=512))
def test_parsers_on_arbitrary_bytes(body: bytes) -> None:
    outcomes = check_all(body)
    if not is_json_object(body):
        assert outcomes == dict.fromkeys(PROVIDERS)


@PURE_SLOW
@given(json_values, st.booleans())
def test_parsers_on_arbitrary_json(value: Any, ascii_only: bool) -> None:
    body = dump(value, ascii_only)
    outcomes = check_all(body)
    if not isinstance(value, dict | Obj):
        assert outcomes == dict.fromkeys(PROVIDERS)


MISSING = object()


def lookup(doc: Any, key: str) -> Any:
    """What a JSON parser keeps for ``key``: the last of its values."""
    pairs = doc.pairs if isinstance(doc, Obj) else doc.items()
    return next((v for k, v in reversed(list(pairs)) if k == key), MISSING)


@PURE
@given(shaped(), st.booleans())
def test_parsers_on_dialect_shaped_objects(doc: Any, ascii_only: bool) -> None:
    body = dump(doc, ascii_only)
    for provider, update in check_all(body).items():
        if update is None:
            continue
        # the id is kept exact, as the sender wrote it (however large)
        task = doc
        if provider == "ohmygpt" and lookup(doc, "taskId") is MISSING:
            task = lookup(doc, "data")
        sent = lookup(task, ID_KEY[provider])
        if isinstance(sent, Raw) or (isinstance(sent, int) and not isinstance(sent, bool)):
            assert update.provider_task_id == str(sent)  # a decimal string, exact
        else:
            assert isinstance(sent, str) and update.provider_task_id == sent.strip(), sent


@PURE_SLOW
@given(st.one_of(mutated(), sample_with_a_field_replaced()))
def test_parsers_on_mutated_samples(body: bytes) -> None:
    check_all(body)


def test_the_samples_parse_as_their_dialect() -> None:
    """The seeds themselves: each valid sample is a task of its dialect."""
    for provider, name in VALID_SAMPLE.items():
        update = check_parse(provider, (SAMPLES / name).read_bytes())
        assert update is not None and update.status is TaskStatus.SUCCESS


# What the fuzzing above found, kept as plain, deterministic cases.

def test_a_progress_of_over_4300_digits_is_not_an_internal_error() -> None:
    body = b'{"id":"1","task_id":1,"taskId":1,"status":"IN_PROGRESS","progress":"' \
        + b"9" * 4301 + b'%"}'
    for provider in PROVIDERS:
        update = check_parse(provider, body)
        assert update is None or update.progress in (None, 100)  # past a float: dropped


def test_a_deep_body_with_a_float_id_is_not_an_internal_error() -> None:
    depth = 1010  # orjson allows 1023 levels; the stdlib re-parse of a float id recurses
    body = b'{"id":1e20,"taskId":1e20,"task_id":1e20,"status":"SUCCESS","x":' \
        + b"[" * depth + b"]" * depth + b"}"
    assert check_all(body) == dict.fromkeys(PROVIDERS)


# --- 2. the token checker -----------------------------------------------------------------

KEY = "test-key-1"  # the live server's (tests.conftest.base_settings)
SIGNER = TokenSigner(["old-key", KEY], callback_ttl=3600, cache_size=16)  # evicts often
URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
TOKEN_ERRORS = {401: {"missing_token", "invalid_token", "expired_token"},
                403: {"wrong_provider", "wrong_job"}}

job_ids = st.text("0123456789abcdef", min_size=20, max_size=20)
tenants = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
claims_st = st.builds(CallbackClaims, job_ids, tenants, st.sampled_from(PROVIDERS))
token_chars = st.one_of(st.sampled_from(URLSAFE + ".=%+/ "), st.characters(codec="utf-8"))
junk_tokens = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.from_regex(r"[A-Za-z0-9_-]{0,80}\.[A-Za-z0-9_-]{0,8}\.[A-Za-z0-9_-]{0,50}",
                  fullmatch=True),
    st.lists(st.text(URLSAFE, max_size=60), min_size=1, max_size=5).map(".".join),
)


def verify(signer: TokenSigner, token: str | None, provider: str
           ) -> CallbackClaims | ReceiverError:
    """The claims, or the error; any other exception propagates: a bug."""
    try:
        return signer.verify_callback(token, provider)
    except ReceiverError as exc:
        assert exc.code in TOKEN_ERRORS.get(exc.status_code, set()), exc
        return exc


def rejected(result: CallbackClaims | ReceiverError, status: int, *codes: str) -> bool:
    return (isinstance(result, ReceiverError) and result.status_code == status
            and (not codes or result.code in codes))


@TOKENS
@given(junk_tokens, st.sampled_from(PROVIDERS))
def test_arbitrary_tokens_are_401(token: str, provider: str) -> None:
    result = verify(SIGNER, token, provider)
    assert rejected(result, 401, "invalid_token" if token else "missing_token"), result


@st.composite
def tampered_tokens(draw: st.DrawFn) -> tuple[CallbackClaims, str, bool]:
    """(claims, a freshly minted token changed once, whether the change reached the signed
    part: payload or timestamp, before the last dot)."""
    claims = draw(claims_st)
    token = SIGNER.mint_callback(claims)
    signature_at = token.rindex(".") + 1
    op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap"]))
    at = draw(st.integers(0, len(token) - (op != "insert")))
    if op == "replace":
        changed = token[:at] + draw(token_chars) + token[at + 1:]
    elif op == "insert":
        changed = token[:at] + draw(st.text(token_chars, min_size=1, max_size=4)) + token[at:]
    elif op == "delete":
        changed = token[:at] + token[at + draw(st.integers(1, 8)):]
    elif op == "truncate":
        changed = token[:at]
    else:
        other = draw(st.integers(0, len(token) - 1))
        at, other = min(at, other), max(at, other)
        changed = token[:at] + token[other] + token[at + 1:other] + token[at] + token[other + 1:]
    return claims, changed, at < signature_at


@TOKENS
@given(tampered_tokens())
def test_tampered_tokens_never_verify_as_other_claims(case: tuple[CallbackClaims, str, bool]
                                                      ) -> None:
    claims, token, signed_part = case
    original = SIGNER.mint_callback(claims)
    assert verify(SIGNER, original, claims.provider) == claims
    result = verify(SIGNER, token, claims.provider)
    if token == original:
        assert result == claims
    elif signed_part:
        assert rejected(result, 401, "invalid_token", "missing_token"), (token, result)
    else:
        # Within the signature, itsdangerous drops non-ASCII characters and base64 ignores
        # a last character's spare bits: such a token still carries the same signature.
        assert result == claims or rejected(result, 401, "invalid_token"), (token, result)
    # whatever the token, never the claims of another provider's route
    other = next(p for p in PROVIDERS if p != claims.provider)
    assert isinstance(verify(SIGNER, token, other), ReceiverError)


payloads = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "j": job_ids | scalars, "t": tenants | texts, "p": st.sampled_from(PROVIDERS) | texts,
        "k": job_ids | st.none() | texts,
    }),
).map(lambda v: _plain(v))


def _plain(value: Any) -> Any:
    """``value`` with nothing the stdlib JSON writer cannot or will not write."""
    if isinstance(value, Raw | float):
        return 0.5
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return value % 10**18
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Obj):
        return {_plain(k): _plain(v) for k, v in value.pairs}
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def serializer(key: str, salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(
        key, salt=salt, signer_kwargs={"digest_method": hashlib.sha256})


@TOKENS
@given(payloads, st.sampled_from(PROVIDERS))
def test_validly_signed_payloads_verify_only_as_the_claims_they_hold(
    payload: Any, route: str
) -> None:
    callback = serializer(KEY, CALLBACK_SALT).dumps(payload)
    job, tenant, provider = (payload.get(k) for k in "jtp") if isinstance(
        payload, dict) else (None, None, None)
    wellformed = (isinstance(job, str) and bool(JOB_ID_RE.match(job))
                  and isinstance(tenant, str) and bool(TENANT_RE.match(tenant))
                  and isinstance(provider, str))
    result = verify(SIGNER, callback, route)
    if not wellformed:
        assert rejected(result, 401, "invalid_token"), result
    elif provider != route:
        assert rejected(result, 403, "wrong_provider"), result
    else:
        assert result == CallbackClaims(job, tenant, provider)

    subscribe = serializer(KEY, SUBSCRIBE_SALT).dumps(payload)
    task = payload.get("k") if isinstance(payload, dict) else None
    try:
        got: SubscribeClaims | ReceiverError = SIGNER.verify_subscribe(subscribe)
    except ReceiverError as exc:
        got = exc
    if (isinstance(tenant, str) and TENANT_RE.match(tenant)
            and (task is None or (isinstance(task, str) and JOB_ID_RE.match(task)))):
        assert got == SubscribeClaims(tenant, task)
    else:
        assert rejected(got, 401, "invalid_token"), got
    # a token of one purpose never passes for the other
    assert rejected(verify(SIGNER, subscribe, route), 401, "invalid_token")


@TOKENS
@given(claims_st, st.sampled_from(["other key", "subscribe salt", "expired", "rotated"]))
def test_other_keys_salts_and_ages(claims: CallbackClaims, kind: str) -> None:
    payload = {"j": claims.job_id, "t": claims.tenant, "p": claims.provider}
    if kind == "other key":
        token = TokenSigner(["not-" + KEY], 3600).mint_callback(claims)
        assert rejected(verify(SIGNER, token, claims.provider), 401, "invalid_token")
    elif kind == "subscribe salt":
        token = serializer(KEY, SUBSCRIBE_SALT).dumps(payload)
        assert rejected(verify(SIGNER, token, claims.provider), 401, "invalid_token")
    elif kind == "expired":
        token = TokenSigner([KEY], -1).mint_callback(claims)
        expired = verify(TokenSigner([KEY], -1), token, claims.provider)
        assert rejected(expired, 401, "expired_token"), expired
    else:  # the retired key still verifies; the newest key signs
        token = TokenSigner(["old-key"], 3600).mint_callback(claims)
        assert verify(SIGNER, token, claims.provider) == claims
        assert rejected(verify(TokenSigner(["old-key"], 3600), SIGNER.mint_callback(claims),
                               claims.provider), 401, "invalid_token")


def test_a_token_with_a_lone_surrogate_is_401() -> None:
    # Not reachable over HTTP (query strings are decoded with errors="replace"), but the
    # checker's contract is any str.
    for token in ("\ud800", SIGNER.mint_callback(
            CallbackClaims("0123456789abcdef0123", "acme", "mjproxy")) + "\udfff"):
        assert rejected(verify(SIGNER, token, "mjproxy"), 401, "invalid_token")


# --- 3. over HTTP, against a live server --------------------------------------------------


@dataclass
class Live:
    server: LiveServer
    client: httpx.Client
    rdb: redis.Redis
    canary: dict[str, tuple[str, str]]  # provider -> (job id, token)

    def dbsize(self) -> int:
        return int(self.rdb.dbsize())

    def history_len(self, job: str) -> int:
        return len(history_entries(self.rdb, "acme", job))

    def post(self, url: str | bytes, body: bytes) -> httpx.Response:
        """POST ``body`` to ``url``, or to a raw path (bytes: sent as they are)."""
        if isinstance(url, bytes):
            url = httpx.URL(self.server.url).copy_with(raw_path=url)
        answer = self.client.post(url, content=body)
        if answer.status_code >= 500:
            # A bug: the server thread logs its traceback after answering. Let it finish
            # before pytest formats ours (two threads formatting tracebacks at once have
            # crashed pytest's report with "AST constructor recursion depth mismatch").
            time.sleep(0.3)
        return answer


@pytest.fixture(scope="module")
def live(redis_server: RedisServer) -> Iterator[Live]:
    server = LiveServer(base_settings(redis_server.url, max_body_bytes=LIMIT,
                                      mint_rate=0)).start()
    rdb = redis.Redis(port=redis_server.port)
    # no keep-alive: a 500 (a bug) closes its connection, and must not fail the next request
    with server.client("key-acme", limits=httpx.Limits(max_keepalive_connections=0)) as client:
        canary = {}
        for provider in PROVIDERS:
            job, url = mint(client, provider)
            canary[provider] = (job, token_of(url))
        yield Live(server, client, rdb, canary)
    rdb.close()
    server.stop()


def token_of(url: str) -> str:
    query = urlsplit(url).query
    assert query.startswith("token=")
    return query[len("token="):]


def assert_error(answer: httpx.Response, status: int, *codes: str) -> None:
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/json")
    doc = answer.json()
    assert set(doc) == {"error", "detail"}, doc
    assert isinstance(doc["detail"], str)
    assert not codes or doc["error"] in codes, doc


# a task of the dialect, padded to either side of the body limit
padded = st.builds(lambda body, size: body + b" " * (size - len(body)),
                   st.sampled_from(SAMPLE_BODIES), st.integers(LIMIT - 4, LIMIT + 4))
http_bodies = st.one_of(bodies, padded)


@st.composite
def bad_tokens(draw: st.DrawFn, provider: str, live: Live
               ) -> tuple[bytes | None, int, tuple[str, ...]]:
    """(the query string, the status it must get, its error codes)."""
    job, token = live.canary[provider]
    kind = draw(st.sampled_from(["none", "empty", "junk", "tampered", "other provider",
                                 "other key", "subscribe"]))
    if kind == "none":
        return None, 401, ("missing_token",)
    if kind == "empty":
        return b"token=", 401, ("missing_token",)
    if kind == "junk":
        text = draw(junk_tokens.filter(bool))
    elif kind == "tampered":  # only the signed part: certainly not valid
        at = draw(st.integers(0, token.rindex(".")))
        text = token[:at] + draw(st.text(token_chars, min_size=1, max_size=3)) + token[at:]
    elif kind == "other provider":
        other = draw(st.sampled_from([p for p in PROVIDERS if p != provider]))
        return b"token=" + live.canary[other][1].encode(), 403, ("wrong_provider",)
    elif kind == "other key":
        text = TokenSigner(["not-" + KEY], 3600).mint_callback(
            CallbackClaims(job, "acme", provider))
    else:
        text = TokenSigner([KEY], 3600).mint_subscribe(SubscribeClaims("acme", job))
    return b"token=" + quote(text, safe="").encode(), 401, ("invalid_token",)


@HTTP
@given(st.data(), st.sampled_from(PROVIDERS), http_bodies)
def test_callbacks_without_a_valid_token_are_4xx_and_store_nothing(
    live: Live, data: st.DataObject, provider: str, body: bytes
) -> None:
    query, status, codes = data.draw(bad_tokens(provider, live))
    before = live.dbsize(), [live.history_len(job) for job, _ in live.canary.values()]
    path = f"/callbacks/{provider}".encode() + (b"?" + query if query is not None else b"")
    assert_error(live.post(path, body), status, *codes)
    assert (live.dbsize(), [live.history_len(job) for job, _ in live.canary.values()]) == before


@HTTP
@given(st.sampled_from(PROVIDERS), http_bodies)
def test_a_valid_token_with_any_body_is_200_only_for_a_task_of_the_dialect(
    live: Live, provider: str, body: bytes
) -> None:
    forget_claims(live.rdb)
    job, url = mint(live.client, provider)
    before, keys = live.history_len(job), live.dbsize()
    assert before == 1  # created
    answer = live.post(url, body)
    settings = live.server.settings
    if len(body) > LIMIT:
        assert_error(answer, 413, "payload_too_large")
    elif too_deep(body, settings.max_json_depth, settings.max_json_containers):
        assert_error(answer, 413, "json_too_deep", "json_too_complex")
    elif check_parse(provider, body) is None:
        assert_error(answer, 400, "invalid_payload")
    else:
        assert answer.status_code == 200, answer.text
        doc = answer.json()
        assert doc["job_id"] == job and doc["result"] in ("stored", "duplicate", "stale"), doc
        if doc["result"] == "stored":
            assert live.history_len(job) == before + 1
            # stored as sent, but for any callback token in it (real callbacks echo their URL)
            assert history(live.rdb, "acme", job)[-1][b"raw"] == redact_tokens(body)
            return
    assert (live.history_len(job), live.dbsize()) == (before, keys)


def too_deep(body: bytes, limit: int, containers: int = 0) -> bool:
    try:
        check_json(body, limit, containers)
    except (TooDeep, TooComplex):
        return True
    return False


segments = st.one_of(
    st.text(max_size=30).map(lambda s: s.encode()),
    st.binary(max_size=20),
    st.sampled_from([b"", b".", b"..", b"/", b"mjproxy/", b"MJPROXY", b" mjproxy", b"mjproxy\x00",
                     b"ohmygpt%", b"aigc2d?", b"%2F", b"callbacks"]),
    st.sampled_from(PROVIDERS).map(str.encode),
)


@HTTP
@given(segments, st.sampled_from(PROVIDERS), http_bodies)
def test_any_provider_segment_is_404_or_401(live: Live, segment: bytes, provider: str,
                                            body: bytes) -> None:
    """Unknown providers are 404 whatever the token; known ones then need a valid token."""
    job, token = live.canary[provider]
    tampered = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    before = live.dbsize(), live.history_len(job)
    path = b"/callbacks/" + b"".join(b"%%%02X" % byte for byte in segment)
    answer = live.post(path + b"?token=" + tampered.encode(), body)
    name = segment.decode("utf-8", "replace")
    if name in DIALECTS:
        assert_error(answer, 401, "invalid_token")
    elif name.rstrip("/") in DIALECTS:  # "/callbacks/mjproxy/": no redirect carrying the URL
        assert "location" not in answer.headers
        assert_error(answer, 404, "unknown_provider", "not_found")
    else:
        assert_error(answer, 404, "unknown_provider", "not_found")
    assert (live.dbsize(), live.history_len(job)) == before


query_parts = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#&"),
    max_size=30,
).filter(lambda part: not part.startswith("token="))


@HTTP
@given(st.sampled_from(PROVIDERS), st.lists(query_parts, max_size=6),
       st.one_of(st.none(), junk_tokens.map(lambda t: quote(t, safe="")), st.just("valid")),
       st.data())
def test_any_query_string_is_401_without_the_valid_token(
    live: Live, provider: str, parts: list[str], token: str | None, data: st.DataObject
) -> None:
    """The first ``token=`` decides; nothing else in the query matters."""
    job = url = None
    if token == "valid":
        forget_claims(live.rdb)
        job, url = mint(live.client, provider)
        token = token_of(url)
    if token is not None:
        parts.insert(data.draw(st.integers(0, len(parts))), "token=" + token)
    before = live.dbsize()
    path = f"/callbacks/{provider}?{'&'.join(parts)}".encode()
    answer = live.post(path, (SAMPLES / VALID_SAMPLE[provider]).read_bytes())
    if job is not None:
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"result": "stored", "job_id": job, "version": 2}
        # a SUCCESS: its history is compacted in the background; let it be, so the next
        # example's key count is not changed under it
        deadline = time.monotonic() + 10
        while live.rdb.exists(KEYS.history("acme", job)):
            assert time.monotonic() < deadline, "the history was not compacted"
            time.sleep(0.01)
    else:
        assert_error(answer, 401, "invalid_token" if token else "missing_token")
        assert live.dbsize() == before


@pytest.mark.parametrize("body", [
    b'{"id":"1","task_id":1,"taskId":1,"status":"IN_PROGRESS","progress":"'
    + b"9" * 4301 + b'%"}',
    b'{"id":1e20,"taskId":1e20,"task_id":1e20,"status":"SUCCESS","x":'
    + b"[" * 1010 + b"]" * 1010 + b"}",
], ids=["progress-4301-digits", "deep-with-float-id"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_found_bodies_are_not_a_500(live: Live, provider: str, body: bytes) -> None:
    forget_claims(live.rdb)
    job, url = mint(live.client, provider)
    answer = live.post(url, body)
    assert answer.status_code < 500, answer.text
    if too_deep(body, live.server.settings.max_json_depth):
        assert_error(answer, 413, "json_too_deep")  # the depth limit answers first
    elif answer.status_code != 200:
        assert_error(answer, 400, "invalid_payload")
    if answer.status_code != 200:
        assert live.history_len(job) == 1
