"""A tenant's archived images (`receiver.images`, kept by the worker's archiver).

``GET /images/{job}/{name}`` answers the task's owner only: its API key, or a signed token
(``?token=``, from ``GET /tasks/{id}/images``, for ``<img>`` tags, which send no
Authorization header) that names the tenant and the task. The image must be one the task's
``archived_image_url(s)`` name: images are kept once by content, so a name alone would let
a tenant read another's image by its hash. Names are content hashes, hence the immutable
cache headers (``private``: they are not for shared caches).
"""

from __future__ import annotations

from typing import Any

import orjson
from obstore.exceptions import BaseError as StoreError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from receiver.core.constants import JOB_ID_RE
from receiver.core.errors import NotFound, ReceiverError
from receiver.images import NAME_RE
from receiver.services.auth import authenticate
from receiver.services.container import services
from receiver.services.http import JSONResponse, task_or_404


class ImageNotFound(NotFound):
    code = "image_not_found"


class ImageStoreUnavailable(ReceiverError):
    """IMAGE_STORE did not answer (a bucket unreachable, a directory unreadable)."""

    status_code = 503
    code = "image_store_unavailable"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "5"}


def archived(task: dict[str, Any]) -> list[str]:
    """The URLs of a task's archived images (the main one first), without repeats."""
    urls = [task.get("archived_image_url"), *(task.get("archived_image_urls") or [])]
    return list(dict.fromkeys(u for u in urls if isinstance(u, str)))


async def get_image(request: Request) -> Response:
    """``GET /images/{job_id}/{name}``: one archived image of the tenant's task."""
    svc = services(request)
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    token = request.query_params.get("token")
    if token:  # (empty: as if absent, as on the event routes)
        tenant, task_id = svc.signer.verify_image(token)
        if task_id != job_id:
            raise ImageNotFound("the token is for another task's images")
    else:
        tenant = authenticate(request)
    if not (JOB_ID_RE.match(job_id) and NAME_RE.match(name)):
        raise ImageNotFound(f"no image {name[:80]!r} of task {job_id[:40]!r}")
    task = orjson.loads(await task_or_404(svc, tenant, job_id))
    if not any(url.rpartition("/")[2] == name for url in archived(task)):
        raise ImageNotFound(f"task {job_id} has no archived image {name!r}")
    etag = f'"{name.partition(".")[0]}"'
    headers = {"Cache-Control": "private, max-age=31536000, immutable", "ETag": etag,
               "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'none'; sandbox"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    try:
        image = await svc.images.open(name) if svc.images is not None else None
    except (StoreError, OSError) as exc:
        raise ImageStoreUnavailable(f"the image store did not answer ({type(exc).__name__})"
                                    ) from exc
    if image is None:
        raise ImageNotFound(f"image {name} is no longer kept")
    headers["Content-Length"] = str(image.size)
    return StreamingResponse(image.chunks, media_type=image.content_type, headers=headers)


async def get_task_images(request: Request) -> Response:
    """``GET /tasks/{id}/images``: the task's archived images as signed URLs, for ``<img>``
    tags (valid for IMAGE_URL_TTL seconds)."""
    tenant = authenticate(request)
    svc = services(request)
    job_id = request.path_params["job_id"]
    task = orjson.loads(await task_or_404(svc, tenant, job_id))
    query = f"?token={svc.signer.mint_image(tenant, job_id)}"

    def signed(url: str | None) -> str | None:
        return None if url is None else url + query

    return JSONResponse({
        "task_id": job_id, "expires_in": svc.signer.image_ttl,
        "image_url": signed(task.get("archived_image_url")),
        "image_urls": [signed(url) for url in task.get("archived_image_urls") or []],
    })
