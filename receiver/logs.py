"""Logging setup, and the filter that keeps tokens and keys out of every log line."""

from __future__ import annotations

import logging
import re
from typing import Any

_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|api_key|key)=)[^&\s\"']+")


def redact(text: str) -> str:
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites query-string secrets in a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        return True


def _redact_arg(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def install_redaction() -> None:
    """Idempotent. Our own code never logs a token; uvicorn logs request lines."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
