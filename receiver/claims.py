"""Who owns a provider task id: the first task of this service that holds it.

A provider task id is the handle on someone's image (an action on it reuses its prompt and
returns its grid), and ids are guessable (AIGC2D's count up). So the id belongs to one task
of one tenant: a callback URL minted with it, or a callback that would bind a task to it,
is refused (409) when another task holds it, and stores nothing. Our own submit answers are
authoritative: what the provider said it made for our key is ours, whoever claimed the id
first (a tenant who guessed the next AIGC2D id ahead of us keeps a task that can do
nothing: actions go only to tasks this service submitted, see `submitter`).

The claim is one Redis string per id (``Keys.claim``), outside every tenant's slot, so it
costs a round trip of its own: taken when a URL is minted with the id, when a submit is
answered, and when a callback first binds a minted task (the transition script answers
``unclaimed`` instead of storing it, after its duplicate and stale checks; a task already
bound costs nothing more). A task the submitter sent needs no claim for its callbacks: its
token went to the provider alone, and the submit's answer takes the claim.
"""

from __future__ import annotations

from redis.asyncio import Redis

from receiver.constants import Keys
from receiver.errors import Conflict, InvalidPayload

MAX_ID = 200  # characters of a provider task id (theirs are 19-40)


class ProviderTaskClaimed(Conflict):
    code = "provider_task_claimed"


class ClaimRegistry:
    def __init__(self, redis: Redis, keys: Keys, ttl: int) -> None:
        self.redis, self.keys, self.ttl = redis, keys, ttl

    async def claim(self, provider: str, provider_task_id: str, member: str) -> None:
        """Holds the id for ``member`` (``tenant/job``) unless another task holds it."""
        held = await self.redis.set(self._key(provider, provider_task_id), member, nx=True,
                                    get=True, ex=self.ttl)
        if held is not None and held.decode() != member:
            raise ProviderTaskClaimed(
                f"{provider} task {provider_task_id[:80]!r} belongs to another task here")

    async def take(self, provider: str, provider_task_id: str, member: str) -> None:
        """The provider answered our own submit with this id: it is ``member``'s."""
        await self.redis.set(self._key(provider, provider_task_id), member, ex=self.ttl)

    async def release(self, provider: str, provider_task_id: str, member: str) -> None:
        """Gives the id back if ``member`` holds it (its task was never recorded)."""
        key = self._key(provider, provider_task_id)
        if await self.redis.get(key) == member.encode():
            await self.redis.delete(key)

    def _key(self, provider: str, provider_task_id: str) -> str:
        if len(provider_task_id) > MAX_ID:
            raise InvalidPayload(f"a provider task id has at most {MAX_ID} characters")
        return self.keys.claim(provider, provider_task_id)
