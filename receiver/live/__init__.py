"""Live: Server-Sent Events, a tenant's (``/events``) or one task's
(``/tasks/{id}/events``), replayed from Last-Event-ID and then live (`sse`)."""

from starlette.routing import Route

from receiver.live.sse import task_events, tenant_events

ROUTES = [
    Route("/tasks/{job_id}/events", task_events, methods=["GET"]),
    Route("/events", tenant_events, methods=["GET"]),
]

__all__ = ["ROUTES"]
