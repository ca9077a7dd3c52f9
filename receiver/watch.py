"""``receiver watch [TASK_ID]``: live progress bars from the SSE stream, in a terminal.

Follows one task until its end, or every task of the tenant. A dropped connection is resumed
with Last-Event-ID, so no event is shown twice or skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from httpx_sse import connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from receiver.events import TERMINAL_EVENTS

_COLOURS = {"SUCCESS": "green", "FAILURE": "red", "CANCEL": "yellow"}


def watch(
    base_url: str, api_key: str | None = None, task_id: str | None = None, *,
    console: Console | None = None, on_event: Callable[[str, dict[str, Any]], None] | None = None,
    reconnect_for: float = 60.0,
) -> int:
    """Show the events; for one task, 0 once it succeeded, 1 once it failed or was canceled.
    Gives up (2) after ``reconnect_for`` seconds without a connection."""
    path = f"/tasks/{task_id}/events" if task_id else "/events"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(10.0, read=60.0)  # the server pings every 15 s
    bars: dict[str, TaskID] = {}
    last: str | None = None
    down_since: float | None = None
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[status]}"), console=console or Console(),
    )
    with progress, httpx.Client(base_url=base_url, timeout=timeout) as client:
        while True:
            try:
                resume = {"Last-Event-ID": last} if last else {}
                with connect_sse(client, "GET", path, headers={**headers, **resume}) as source:
                    if source.response.status_code != 200:
                        source.response.read()
                        progress.console.print(f"[red]{source.response.status_code}: "
                                               f"{source.response.text}")
                        return 2
                    down_since = None
                    for sse in source.iter_sse():
                        if not sse.id or not sse.data:  # the retry hint
                            continue
                        last, task = sse.id, orjson.loads(sse.data)
                        _show(progress, bars, task)
                        if on_event is not None:
                            on_event(sse.id, task)
                        if task_id is not None and sse.event in TERMINAL_EVENTS:
                            return 0 if task["status"] == "SUCCESS" else 1
            except httpx.TransportError:
                pass
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > reconnect_for:
                progress.console.print("[red]the server is unreachable; giving up")
                return 2
            time.sleep(0.5)


def _show(progress: Progress, bars: dict[str, TaskID], task: dict[str, Any]) -> None:
    status = task["status"]
    colour = _COLOURS.get(status, "cyan")
    text = f"[{colour}]{status}[/]"
    if status == "SUCCESS" and task.get("image_url"):
        text += f" {task['image_url']}"
    elif status == "FAILURE" and task.get("fail_reason"):
        text += f" {task['fail_reason']}"
    label = f"{task['id'][-8:]} {task.get('action') or ''} {(task.get('prompt') or '')[:30]}"
    if task["id"] not in bars:
        bars[task["id"]] = progress.add_task(label.strip(), total=100, status=text)
    progress.update(bars[task["id"]], completed=task["progress"], status=text)
