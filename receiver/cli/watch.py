"""``receiver watch [TASK_ID]``: live progress bars from the SSE stream, in a terminal.

Follows one task until its end, or every task of the tenant, through `receiver.client`: a
dropped connection is resumed with Last-Event-ID, so no event is shown twice or skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from receiver.client import Client, ServiceError, Unreachable

_COLOURS = {"SUCCESS": "green", "FAILURE": "red", "CANCEL": "yellow"}


def watch(
    base_url: str, api_key: str | None = None, task_id: str | None = None, *,
    console: Console | None = None, on_event: Callable[[str, dict[str, Any]], None] | None = None,
    reconnect_for: float = 60.0,
) -> int:
    """Show the events; for one task, 0 once it succeeded, 1 once it failed or was canceled.
    Gives up (2) after ``reconnect_for`` seconds without a connection, or on a refusal."""
    bars: dict[str, TaskID] = {}
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[status]}"), console=console or Console(),
    )
    # the server pings every 15 s: a minute without a byte is a dead connection
    with progress, Client(base_url, api_key, timeout=10.0, read_timeout=60.0,
                          reconnect_for=reconnect_for) as client:
        task: dict[str, Any] | None = None
        try:
            for task in client.events(task_id):
                _show(progress, bars, task)
                if on_event is not None:
                    on_event(task["event_id"], task)
        except Unreachable:
            progress.console.print("[red]the server is unreachable; giving up")
            return 2
        except ServiceError as exc:
            progress.console.print(f"[red]{exc.status}: {exc.code}: {exc.detail}")
            return 2
    if task is None:  # it had ended, and the stream said so (204)
        return 0
    return 0 if task["status"] == "SUCCESS" else 1


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
