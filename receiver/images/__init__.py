"""Images that last: the objects (`ImageStore`, a directory or an S3-compatible bucket) and
their bookkeeping in Redis (`ArchiveQueue`: the succeeded tasks whose images are still to
be kept; `ImageLedger`: until when each image is needed). The worker's archiver fills them;
``GET /images/...`` (`receiver.tasks.images`) reads them."""

from receiver.images.ledger import ArchiveQueue, ImageLedger
from receiver.images.store import (
    CONTENT_TYPES,
    NAME_RE,
    ImageStore,
    StoredImage,
    image_name,
    open_store,
)

__all__ = [
    "CONTENT_TYPES",
    "NAME_RE",
    "ArchiveQueue",
    "ImageLedger",
    "ImageStore",
    "StoredImage",
    "image_name",
    "open_store",
]
