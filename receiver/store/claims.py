"""Who owns a provider task id: the first task of this service that holds it.

A provider task id is the handle on someone's image (an action on it reuses its prompt and
returns its grid), and ids are guessable (AIGC2D's count up). So the id belongs to one task
of one tenant: a callback URL minted with it, or a callback that would bind a task to it,
is refused (409) when another task holds it, and stores nothing. Our own submit answers are
authoritative: what the provider said it made for our key is ours, whoever claimed the id
first (a tenant who guessed the next AIGC2D id ahead of us keeps a task that can do
nothing: actions go only to tasks this service submitted, see `receiver.tasks.submit`).

The claim is one Redis string per id (``Keys.claim``), outside every tenant's slot, so it
costs a round trip of its own when a URL is minted with the id or a submit is answered.
When a callback first binds a minted task, the transition script takes the claim itself on a
single Redis (the key is declared; nothing more is sent), and on a cluster answers
``unclaimed`` for `callbacks` to take it and apply again (after its duplicate and stale
checks, so neither takes a claim). A task already bound costs nothing more. A task the
submitter sent needs no claim for its callbacks: its token went to the provider alone, and
the submit's answer takes the claim.
"""

from __future__ import annotations

from receiver.core.constants import Keys
from receiver.core.errors import Conflict, InvalidPayload
from receiver.core.settings import Settings
from receiver.core.tokens import CallbackClaims
from receiver.store.batcher import ClusterBatcher, ScriptBatcher

MAX_ID = 200  # characters of a provider task id (theirs are 19-40)


class ProviderTaskClaimed(Conflict):
    code = "provider_task_claimed"


def claim_ttl(settings: Settings) -> int:
    """A claim outlives every task that can hold it and every token that can bind one."""
    return settings.task_ttl + settings.callback_token_ttl


class ClaimRegistry:
    """Claims through the transition script's batcher: pipelined with the scripts, on the
    master of the claim's slot."""

    def __init__(self, batcher: ScriptBatcher | ClusterBatcher, keys: Keys,
                 settings: Settings) -> None:
        self.batcher, self.keys, self.ttl = batcher, keys, b"%d" % claim_ttl(settings)

    async def claim(self, owner: CallbackClaims, provider_task_id: str) -> None:
        """Holds the id (of ``owner``'s provider) for ``owner``'s task unless another task
        holds it."""
        key, member = claim_key(self.keys, owner.provider, provider_task_id), holder(owner)
        held = await self.batcher.keyed(key, b"SET", key, member, b"NX", b"GET", b"EX",
                                        self.ttl)
        if held is not None and held != member:
            raise ProviderTaskClaimed(f"{owner.provider} task {provider_task_id[:80]!r} "
                                      "belongs to another task here")

    async def take(self, owner: CallbackClaims, provider_task_id: str) -> None:
        """The provider answered our own submit with this id: it is ``owner``'s."""
        key = claim_key(self.keys, owner.provider, provider_task_id)
        await self.batcher.keyed(key, b"SET", key, holder(owner), b"EX", self.ttl)

    async def release(self, owner: CallbackClaims, provider_task_id: str) -> None:
        """Gives the id back if ``owner`` holds it (its task was never recorded)."""
        key = claim_key(self.keys, owner.provider, provider_task_id)
        if await self.batcher.keyed(key, b"GET", key) == holder(owner):
            await self.batcher.keyed(key, b"DEL", key)


def holder(owner: CallbackClaims) -> bytes:
    """A claim's value: ``tenant/job`` (as the transition script writes it)."""
    return f"{owner.tenant}/{owner.job_id}".encode()


def claim_key(keys: Keys, provider: str, provider_task_id: str) -> bytes:
    """The claim's Redis key, as the transition script takes it."""
    if len(provider_task_id) > MAX_ID:
        raise InvalidPayload(f"a provider task id has at most {MAX_ID} characters")
    return keys.claim(provider, provider_task_id).encode()
