"""Abuse limits: what one caller may cost the service.

Providers never retry, so nothing here may refuse an honest callback: the per-token rate
allows far more than any provider sends (a task has a few dozen states), and only a leaked
URL replayed in a loop meets it. Every refusal is 413 or 429 with a ``Retry-After``.

The rates are kept per process (no Redis round trip on the hot path): with N web processes
a caller gets up to N times the rate, which bounds it all the same.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import orjson

from receiver.errors import PayloadTooLarge, ReceiverError


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


def check_depth(body: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than ``limit``. Counting brackets (in C) bounds the depth
    from above, so only a document with many containers is parsed and walked here (one that
    is not JSON is left to its parser to refuse)."""
    if limit <= 0 or body.count(b"{") + body.count(b"[") <= limit:
        return  # 0: no limit
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise TooDeep(f"the JSON is nested deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
