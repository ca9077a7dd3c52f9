"""Tasks: a tenant's routes for its tasks. Minting callback URLs and subscribe tokens,
reading and listing tasks (`routes`); submitting, cancelling, providers and the cost ledger
(`submit`); the archived images (`images`)."""

from starlette.routing import Route

from receiver.tasks import images, routes, submit

ROUTES = [
    Route("/callback-urls", routes.create_callback_url, methods=["POST"]),
    Route("/subscribe-tokens", routes.create_subscribe_token, methods=["POST"]),
    Route("/tasks", routes.list_tasks, methods=["GET"]),
    Route("/tasks", submit.create_task, methods=["POST"]),
    Route("/tasks/{job_id}", routes.get_task, methods=["GET"]),
    Route("/tasks/{job_id}/history", routes.get_history, methods=["GET"]),
    Route("/tasks/{job_id}/cancel", submit.cancel_task, methods=["POST"]),
    Route("/tasks/{job_id}/images", images.get_task_images, methods=["GET"]),
    Route("/images/{job_id}/{name}", images.get_image, methods=["GET"]),
    Route("/usage", submit.get_usage, methods=["GET"]),
    Route("/providers", submit.list_providers, methods=["GET"]),
]

__all__ = ["ROUTES"]
