"""The chaos run, shortened for CI (``make chaos`` runs 10,000 callbacks for 500 tasks):
Redis SIGKILLed twice and the web process once while a retrying sender delivers; nothing
acknowledged is lost, nothing stored twice, every history is its task's true sequence."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.chaos import run


def test_callbacks_survive_redis_and_web_kills(tmp_path: Path) -> None:
    report = asyncio.run(run(tmp_path, tasks=50, steps=20, time_limit=120))
    assert len(report.faults) == 3, report.faults  # all three kills happened mid-run
    assert report.answers["503"] + sum(
        n for k, n in report.answers.items() if not k.isdigit()) > 0  # and were felt
    assert report.acknowledged == report.callbacks == 1000
    assert (report.lost, report.duplicated, report.wrong_history, report.undelivered) == (
        0, 0, 0, 0)
    assert report.log_lines > 1000 and report.secrets_logged == 0  # access lines included
