"""Names shared by every module: Redis key layout, token purposes, canonical field order.

Every Redis key of a tenant carries the tenant as its hash tag (``{acme}``), so one task's
hash, its history stream, the tenant's event stream and the indexes all live in one slot and
the transition script stays valid on Redis Cluster. The price: one tenant is one slot.
"""

from __future__ import annotations

import re

DEFAULT_PREFIX = "receiver"

# Token purposes. Each is an itsdangerous salt, so a token minted for one purpose never
# verifies for another.
CALLBACK_SALT = "receiver.callback.v1"
SUBSCRIBE_SALT = "receiver.subscribe.v1"
IMAGE_SALT = "receiver.image.v1"

# \Z, not $: "$" also matches before a final newline, and these go into JSON quotes.
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")  # a tenant's, an account's
TENANT_RE = NAME_RE
JOB_ID_RE = re.compile(r"^[0-9a-f]{20}\Z")

# The canonical task, in the order it is serialised. Stored as one Redis hash per task whose
# values are JSON texts, so the Lua script can assemble the snapshot without a JSON library.
TASK_FIELDS: tuple[str, ...] = (
    "id",
    "tenant",
    "provider",
    "provider_task_id",
    "action",
    "mode",
    "status",
    "progress",
    "prompt",
    "final_prompt",
    "image_url",
    "image_urls",
    # The images as kept by this service (`receiver.images`): set by the archive after SUCCESS.
    "archived_image_url",
    "archived_image_urls",
    "buttons",
    "fail_reason",
    "parent_id",
    "cost",
    "created_at",
    "submitted_at",
    "started_at",
    "finished_at",
    "updated_at",
    "version",
)


class Keys:
    """Every Redis key and channel name the service uses, in one place."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def task(self, tenant: str, job_id: str) -> str:
        """Hash: the task's rank, status, provider task id and canonical values (``r``,
        ``s``, ``p``, ``v``; ``x``: `ADDED_FIELDS`), the submitter's ``a``, ``b``, ``c``,
        ``q`` (see `store`), the compacted history ``h``, ``hl`` and the archive's attempts
        ``ia``."""
        return f"{self.prefix}:task:{{{tenant}}}:{job_id}"

    def history(self, tenant: str, job_id: str) -> str:
        """Stream: every stored transition of one task, with the raw provider payload."""
        return f"{self.prefix}:history:{{{tenant}}}:{job_id}"

    def stream(self, tenant: str) -> str:
        """Stream: every event of a tenant, for consumer groups (bounded by MAXLEN)."""
        return f"{self.prefix}:stream:{{{tenant}}}"

    def channel(self, tenant: str) -> str:
        """Pub/sub channel: every event of a tenant, fire and forget."""
        return f"{self.prefix}:events:{{{tenant}}}"

    def last_event_id(self, tenant: str) -> str:
        """String: the newest event id handed out for the tenant (ids are ours, not XADD's)."""
        return f"{self.prefix}:lastid:{{{tenant}}}"

    def index(self, tenant: str, status: str | None = None) -> str:
        """Sorted set (all scores 0, members job ids, which sort by creation time)."""
        base = f"{self.prefix}:tasks:{{{tenant}}}"
        return base if status is None else f"{base}:{status}"

    def usage(self, tenant: str) -> str:
        """Hash: the cost ledger, ``provider|mode|action|unit|{tasks,spent,refunded}``
        counters (in the tenant's slot, so the transition script refunds atomically)."""
        return f"{self.prefix}:usage:{{{tenant}}}"

    def quota(self, tenant: str) -> str:
        """Hash: what the tenant wrote, by time bucket (``t<n>`` tasks created, ``b<n>``
        bytes) and as totals over the window as of bucket ``N`` (``T``, ``B``); the
        transition script keeps it and checks it against the quotas."""
        return f"{self.prefix}:quota:{{{tenant}}}"

    def claim(self, provider: str, provider_task_id: str) -> str:
        """String: ``tenant/job``, the task that holds a provider task id (see `claims`).
        No hash tag: claims spread over a cluster's slots."""
        return f"{self.prefix}:claim:{provider}:{provider_task_id}"

    # A pool (a provider's accounts, named by the provider) keeps its keys under one hash
    # tag, the pool's: the admission script reads the queues and every account's slots,
    # counts and health together. Before pools there was one account per provider, named
    # as the provider: an account named as its pool has the names it had then.

    def _of(self, kind: str, account: str, pool: str | None) -> str:
        base = f"{self.prefix}:{kind}:{{acct:{pool or account}}}"
        return base if pool is None or account == pool else f"{base}:{account}"

    def queue(self, pool: str, tenant: str) -> str:
        """Sorted set: the tenant's ``tenant/job`` waiting for a slot of one of the pool's
        accounts (NOT_START), scored by the job's creation ms (its id's first 12 hex)."""
        return f"{self.prefix}:queue:{{acct:{pool}}}:{tenant}"

    def routes(self, pool: str) -> str:
        """Hash: ``tenant/job`` -> ``mode\taffinity``, what restricts the accounts that may
        take a queued task (its mode; its parent's account); none: any account."""
        return f"{self.prefix}:route:{{acct:{pool}}}"

    def turns(self, pool: str) -> str:
        """Sorted set: the tenants with tasks waiting for the pool, scored by their turn
        (the lowest is served next; a tenant served goes behind the others)."""
        return f"{self.prefix}:turns:{{acct:{pool}}}"

    def turn(self, pool: str) -> str:
        """String: the pool's turn counter (one more at every task sent)."""
        return f"{self.prefix}:turn:{{acct:{pool}}}"

    def health(self, account: str, pool: str | None = None) -> str:
        """Hash: what the dispatchers saw of the account: ``sent`` (tasks the provider
        accepted), ``paused_until`` (ms: no task is sent to it before), ``pause`` (its
        length, s: it doubles), ``last_error`` and ``last_error_at``."""
        return self._of("health", account, pool)

    def in_flight(self, account: str, pool: str | None = None) -> str:
        """Hash: tenant -> the account's slots it holds (for ``TENANT_MAX_IN_FLIGHT``)."""
        return self._of("inflight", account, pool)

    def legacy_queue(self, pool: str) -> str:
        """Sorted set: the one queue of every tenant, before queues were per tenant; still
        drained first, so that an upgrade strands no queued task."""
        return f"{self.prefix}:queue:{{acct:{pool}}}"

    def slots(self, account: str, pool: str | None = None) -> str:
        """Sorted set: ``tenant/job`` sent to the provider and not yet seen final, scored by
        dispatch ms. Its size is the account's unfinished tasks; the reconciler watches it."""
        return self._of("slots", account, pool)

    def inferred(self, account: str) -> str:
        """Sorted set: tasks we failed as timed out, still polled a while for a late final."""
        return f"{self.prefix}:inferred:{{acct:{account}}}"

    def unknown(self, account: str) -> str:
        """Sorted set: tasks the provider answered it does not know, since when (ms)."""
        return f"{self.prefix}:unknown:{{acct:{account}}}"

    def poll_lock(self, account: str, member: str) -> str:
        """String with a TTL: one worker polls a task at a time."""
        return f"{self.prefix}:poll:{{acct:{account}}}:{member}"

    def archive(self, tenant: str) -> str:
        """Sorted set: the tenant's succeeded tasks whose images are still to be archived,
        scored by when a worker may next take them (ms; a worker taking one pushes it a
        lease ahead). The transition script adds a task at its SUCCESS."""
        return f"{self.prefix}:archive:{{{tenant}}}"

    def images(self) -> str:
        """Sorted set: each archived image (its object name), scored by the ms after which
        no task needs it; the sweeper deletes the object then. No hash tag: images are
        shared by tenants."""
        return f"{self.prefix}:images"

    def image_lock(self, name: str) -> str:
        """Lock: one worker at a time stores, or deletes, one image."""
        return f"{self.prefix}:imagelock:{name}"

    def admission_channel(self) -> str:
        """Pub/sub: an account name, when it may have a free slot or a new task queued."""
        return f"{self.prefix}:admission"

# What a field reads as before anything set it.
FIELD_DEFAULTS: dict[str, str] = {"image_urls": "[]", "archived_image_urls": "[]",
                                  "buttons": "[]", "progress": "0"}
# Fields added since tasks were first stored: kept in the task hash's ``x``, not with the
# others in ``v``, so that a process of an earlier version (a rolling upgrade) reads and
# writes ``v`` as it always did; a task without ``x`` reads them as their defaults.
ADDED_FIELDS: tuple[str, ...] = ("archived_image_url", "archived_image_urls")
