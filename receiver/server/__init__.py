"""How ``receiver serve`` runs under uvicorn, and the only place that touches uvicorn's
internals: every connection's head and body bounds (`guard`), and the protocol that writes
detached event streams itself (`streams`). `guard.uvicorn_contract` lists what we rely on;
a test holds it, and ``receiver serve`` falls back to uvicorn's own protocol without it."""

from receiver.server.guard import GuardedProtocol, uvicorn_contract
from receiver.server.streams import StreamProtocol

__all__ = ["GuardedProtocol", "StreamProtocol", "uvicorn_contract"]
