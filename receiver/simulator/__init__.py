"""A provider simulator: midjourney-proxy (trueai or novicezk), OhMyGPT and AIGC2D over
real HTTP.

The service and its tests run whole task lifecycles against it instead of the real hosts:
submit, a callback per state in the provider's dialect, polling, actions and dialogs, and
the faults real relays have (lost, repeated, reordered or late callbacks, a dropped
callback URL, full queues, no free account, rate limits, failures, tasks that never end).
Any non-empty key is accepted and recorded as the account; ``/_sim/*`` switches faults and
reports what was received. Each provider's behaviour follows its own source, file by file
(see each module); what no source shows is marked as our reading.

Modules: `_config` (configuration, faults), `_tasks` (a task, buttons), `_engine`
(lifecycle, queues, callbacks), `_render` (each provider's task object), `_http` (request
helpers), `_mjproxy` + `_novicezk` + `_trueai`, `_ohmygpt`, `_aigc2d`, `_app` (routes).
"""

from __future__ import annotations

from receiver.simulator._app import create_simulator
from receiver.simulator._config import Faults, SimulatorConfig
from receiver.simulator._tasks import (
    AIGC2D_FIRST_ID,
    DESCRIBE_TEXT,
    DESCRIBE_TEXT_CRLF,
)

__all__ = ["AIGC2D_FIRST_ID", "DESCRIBE_TEXT", "DESCRIBE_TEXT_CRLF", "Faults",
           "SimulatorConfig", "create_simulator"]
