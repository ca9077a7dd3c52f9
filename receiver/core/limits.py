"""Abuse limits: what one caller may cost the service.

Providers never retry, so nothing here may refuse an honest callback: the per-token rate
allows far more than any provider sends (a task has a few dozen states), and only a leaked
URL replayed in a loop meets it. Every refusal is 413 or 429 with a ``Retry-After``.

The rates are kept per process (no Redis round trip on the hot path): with N web processes
a caller gets up to N times the rate, which bounds it all the same.
"""

from __future__ import annotations

import re
import time
from array import array
from collections import OrderedDict
from itertools import accumulate

from receiver.core.errors import PayloadTooLarge, ReceiverError


class TooManyRequests(ReceiverError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, detail: str, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = max(1, round(retry_after + 0.49))

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class TooDeep(PayloadTooLarge):
    code = "json_too_deep"


class TooComplex(PayloadTooLarge):
    code = "json_too_complex"


class RateLimiter:
    """Token buckets by key: ``rate`` per second, bursts of ``burst``; the least recently
    used keys are forgotten beyond ``keys`` (a forgotten key starts with a full bucket)."""

    def __init__(self, rate: float, burst: float, keys: int = 100_000) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, what: str) -> None:
        """Spend one token, or raise `TooManyRequests` saying when one will be back."""
        if self.rate <= 0:
            return  # 0: no limit
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise TooManyRequests(f"too many {what}; slow down", (1 - tokens) / self.rate)
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self.keys:
            self._buckets.popitem(last=False)


def check_json(body: bytes, max_depth: int, max_containers: int) -> None:
    """Refuse JSON with more than ``max_containers`` objects and arrays, or nested deeper
    than ``max_depth`` (0: no limit), before any parse and in C. Parsing 87,000 empty arrays
    costs orjson ~5 ms of allocations (15x a flat body of the same size); counted here, they
    cost 0.4 ms. A provider's callback has a few dozen: the one ``count`` each of ``{`` and
    ``[`` that shows a body has fewer brackets than both limits is all it costs.

    Depth: walking the parsed document in Python cost 40 ms on those arrays; here strings go
    (one regex), brackets stay (``translate``), innermost pairs go twice (``replace``) and
    the rest is summed (``accumulate``): 0.6 ms for them, 0.13 ms for a flat body of the same
    size, 5.8 ms for the costliest 256 KB body we could build (depth-31 nests side by side).
    What is not JSON is left to its parser, unless its brackets open deeper than the
    limit."""
    opened = body.count(b"{") + body.count(b"[")
    many = 0 < max_containers < opened
    deep = 0 < max_depth < opened  # fewer brackets than the limit cannot nest deeper
    if not (many or deep):
        return
    skeleton = _skeleton(body)
    if many and skeleton.count(b"[") > max_containers:
        raise TooComplex(f"the JSON has more than {max_containers} objects and arrays")
    if deep:
        passes = min(_PASSES, max_depth)
        for _ in range(passes):  # each pass takes one level off every nest
            skeleton = skeleton.replace(b"[]", b"")
        if not skeleton:
            return
        steps = array("b", skeleton.translate(_STEP))  # +1 per opening bracket, -1 closing
        if max(accumulate(steps)) + passes > max_depth:
            raise TooDeep(f"the JSON is nested deeper than {max_depth} levels")


def check_depth(body: bytes, limit: int) -> None:
    """`check_json` for depth alone."""
    check_json(body, limit, 0)


def _skeleton(body: bytes) -> bytes:
    """The body's brackets outside strings, braces as square brackets."""
    skeleton = _STRING.sub(b"", body) if b'"' in body else body
    return skeleton.translate(_SQUARE, _NOT_BRACKET)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")
_STEP = bytes.maketrans(b"[]", b"\x01\xff")
_PASSES = 2
