"""What a request handler needs, built once per process by the app's lifespan."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError, RedisError, TimeoutError
from starlette.requests import Request

from receiver.core.limits import RateLimiter
from receiver.core.settings import ProviderAccount, Settings
from receiver.core.tokens import TokenSigner
from receiver.events.hub import EventHub
from receiver.images import ImageStore, open_store
from receiver.providers import CLIENTS, MjproxyClient, ProviderClient
from receiver.providers.pricing import PriceTable
from receiver.services.metrics import Metrics
from receiver.store.admission import Admission
from receiver.store.batcher import ClusterBatcher, ScriptBatcher, node_url
from receiver.store.claims import ClaimRegistry
from receiver.store.tasks import TRANSITION, TaskStore

log = logging.getLogger("receiver")
# maxmemory policies that never remove a key to make room (the others may evict a task)
_KEEPS_KEYS = (b"noeviction", "noeviction")


@dataclass
class Services:
    settings: Settings
    redis: Redis
    store: TaskStore
    signer: TokenSigner
    hub: EventHub
    admission: Admission
    prices: PriceTable
    # one per configured provider account
    clients: dict[str, ProviderClient]
    metrics: Metrics
    # pub/sub's connections (`redis` itself, unless that is a Redis Cluster client)
    pubsub: Redis
    # abuse limits, per process: callbacks per task, submissions and mints per tenant
    callback_limiter: RateLimiter
    submit_limiter: RateLimiter
    mint_limiter: RateLimiter
    # who holds which provider task id
    claims: ClaimRegistry
    # where a SUCCESS's images are kept (IMAGE_STORE), or None for nowhere
    images: ImageStore | None

    @classmethod
    def build(cls, settings: Settings) -> Services:
        url, timeout = settings.redis_url, settings.redis_timeout
        if not url:
            raise RuntimeError("REDIS_URL is not set (`receiver serve` starts a Redis itself)")
        # Pub/sub goes through one node: a classic PUBLISH reaches every node of a cluster.
        pubsub = connect(url, timeout)
        batcher: ScriptBatcher | ClusterBatcher
        if settings.redis_cluster:
            cluster = connect_cluster(url, timeout)
            redis = cast(Redis, cluster)  # the same commands; routed by key
            batcher = ClusterBatcher(cluster, url, TRANSITION, timeout)
        elif settings.redis_sentinels:
            redis, locate = connect_sentinel(settings)
            pubsub = redis
            batcher = ScriptBatcher(url, TRANSITION, timeout, locate=locate)
        else:
            redis = pubsub
            batcher = ScriptBatcher(url, TRANSITION, timeout)
        store = TaskStore(redis, batcher, settings)
        hub = EventHub(pubsub, store.keys, settings.sse_queue_limit, settings.sse_ping)
        metrics = Metrics()
        metrics.watch_hub(hub)
        return cls(
            settings=settings,
            redis=redis,
            store=store,
            signer=TokenSigner(settings.signing_keys(), settings.callback_token_ttl,
                               settings.subscribe_token_ttl, image_ttl=settings.image_url_ttl),
            hub=hub,
            pubsub=pubsub,
            callback_limiter=RateLimiter(settings.callback_rate, settings.callback_burst),
            submit_limiter=RateLimiter(settings.submit_rate, settings.submit_burst),
            mint_limiter=RateLimiter(settings.mint_rate, settings.mint_burst),
            claims=ClaimRegistry(batcher, store.keys, settings),
            admission=Admission(redis, store.keys, pubsub, settings.tenant_max_in_flight,
                                store.history),
            prices=PriceTable.load(settings.prices_file),
            clients={name: client(account) for name, account in settings.accounts.items()},
            metrics=metrics,
            images=open_store(settings.image_store, settings.aws),
        )

    async def start(self) -> None:
        if isinstance(self.redis, RedisCluster):
            await self.redis.initialize()  # the slot map, before the first routed call
        await self.hub.start()
        await self._check_eviction()

    async def _check_eviction(self) -> None:
        """Warns when Redis may evict keys under memory pressure: an evicted task is an
        acknowledged callback lost. (A managed Redis may refuse CONFIG: then say nothing.)"""
        try:
            policy = (await self.redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except RedisError:
            return
        if isinstance(policy, bytes | str) and policy not in _KEEPS_KEYS:
            log.warning(
                "Redis's maxmemory-policy is %r: when full it evicts keys, tasks and their "
                "histories among them; set it to noeviction (a full Redis then refuses "
                "writes, which callers see as 503 and retry)", _text(policy))

    def modes_of(self, account: ProviderAccount) -> tuple[str, ...]:
        """The modes an account serves: those its provider's API takes, narrowed to its own
        list if it has one (a novicezk account takes none: only tasks that name no mode)."""
        offered = self.clients[account.name].modes
        return tuple(m for m in offered if not account.modes or m in account.modes)

    async def close(self) -> None:
        await self.hub.close()  # ends every SSE stream of this process
        await self.store.close()
        for provider_client in self.clients.values():
            await provider_client.aclose()
        await self.redis.aclose()
        if self.pubsub is not self.redis:
            await self.pubsub.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def client(account: ProviderAccount) -> ProviderClient:
    """The provider's client for one account."""
    if account.provider == "mjproxy":
        return MjproxyClient(account.base_url, str(account.api_key),
                             auth_header=account.auth_header, flavor=account.flavor)
    return CLIENTS[account.provider](account.base_url, str(account.api_key))


def connect(url: str, timeout: float) -> Redis:
    """A client that fails fast when Redis is gone (callers answer 503) and retries briefly
    on a dropped connection (every write we send is idempotent)."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=30,
    )
    return client


def connect_cluster(url: str, timeout: float) -> RedisCluster:
    """`connect` for Redis Cluster: commands routed by key slot, MOVED followed."""
    return RedisCluster.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[ConnectionError, TimeoutError])


def connect_sentinel(settings: Settings) -> tuple[Redis, Callable[[], Awaitable[str]]]:
    """The master behind Sentinel, and how to find it again (after a failover)."""
    assert settings.redis_url
    url, timeout = settings.redis_url, settings.redis_timeout
    options = parse_url(url)  # type: ignore[no-untyped-call]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [(host, int(port)) for host, _, port in (s.rpartition(":")
                                                 for s in settings.redis_sentinels)],
        socket_timeout=min(timeout, 2.0), socket_connect_timeout=min(timeout, 2.0))
    master = settings.redis_sentinel_master
    client: Redis = sentinel.master_for(
        master, redis_class=Redis, socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0), password=options.get("password"),
        username=options.get("username"), db=options.get("db", 0),
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[ConnectionError, TimeoutError])

    async def locate() -> str:
        host, port = await sentinel.discover_master(master)
        return node_url(url, host, port)

    return client, locate


def services(request: Request) -> Services:
    """The `Services` of the app serving ``request``."""
    svc: Services = request.app.state.services
    return svc
