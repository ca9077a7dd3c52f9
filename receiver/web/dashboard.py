"""``GET /``: the live dashboard, a single page of plain HTML, CSS and an ES module
(``receiver/web/static/``), no build step. It signs in with an API key (kept in the page's
memory), streams ``/events`` with a subscribe token, and submits through ``POST /tasks``."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

ASSETS = Path(__file__).with_name("static")

# The page loads only its own files, images included: the archived ones, from this service
# (`receiver.tasks.images`). A provider's image URL is whatever a callback said, and would
# make every viewer's browser fetch an address of the callback's choosing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


async def index(request: Request) -> Response:
    """``GET /``: the page, with its Content-Security-Policy."""
    return FileResponse(ASSETS / "index.html", headers=SECURITY_HEADERS)


class Assets(StaticFiles):
    """The page's CSS and JavaScript, with the same headers."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


assets = Assets(directory=ASSETS)
