"""Reading what the store publishes: one pub/sub subscription per process fanned out to its
subscribers (`hub`), and the tenant stream read by a consumer group, for backends that must
not miss an event (`consumer`)."""

from receiver.events.consumer import EventConsumer, StreamEvent
from receiver.events.hub import Event, EventHub, Sink, Subscription

__all__ = ["Event", "EventConsumer", "EventHub", "Sink", "StreamEvent", "Subscription"]
