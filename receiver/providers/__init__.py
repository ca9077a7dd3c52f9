"""The providers: their clients (submit a task with our callback URL, fetch a task's state,
cancel), how their callbacks read (`dialects`), prices (`pricing`) and fetching a tenant's
image inputs safely (`fetch`).

One client per provider account, with explicit timeouts and limits. Every answer is
classified by its provider's table (`receiver.providers._answers`): accepted (with the
provider's task id), or a `ProviderError` that says what happened and whether trying again
could submit the task twice.
"""

from __future__ import annotations

from receiver.core.buttons import button_action
from receiver.providers._aigc2d import ASSUMPTIONS as AIGC2D_ASSUMPTIONS
from receiver.providers._aigc2d import Aigc2dClient
from receiver.providers._answers import Outcome, Row, classify
from receiver.providers._base import (
    ACTIONS,
    ProviderClient,
    SubmitRequest,
    dialog_input,
    find_button,
    grid_position,
)
from receiver.providers._errors import (
    BadProviderKey,
    BannedPrompt,
    CannotCancel,
    InvalidRequest,
    ModeMismatch,
    ProviderDown,
    ProviderError,
    QueueFull,
    Transient,
    UnknownParent,
    UnknownTask,
)
from receiver.providers._mjproxy import FLAVORS as MJPROXY_FLAVORS
from receiver.providers._mjproxy import MjproxyClient
from receiver.providers._ohmygpt import OhmygptClient

CLIENTS: dict[str, type[ProviderClient]] = {
    client.name: client for client in (MjproxyClient, OhmygptClient, Aigc2dClient)
}

__all__ = [
    "ACTIONS", "AIGC2D_ASSUMPTIONS", "CLIENTS", "MJPROXY_FLAVORS", "Aigc2dClient",
    "BadProviderKey", "BannedPrompt", "CannotCancel", "InvalidRequest", "MjproxyClient",
    "ModeMismatch", "OhmygptClient", "Outcome", "ProviderClient", "ProviderDown",
    "ProviderError", "QueueFull", "Row", "SubmitRequest", "Transient", "UnknownParent",
    "UnknownTask", "button_action", "classify", "dialog_input", "find_button",
    "grid_position",
]
