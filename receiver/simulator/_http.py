"""Request reading and answer writing shared by the dialect modules, and the image route.

Every complaint about a request body is a ``SimError("invalid")``; each dialect decides how
its provider words it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import zlib
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import Response

from receiver.simulator._config import SimError
from receiver.simulator._engine import Simulator

DIMENSIONS = ("PORTRAIT", "SQUARE", "LANDSCAPE")
# What both relays' data-URL parsers take: data:<mime>[;param...];base64,<base64>
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,(.*)", re.DOTALL)


def _png(width: int = 4, height: int = 4, rgb: bytes = b"\x5b\x8d\xef") -> bytes:
    """A tiny valid PNG, so clients that fetch and decode an image URL get an image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + rgb * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


PNG = _png()


def json_answer(doc: Any, status: int = 200) -> Response:
    # orjson keeps integers past 2**53 exact, as AIGC2D's ids need.
    return Response(orjson.dumps(doc), status, media_type="application/json")


def empty(status: int = 200) -> Response:
    """No body at all (no content type either), as a Java or .NET controller returning null."""
    return Response(b"", status)


async def read_doc(request: Request, form_ok: bool = False) -> dict[str, Any]:
    body = await request.body()
    # curl -d labels JSON as a form: the body's first byte decides.
    if form_ok and not body.lstrip().startswith(b"{") and request.headers.get(
            "content-type", "").startswith("application/x-www-form-urlencoded"):
        pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k.removesuffix("[]"): v if k.endswith("[]") or k == "base64Array" else v[-1]
                for k, v in pairs.items()}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SimError("invalid", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise SimError("invalid", "the body is not a JSON object")
    return doc


def text(doc: dict[str, Any], key: str, required: bool = True) -> str:
    value = doc.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise SimError("invalid", f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise SimError("invalid", f"{key} must be a string")
    return value


def optional(doc: dict[str, Any], key: str) -> str | None:
    """A string field that may be absent (kept as given, null when absent)."""
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SimError("invalid", f"{key} must be a string")
    return value


def http_url(doc: dict[str, Any], key: str) -> str | None:
    url = text(doc, key, required=False)
    if url and not url.startswith(("http://", "https://")):
        raise SimError("invalid", f"{key} must be an http(s) URL")
    return url or None


def task_id(doc: dict[str, Any], key: str) -> str:
    """An id given as a JSON integer or a decimal string (JavaScript clients send those)."""
    value = doc.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise SimError("invalid", f"{key} is required (an integer or a string)")


def is_data_url(value: Any) -> bool:
    """A ``data:image/png;base64,...`` URL whose payload decodes: what the relays' parsers
    (Java's DataUrlSerializer, trueai's DataUrl.Parse) accept. A plain URL is not one."""
    if not isinstance(value, str):
        return False
    match = _DATA_URL.fullmatch(value.strip())
    if match is None:
        return False
    try:
        base64.b64decode(match.group(1), validate=False)
    except (binascii.Error, ValueError):
        return False
    return True


def string_list(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SimError("invalid", f"{key} must be a list of images")
    return value


def images(doc: dict[str, Any], key: str, low: int, high: int) -> list[str]:
    value = string_list(doc, key)
    if not low <= len(value) <= high:
        raise SimError("invalid", f"{key} must hold {low} to {high} images, not {len(value)}")
    return value


def dimensions(doc: dict[str, Any], required: bool = False) -> None:
    value = doc.get("dimensions")
    if (value is None and required) or (value is not None and value not in DIMENSIONS):
        raise SimError("invalid", f"dimensions must be one of {', '.join(DIMENSIONS)}")


def bearer(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def base_url(sim: Simulator, request: Request) -> str:
    return (sim.config.public_url or str(request.base_url)).rstrip("/")


def sim_of(request: Request) -> Simulator:
    sim: Simulator = request.app.state.sim
    return sim


def server_error() -> Response:
    return Response("Internal Server Error", 500, media_type="text/plain")


async def image(request: Request) -> Response:
    """A PNG of its own for every name (its colour from the name's hash), so images kept by
    content are as many as the names; 404 for all once the links expire (the fault)."""
    name: str = request.path_params["name"]
    if not name.endswith(".png"):
        return Response("Not Found", 404, media_type="text/plain")
    sim = sim_of(request)
    sim.image_requests += 1
    if sim.faults.expire_images:
        return Response("This content is no longer available.", 404, media_type="text/plain")
    return Response(_png(rgb=hashlib.sha256(name.encode()).digest()[:3]),
                    media_type="image/png", headers={"Cache-Control": "max-age=86400"})
