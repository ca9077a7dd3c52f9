"""Ingest: ``POST /callbacks/{provider}``, where providers deliver task state (the hot path),
and ``VERIFY_FINAL``'s check of a claimed SUCCESS."""

from starlette.routing import Route

from receiver.ingest.callbacks import PREFIX, CallbackEndpoint, receive_callback

ROUTES = [Route("/callbacks/{provider}", CallbackEndpoint(), methods=["POST"])]

__all__ = ["PREFIX", "ROUTES", "receive_callback"]
