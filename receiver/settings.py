"""Settings, read once from the environment (and ``.env``) through starlette's Config."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings, Secret

from receiver.constants import DEFAULT_PREFIX, TENANT_RE

DEFAULT_TENANT = "default"
MJPROXY_FLAVORS = ("trueai", "novicezk")  # midjourney-proxy's two API generations
PROVIDERS = ("mjproxy", "ohmygpt", "aigc2d")


@dataclass(frozen=True)
class ProviderAccount:
    """One provider account the submitter sends tasks to (``<PROVIDER>_BASE_URL`` and
    ``_API_KEY``); ``queue_limit`` is its unfinished tasks at most (the seeds' tiers: 3, 20,
    50)."""

    provider: str
    base_url: str
    api_key: Secret
    queue_limit: int = 3
    # mjproxy only: ``mj-api-secret``, or ``Authorization`` (sent the raw key, which trueai
    # compares whole); and the API generation: ``trueai`` (and plus) or ``novicezk``
    auth_header: str = "mj-api-secret"
    flavor: str = "trueai"

    @property
    def name(self) -> str:
        """The account's name in Redis keys and the admission channel."""
        return self.provider


class SettingsError(ValueError):
    """A setting that cannot be used as given."""


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    # Newest last: the newest signs, every one verifies (rotation).
    secret_keys: tuple[Secret, ...] = ()
    public_base_url: str | None = None
    # api key -> tenant
    api_keys: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    redis_prefix: str = DEFAULT_PREFIX
    max_body_bytes: int = 256 * 1024
    # Longer than the longest task (providers time out at 15 minutes) plus retries and
    # delayed deliveries.
    callback_token_ttl: int = 3 * 24 * 3600
    task_ttl: int = 7 * 24 * 3600
    tenant_stream_maxlen: int = 100_000
    task_history_maxlen: int = 1_000
    redis_timeout: float = 5.0
    # REDIS_URL names a node of a Redis Cluster (keys are hash-tagged for it)
    redis_cluster: bool = False
    # Sentinels (host:port) watching the master named redis_sentinel_master: the master's
    # address comes from them (REDIS_URL still gives the password and db)
    redis_sentinels: tuple[str, ...] = ()
    redis_sentinel_master: str = "mymaster"
    subscribe_token_ttl: int = 3600
    # SSE: events a client may fall behind before it is cut off; keep-alive ping; the
    # reconnect delay suggested to clients; the longest a send may block; how many tasks'
    # snapshots a resume from a forgotten id gets.
    sse_queue_limit: int = 1000
    sse_ping: float = 15.0
    sse_retry_ms: int = 2000
    sse_send_timeout: float = 30.0
    sse_snapshot_limit: int = 200
    # The submitter: accounts by provider, the provider POST /tasks uses when none is named,
    # a prices file replacing the seeds' tables.
    accounts: dict[str, ProviderAccount] = field(default_factory=dict)
    default_provider: str | None = None
    prices_file: str | None = None
    # The reconciler: poll a task after this long without an update; fail it (inferred) after
    # task_timeout without one (the providers' 15 minutes); keep polling a task failed so for
    # a late final this long; how often it looks.
    reconcile_after: float = 30.0
    task_timeout: float = 900.0
    inferred_grace: float = 3600.0
    reconcile_interval: float = 2.0
    # A task the provider says it does not know (an empty fetch) fails after this long.
    unknown_task_grace: float = 120.0
    # Image URLs fetched to be sent as data URLs: "host:port" allowed although private or
    # loopback (the built-in simulator's is added by `receiver serve --simulator`); the
    # largest image; the longest fetch.
    fetch_allow_hosts: tuple[str, ...] = ()
    image_max_bytes: int = 32 * 1024 * 1024
    fetch_timeout: float = 10.0
    # Confirm a callback's SUCCESS by polling the provider before storing it.
    verify_final: bool = False
    # Run the dispatcher and reconciler inside the web process.
    embedded_worker: bool = False
    # "text" for people, "json" (one object per line, with request ids) for log pipelines
    log_format: str = "text"
    # Abuse limits (0: none). Callbacks per task per second (a provider sends a few dozen
    # per task, ever), bursts; submissions per tenant per second, bursts; SSE streams per
    # tenant and process; JSON nesting; seconds to send a body that arrives in pieces.
    callback_rate: float = 20.0
    callback_burst: float = 100.0
    submit_rate: float = 10.0
    submit_burst: float = 200.0
    sse_max_per_tenant: int = 500
    max_json_depth: int = 32
    max_json_containers: int = 10_000
    body_timeout: float = 10.0
    # Every connection: seconds to send a request's head (line and headers), and its size at
    # most (past it: 431).
    head_timeout: float = 10.0
    max_head_bytes: int = 32 * 1024
    # Minting (POST /callback-urls and /subscribe-tokens) per tenant per second, bursts.
    mint_rate: float = 20.0
    mint_burst: float = 100.0
    # What one tenant may keep in the shared Redis (0: no limit): tasks created, and bytes
    # written (snapshots, histories, raw payloads), within the last TASK_TTL.
    tenant_max_tasks: int = 100_000
    tenant_max_bytes: int = 1024 * 1024 * 1024
    # Host names a request may use to form callback URLs when PUBLIC_BASE_URL is unset; the
    # proxies whose X-Forwarded-For and -Proto are believed (uvicorn's forwarded_allow_ips).
    trusted_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    trusted_proxies: tuple[str, ...] = ()
    # When set, GET /metrics wants "Authorization: Bearer <token>".
    metrics_token: Secret | None = None
    # Origins whose pages may call the API from a browser (the dashboard needs none).
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, config: Config | None = None) -> Settings:
        config = config or Config(".env" if os.path.isfile(".env") else None)
        keys = config("RECEIVER_SECRET_KEYS", cast=CommaSeparatedStrings, default="")
        return cls(
            redis_url=config("REDIS_URL", default=None) or None,
            secret_keys=tuple(Secret(k) for k in keys if k),
            public_base_url=config("PUBLIC_BASE_URL", default=None) or None,
            api_keys=parse_api_keys(
                config("RECEIVER_API_KEYS", cast=CommaSeparatedStrings, default="")
            ),
            host=config("HOST", default="127.0.0.1"),
            port=config("PORT", cast=int, default=8000),
            redis_prefix=config("REDIS_PREFIX", default=DEFAULT_PREFIX),
            max_body_bytes=config("MAX_BODY_BYTES", cast=int, default=256 * 1024),
            callback_token_ttl=config("CALLBACK_TOKEN_TTL", cast=int, default=3 * 24 * 3600),
            task_ttl=config("TASK_TTL", cast=int, default=7 * 24 * 3600),
            tenant_stream_maxlen=config("TENANT_STREAM_MAXLEN", cast=int, default=100_000),
            task_history_maxlen=config("TASK_HISTORY_MAXLEN", cast=int, default=1_000),
            redis_timeout=config("REDIS_TIMEOUT", cast=float, default=5.0),
            redis_cluster=config("REDIS_CLUSTER", cast=bool, default=False),
            redis_sentinels=tuple(config("REDIS_SENTINELS", cast=CommaSeparatedStrings,
                                         default="")),
            redis_sentinel_master=config("REDIS_SENTINEL_MASTER", default="mymaster"),
            subscribe_token_ttl=config("SUBSCRIBE_TOKEN_TTL", cast=int, default=3600),
            sse_queue_limit=config("SSE_QUEUE_LIMIT", cast=int, default=1000),
            sse_ping=config("SSE_PING_SECONDS", cast=float, default=15.0),
            sse_retry_ms=config("SSE_RETRY_MS", cast=int, default=2000),
            sse_send_timeout=config("SSE_SEND_TIMEOUT", cast=float, default=30.0),
            sse_snapshot_limit=config("SSE_SNAPSHOT_LIMIT", cast=int, default=200),
            accounts=read_accounts(config),
            default_provider=config("DEFAULT_PROVIDER", default=None) or None,
            prices_file=config("PRICES_FILE", default=None) or None,
            reconcile_after=config("RECONCILE_AFTER", cast=float, default=30.0),
            task_timeout=config("TASK_TIMEOUT", cast=float, default=900.0),
            inferred_grace=config("INFERRED_GRACE", cast=float, default=3600.0),
            reconcile_interval=config("RECONCILE_INTERVAL", cast=float, default=2.0),
            unknown_task_grace=config("UNKNOWN_TASK_GRACE", cast=float, default=120.0),
            fetch_allow_hosts=tuple(h.strip().lower() for h in config(
                "FETCH_ALLOW_HOSTS", cast=CommaSeparatedStrings, default="") if h.strip()),
            image_max_bytes=config("IMAGE_MAX_BYTES", cast=int, default=32 * 1024 * 1024),
            fetch_timeout=config("FETCH_TIMEOUT", cast=float, default=10.0),
            verify_final=config("VERIFY_FINAL", cast=bool, default=False),
            embedded_worker=config("EMBEDDED_WORKER", cast=bool, default=False),
            log_format=config("LOG_FORMAT", default="text").lower(),
            callback_rate=config("CALLBACK_RATE", cast=float, default=20.0),
            callback_burst=config("CALLBACK_BURST", cast=float, default=100.0),
            submit_rate=config("SUBMIT_RATE", cast=float, default=10.0),
            submit_burst=config("SUBMIT_BURST", cast=float, default=200.0),
            sse_max_per_tenant=config("SSE_MAX_PER_TENANT", cast=int, default=500),
            max_json_depth=config("MAX_JSON_DEPTH", cast=int, default=32),
            max_json_containers=config("MAX_JSON_CONTAINERS", cast=int, default=10_000),
            body_timeout=config("BODY_TIMEOUT", cast=float, default=10.0),
            head_timeout=config("HEAD_TIMEOUT", cast=float, default=10.0),
            max_head_bytes=config("MAX_HEAD_BYTES", cast=int, default=32 * 1024),
            mint_rate=config("MINT_RATE", cast=float, default=20.0),
            mint_burst=config("MINT_BURST", cast=float, default=100.0),
            tenant_max_tasks=config("TENANT_MAX_TASKS", cast=int, default=100_000),
            tenant_max_bytes=config("TENANT_MAX_BYTES", cast=int, default=1024 * 1024 * 1024),
            trusted_hosts=tuple(h.strip().lower().strip("[]") for h in config(
                "TRUSTED_HOSTS", cast=CommaSeparatedStrings,
                default="localhost,127.0.0.1,::1") if h.strip()),
            trusted_proxies=tuple(h.strip() for h in config(
                "TRUSTED_PROXIES", cast=CommaSeparatedStrings, default="") if h.strip()),
            metrics_token=config("METRICS_TOKEN", cast=Secret, default=None) or None,
            cors_origins=tuple(config("CORS_ORIGINS", cast=CommaSeparatedStrings,
                                      default="")),
        )

    @property
    def open_mode(self) -> bool:
        """No API keys: one tenant, ``default``, reachable from loopback only."""
        return not self.api_keys

    def callback_base(self) -> str:
        """What callback URLs start with when no request tells (the worker's submits)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return (self.public_base_url or f"http://{host}:{self.port}").rstrip("/")

    def provider_for(self, provider: str | None) -> str | None:
        """The provider named, else the default, else the only one configured."""
        if provider:
            return provider
        if self.default_provider:
            return self.default_provider
        return next(iter(self.accounts)) if len(self.accounts) == 1 else None

    def signing_keys(self) -> list[str]:
        """The secret keys as itsdangerous wants them; an ephemeral one if none is set."""
        if self.secret_keys:
            return [str(k) for k in self.secret_keys]
        return [_EPHEMERAL_KEY]


_EPHEMERAL_KEY = secrets.token_urlsafe(32)


def parse_api_keys(pairs: Iterable[str]) -> dict[str, str]:
    """``tenant:key`` pairs -> {key: tenant}."""
    out: dict[str, str] = {}
    for pair in pairs:
        tenant, sep, key = pair.strip().partition(":")
        if not sep or not key or not TENANT_RE.match(tenant):
            raise SettingsError(
                "RECEIVER_API_KEYS takes comma-separated tenant:key pairs, tenant of "
                "letters, digits, '_', '.', '-'"
            )
        if key in out:
            raise SettingsError("RECEIVER_API_KEYS gives the same key to two tenants")
        out[key] = tenant
    return out


def read_accounts(config: Config) -> dict[str, ProviderAccount]:
    """The provider accounts whose ``<PROVIDER>_BASE_URL`` is set."""
    accounts = {}
    for provider in PROVIDERS:
        env = provider.upper()
        base_url = config(f"{env}_BASE_URL", default=None)
        if not base_url:
            continue
        limit = config(f"{env}_QUEUE_LIMIT", cast=int, default=3)
        if limit < 1:
            raise SettingsError(f"{env}_QUEUE_LIMIT must be 1 or more")
        flavor = config(f"{env}_FLAVOR", default="trueai").strip().lower()
        if provider == "mjproxy" and flavor not in MJPROXY_FLAVORS:
            raise SettingsError(f"MJPROXY_FLAVOR is one of {', '.join(MJPROXY_FLAVORS)}, "
                                f"not {flavor!r}")
        accounts[provider] = ProviderAccount(
            provider, base_url, Secret(config(f"{env}_API_KEY", default="")), limit,
            config(f"{env}_AUTH_HEADER", default="mj-api-secret"), flavor,
        )
    return accounts


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
