"""The image store: a directory, and a real S3-compatible server (moto's) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import pytest

from receiver.images import NAME_RE, ImageStore, image_name, open_store
from receiver.simulator._http import _png
from tests.conftest import S3Server

PNG = _png(rgb=b"\x01\x02\x03")


async def _read(store: ImageStore, name: str) -> tuple[int, str, bytes] | None:
    image = await store.open(name)
    if image is None:
        return None
    return image.size, image.content_type, b"".join([c async for c in image.chunks])


def _round_trip(store: ImageStore) -> None:
    async def run() -> None:
        name = image_name(PNG, "image/png")
        assert NAME_RE.match(name)
        assert name == f"{hashlib.sha256(PNG).hexdigest()}.png"
        assert await _read(store, name) is None
        assert await store.put(name, PNG) is True
        assert await store.put(name, PNG) is False  # kept once
        assert await _read(store, name) == (len(PNG), "image/png", PNG)
        await store.delete(name)
        await store.delete(name)  # gone already: nothing to say
        assert await _read(store, name) is None

    asyncio.run(run())


def test_a_directory_keeps_an_image_once_by_content(tmp_path: Path) -> None:
    store = ImageStore(f"file://{tmp_path}/images")
    _round_trip(store)
    name = image_name(PNG, "image/png")
    asyncio.run(store.put(name, PNG))
    assert (tmp_path / "images" / name[:2] / name).read_bytes() == PNG


def test_an_s3_bucket_keeps_an_image_once_by_content(s3_server: S3Server) -> None:
    bucket = s3_server.bucket(f"imgs-{uuid.uuid4().hex[:8]}")
    store = ImageStore(f"s3://{bucket}/kept", s3_server.aws())
    _round_trip(store)
    name = image_name(PNG, "image/png")
    asyncio.run(store.put(name, PNG))
    assert s3_server.keys(bucket) == [f"kept/{name[:2]}/{name}"]


def test_no_store_when_image_store_is_empty() -> None:
    assert open_store("") is None


def test_content_types_come_from_the_name(tmp_path: Path) -> None:
    store = ImageStore(f"file://{tmp_path}")
    jpeg = b"\xff\xd8\xff" + b"x" * 10
    name = image_name(jpeg, "image/jpeg")
    assert name.endswith(".jpg")
    asyncio.run(store.put(name, jpeg))
    read = asyncio.run(_read(store, name))
    assert read is not None and read[1] == "image/jpeg"
    with pytest.raises(KeyError):
        image_name(b"", "text/html")
