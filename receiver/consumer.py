"""``receiver.consumer``, the import path earlier releases documented for `EventConsumer`
(it lives in `receiver.events`)."""

from receiver.events.consumer import EventConsumer, StreamEvent

__all__ = ["EventConsumer", "StreamEvent"]
