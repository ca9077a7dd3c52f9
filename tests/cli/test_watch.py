"""``receiver watch``: progress bars from the live stream, resumed across a dropped server."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import orjson
import redis
from rich.console import Console

from receiver.cli.watch import watch
from tests.conftest import LiveServer, base_settings, history_entries, mint


def progress(pct: int) -> bytes:
    return orjson.dumps({"id": "p1", "status": "IN_PROGRESS", "progress": f"{pct}%"})


SUCCESS = orjson.dumps({"id": "p1", "status": "SUCCESS", "imageUrl": "https://cdn/fox.png"})


class Watcher(threading.Thread):
    def __init__(self, url: str, task_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.task_id = url, task_id
        self.out = io.StringIO()
        self.seen: list[str] = []
        self.code: int | None = None
        self.first = threading.Event()

    def on_event(self, event_id: str, task: dict[str, Any]) -> None:
        self.seen.append(event_id)
        self.first.set()

    def run(self) -> None:
        self.code = watch(self.url, "key-acme", self.task_id, on_event=self.on_event,
                          console=Console(file=self.out, width=120), reconnect_for=15)


def test_watch_follows_a_task_to_its_end(make_server: Callable[..., LiveServer],
                                         r: redis.Redis) -> None:
    server = make_server()
    with server.client("key-acme") as acme:
        job, url = mint(acme, prompt="a red fox")
        watcher = Watcher(server.url, job)
        watcher.start()
        assert watcher.first.wait(10)
        for pct in (20, 60):
            acme.post(url, content=progress(pct))
        acme.post(url, content=SUCCESS)
        watcher.join(15)
    assert watcher.code == 0
    text = watcher.out.getvalue()
    assert "100%" in text and "SUCCESS" in text and "https://cdn/fox.png" in text


def test_watch_resumes_after_the_server_drops(make_server: Callable[..., LiveServer],
                                             r: redis.Redis) -> None:
    first = make_server()
    with first.client("key-acme") as acme:
        job, url = mint(acme)
        watcher = Watcher(first.url, job)
        watcher.start()
        assert watcher.first.wait(10)
        acme.post(url, content=progress(10))
    first.stop()  # the stream drops mid-task
    acme_url = url
    second = LiveServer(base_settings(first.settings.redis_url), port=first.port).start()
    try:
        with second.client("key-acme") as acme:
            acme.post(acme_url, content=progress(50))
            acme.post(acme_url, content=SUCCESS)
        watcher.join(20)
    finally:
        second.stop()
    assert watcher.code == 0
    history = [i.decode() for i, _ in history_entries(r, "acme", job)]
    assert watcher.seen == history  # every event once, none skipped across the drop
