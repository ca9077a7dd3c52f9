"""``receiver.app:create_app``, the documented ASGI factory (it lives in `receiver.web`)."""

from receiver.web.app import create_app

__all__ = ["create_app"]
