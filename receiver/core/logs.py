"""Logging: the filter that keeps tokens and keys out of every line, request ids, and JSON
lines for production (``LOG_FORMAT=json``).

A request's id is its ``X-Request-ID`` header (from a proxy) or a random one, made only when a
line is logged during the request: the callback path pays for a context variable, not for an
id nobody reads.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextvars import ContextVar
from typing import Any

import orjson
from starlette.types import Scope

_CURRENT: ContextVar[Scope | None] = ContextVar("receiver_request", default=None)
_GOOD_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


def bind_request(scope: Scope) -> None:
    """The request whose id the lines logged from here on carry."""
    _CURRENT.set(scope)


def request_id() -> str | None:
    """The id of the request being served, for the lines it logs."""
    scope = _CURRENT.get()
    if scope is None:
        return None
    rid: str | None = scope.get("receiver.request_id")
    if rid is None:
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k == b"x-request-id"), "")
        rid = scope["receiver.request_id"] = (given if _GOOD_ID.match(given)
                                              else os.urandom(8).hex())
    return rid


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and the error."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{record.msecs:03.0f}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid = request_id()
        if rid is not None:
            doc["request_id"] = rid
        if record.exc_info:
            doc["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(doc).decode()

    converter = time.gmtime  # type: ignore[assignment]  # the stub lacks its argument


def log_config(json_lines: bool, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn and ours: every line through one handler."""
    formatter = ({"()": JsonFormatter} if json_lines
                 else {"format": "%(levelname)s %(name)s: %(message)s"})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"redact": {"()": RedactSecrets}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "filters": ["redact"], "stream": "ext://sys.stderr"}},
        "loggers": {
            "": {"handlers": ["default"], "level": level},
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
        },
    }

_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|api_key|key)=)[^&\s\"']+")


def redact(text: str) -> str:
    """``text`` with tokens and keys replaced by ``[redacted]``."""
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
