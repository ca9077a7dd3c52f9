"""What a request handler needs, built once per process by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from starlette.requests import Request

from receiver.admission import Admission
from receiver.batcher import ScriptBatcher
from receiver.events import EventHub
from receiver.metrics import Metrics
from receiver.pricing import PriceTable
from receiver.providers import CLIENTS, MjproxyClient, ProviderClient
from receiver.settings import ProviderAccount, Settings
from receiver.store import TRANSITION, TaskStore
from receiver.tokens import TokenSigner


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

    @classmethod
    def build(cls, settings: Settings) -> Services:
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set (`receiver serve` starts a Redis itself)")
        redis = connect(settings.redis_url, settings.redis_timeout)
        batcher = ScriptBatcher(settings.redis_url, TRANSITION, settings.redis_timeout)
        store = TaskStore(redis, batcher, settings)
        hub = EventHub(redis, store.keys, settings.sse_queue_limit)
        metrics = Metrics()
        metrics.watch_hub(hub)
        return cls(
            settings=settings,
            redis=redis,
            store=store,
            signer=TokenSigner(settings.signing_keys(), settings.callback_token_ttl,
                               settings.subscribe_token_ttl),
            hub=hub,
            admission=Admission(redis, store.keys),
            prices=PriceTable.load(settings.prices_file),
            clients={name: client(account) for name, account in settings.accounts.items()},
            metrics=metrics,
        )

    async def start(self) -> None:
        await self.hub.start()

    async def close(self) -> None:
        await self.hub.close()  # ends every SSE stream of this process
        await self.store.close()
        for provider_client in self.clients.values():
            await provider_client.aclose()
        await self.redis.aclose()


def client(account: ProviderAccount) -> ProviderClient:
    """The provider's client for one account."""
    if account.provider == "mjproxy":
        return MjproxyClient(account.base_url, str(account.api_key),
                             auth_header=account.auth_header)
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


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc
