"""Where images are kept, by content: ``<sha256>.<ext>``, stored once whoever needs it.

obstore (the Rust ``object_store`` crate's Python face) gives one API over a local directory
and any S3-compatible bucket, so the file store of ``make run`` and an operator's bucket are
the same code. The content type is the name's extension: the local store keeps no
attributes, and the bytes were sniffed (PNG, JPEG, GIF or WebP) before they were kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import obstore
from obstore.store import LocalStore, S3Store

if TYPE_CHECKING:
    from obstore.store import S3Config

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif",
                 "webp": "image/webp"}
_EXTENSIONS = {kind: ext for ext, kind in CONTENT_TYPES.items()}
NAME_RE = re.compile(r"^[0-9a-f]{64}\.(?:png|jpg|gif|webp)\Z")


def image_name(data: bytes, content_type: str) -> str:
    """The name an image is kept under: its sha256, and its type's extension."""
    return f"{hashlib.sha256(data).hexdigest()}.{_EXTENSIONS[content_type]}"


@dataclass
class StoredImage:
    """An image being read: its size, type, and its bytes as they come."""

    size: int
    content_type: str
    chunks: AsyncIterator[bytes]


class ImageStore:
    """Images by name in ``url``'s directory (``file://``) or bucket (``s3://``)."""

    def __init__(self, url: str, aws: Mapping[str, str] | None = None) -> None:
        self.url = url
        self._store: LocalStore | S3Store
        if url.startswith("file://"):
            root = Path(url.removeprefix("file://")).expanduser().resolve()
            self._store = LocalStore(root, mkdir=True)
        else:
            config = {name.lower(): value for name, value in (aws or {}).items()}
            endpoint = config.get("aws_endpoint_url_s3") or config.get("aws_endpoint_url", "")
            # obstore retries a timed-out request up to 10 times within 3 minutes by
            # default: a GET /images from a bucket that accepts and never answers would
            # hang that long. Here: one 30 s request, and retries only within 10 s.
            self._store = S3Store.from_url(
                url, config=cast("S3Config", config),
                client_options={"allow_http": endpoint.startswith("http://"),
                                "connect_timeout": timedelta(seconds=5)},
                retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=10)})

    @staticmethod
    def _path(name: str) -> str:
        return f"{name[:2]}/{name}"  # a directory of 256 entries, not one of millions

    async def put(self, name: str, data: bytes) -> bool:
        """Keep ``data`` as ``name``; False if it was kept already (same name, same bytes).
        A plain PUT after a HEAD, not a conditional one: not every S3-compatible store has
        If-None-Match, and the same name always holds the same bytes."""
        try:
            await obstore.head_async(self._store, self._path(name))
            return False
        except FileNotFoundError:
            pass
        await obstore.put_async(self._store, self._path(name), data)
        return True

    async def open(self, name: str) -> StoredImage | None:
        """The image ``name``, or None if it is not kept (never was, or expired)."""
        try:
            result = await obstore.get_async(self._store, self._path(name))
        except FileNotFoundError:
            return None

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in result:
                yield bytes(chunk)

        return StoredImage(result.meta["size"], CONTENT_TYPES[name.rpartition(".")[2]],
                           chunks())

    async def delete(self, name: str) -> None:
        """Forget ``name`` (nothing happens if it is not kept)."""
        with contextlib.suppress(FileNotFoundError):  # S3 says nothing; a directory does
            await obstore.delete_async(self._store, self._path(name))


def open_store(url: str, aws: Mapping[str, str] | None = None) -> ImageStore | None:
    """The store ``IMAGE_STORE`` names, or None when it names none (empty)."""
    return ImageStore(url, aws) if url else None
