"""What the capabilities above share at request time: the `Services` a process builds once
(Redis, the store, the hub, the signer, the provider clients, limits, metrics), tenant
authentication (`auth`) and the HTTP helpers every route uses (`http`)."""

from receiver.services.container import Services, services

__all__ = ["Services", "services"]
