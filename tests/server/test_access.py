"""receiver.server.access: uvicorn's access line, redacted, written in batches."""

from __future__ import annotations

import asyncio
import io

import orjson

from receiver.core.logs import bind_request
from receiver.server import access
from receiver.server.access import AccessLog

FMT = '%s - "%s %s HTTP/%s" %d'


def test_lines_are_redacted_and_written_together() -> None:
    out = io.StringIO()
    log = AccessLog(json_lines=False, stream=out)
    log.info(FMT, "10.0.0.1:5", "POST", "/callbacks/mjproxy?token=abc.def", "1.1", 200)
    log.info(FMT, "10.0.0.1:5", "GET", "/tasks?api_key=k1&limit=2", "1.1", 200)
    log.info(FMT, "10.0.0.1:5", "GET", "/healthz", "1.1", 200)
    assert out.getvalue().count("\n") in (0, 3)  # without a loop: at once
    log.flush()
    assert out.getvalue().splitlines() == [
        'INFO uvicorn.access: 10.0.0.1:5 - "POST /callbacks/mjproxy?token=[redacted] HTTP/1.1" '
        "200",
        'INFO uvicorn.access: 10.0.0.1:5 - "GET /tasks?api_key=[redacted]&limit=2 HTTP/1.1" 200',
        'INFO uvicorn.access: 10.0.0.1:5 - "GET /healthz HTTP/1.1" 200',
    ]


def test_a_burst_is_one_write_after_the_flush_interval_and_json_carries_the_request() -> None:
    out = io.StringIO()
    writes: list[int] = []
    write = out.write
    out.write = lambda text: writes.append(len(text)) or write(text)  # type: ignore[method-assign]
    log = AccessLog(json_lines=True, stream=out)

    async def burst() -> None:
        bind_request({"type": "http", "headers": [(b"x-request-id", b"req-7")]})
        for n in range(200):  # under FLUSH_BYTES
            log.info(FMT, "10.0.0.2:9", "POST", f"/callbacks/aigc2d?token=t{n}", "1.1", 200)
        assert writes == []
        await asyncio.sleep(access.FLUSH_SECONDS + 0.1)

    asyncio.run(burst())
    assert len(writes) == 1
    docs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert len(docs) == 200
    assert docs[0]["request_id"] == "req-7" and docs[0]["status"] == 200
    assert docs[0]["path"] == "/callbacks/aigc2d?token=[redacted]"
    assert {"time", "level", "logger", "message"} <= set(docs[0])
    assert all("token=t" not in line for line in out.getvalue().splitlines())
