"""The access log of ``receiver serve``: uvicorn's line, redacted, written in batches.

uvicorn logs each request through `logging`: a LogRecord, the redaction filter twice (the
logger's and the handler's), a formatter, and a write and a flush of stderr per line. Ours
takes the same call (``info(fmt, client, method, path, version, status)``) from our
protocols, redacts the one part that can hold a secret (the query), and appends the line to
a buffer written out every `FLUSH_SECONDS` or `FLUSH_BYTES`: one write for hundreds of
lines. The cost: a line reaches stderr up to `FLUSH_SECONDS` after the request, and lines
buffered when the process is killed (SIGKILL) are lost; a graceful stop writes them.

Text lines are the ones `receiver.core.logs.log_config` gives every logger (``INFO
uvicorn.access: 127.0.0.1:5 - "POST /callbacks/mjproxy?token=[redacted] HTTP/1.1" 200``);
with ``LOG_FORMAT=json``, the JSON lines of `JsonFormatter`, with the request's id and
its method, path and status as fields of their own.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from typing import Any, TextIO

import orjson

from receiver.core.logs import redact, request_id

FLUSH_SECONDS = 0.2
FLUSH_BYTES = 64 * 1024
_LOGGER = "uvicorn.access"


class AccessLog:
    """Stands in for the ``uvicorn.access`` logger in our protocols (`info`, `hasHandlers`)."""

    def __init__(self, json_lines: bool, stream: TextIO | None = None) -> None:
        self.json_lines = json_lines
        self.stream = stream
        self.lines: list[str] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def hasHandlers(self) -> bool:
        return True

    def info(self, msg: str, *args: Any) -> None:
        """uvicorn's call: ``'%s - "%s %s HTTP/%s" %d'`` and its five arguments."""
        client, method, path, version, status = args
        if "=" in path:  # only a query can hold a token or a key
            path = redact(path)
        line = f'{client} - "{method} {path} HTTP/{version}" {status}'
        if self.json_lines:
            doc: dict[str, Any] = {"time": self._now(), "level": "info", "logger": _LOGGER,
                                   "message": line, "method": method, "path": path,
                                   "status": status}
            rid = request_id()
            if rid is not None:
                doc["request_id"] = rid
            text = orjson.dumps(doc).decode() + "\n"
        else:
            text = f"INFO {_LOGGER}: {line}\n"
        self.lines.append(text)
        self.size += len(text)
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        """Writes what is buffered."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.lines:
            return
        text, self.lines, self.size = "".join(self.lines), [], 0
        stream = self.stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # stderr closed: nowhere to write
            pass

    def _now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(now * 1000) % 1000:03d}Z"


_LOGS: dict[bool, AccessLog] = {}


def access_log(json_lines: bool) -> AccessLog | None:
    """The process's access log, or None when ``uvicorn.access`` logs nothing at INFO
    (``--no-access-log``)."""
    logger = logging.getLogger(_LOGGER)
    if not logger.hasHandlers() or not logger.isEnabledFor(logging.INFO):
        return None
    log = _LOGS.get(json_lines)
    if log is None:
        log = _LOGS[json_lines] = AccessLog(json_lines)
        atexit.register(log.flush)
    return log
