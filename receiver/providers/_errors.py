"""What a provider's answer means when it is not a submitted task.

Each error says whether trying again could submit the task twice (`retry_safe`: only when the
provider said no, so nothing was queued there). The dispatcher acts on the class: a queue
that is full or a provider busy for now is retried in the task's place; a bad key pauses the
account; everything else fails the task with the provider's own words.
"""

from __future__ import annotations

from receiver.core.errors import ReceiverError


class ProviderError(ReceiverError):
    status_code = 502
    code = "provider_error"
    retry_safe = False  # could a retry submit the task twice?

    def __init__(self, detail: str, provider: str = "") -> None:
        super().__init__(detail)
        self.provider = provider


class QueueFull(ProviderError):
    """The account's queue is full: try again later, in the same place."""

    status_code = 429
    code = "provider_queue_full"
    retry_safe = True  # refused: nothing was queued


class Transient(ProviderError):
    """Refused for now (no account instance, a system error, a rate limit): nothing was
    queued, and the same request can succeed later."""

    status_code = 503
    code = "provider_busy"
    retry_safe = True


class BadProviderKey(ProviderError):
    """The provider refused our key (or our address): the account pauses, tasks wait."""

    code = "provider_auth"
    retry_safe = True  # refused before anything was queued


class BannedPrompt(ProviderError):
    status_code = 400
    code = "banned_prompt"

    def __init__(self, detail: str, provider: str = "", word: str | None = None) -> None:
        super().__init__(detail, provider)
        self.word = word


class InvalidRequest(ProviderError):
    status_code = 400
    code = "provider_refused"


class UnknownParent(ProviderError):
    status_code = 404
    code = "unknown_parent"


class UnknownTask(ProviderError):
    """The provider does not know this task (200 empty, 204 or 404 to a poll)."""

    status_code = 404
    code = "unknown_provider_task"


class ModeMismatch(ProviderError):
    """An action in another mode than its parent's: the modes are separate account pools."""

    status_code = 409
    code = "mode_mismatch"


class CannotCancel(ProviderError):
    """The provider has no way to cancel a task it has started."""

    status_code = 409
    code = "cannot_cancel"


class ProviderDown(ProviderError):
    status_code = 503
    code = "provider_down"

    def __init__(self, detail: str, provider: str = "", retry_safe: bool = False) -> None:
        super().__init__(detail, provider)
        self.retry_safe = retry_safe
