"""Settings, read once from the environment (and ``.env``) through starlette's Config."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings, Secret

from receiver.core.accounts import (
    MJPROXY_FLAVORS,
    PROVIDERS,
    ProviderAccount,
    SettingsError,
    read_accounts,
)
from receiver.core.constants import DEFAULT_PREFIX, TENANT_RE

__all__ = ["MJPROXY_FLAVORS", "PROVIDERS", "ProviderAccount", "Settings", "SettingsError"]

DEFAULT_TENANT = "default"


def setting(default: Any, env: str | None = None,
            parse: Callable[[str], Any] | None = None) -> Any:
    """A setting: its default, its environment variable (the field's name in capitals unless
    ``env``) and how its text is read (by the field's type unless ``parse``)."""
    meta = {"env": env, "parse": parse}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _bool(raw: str) -> bool:
    value = _BOOLS.get(raw.strip().lower())
    if value is None:
        raise ValueError("not a boolean: true or false")
    return value


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in CommaSeparatedStrings(raw) if item.strip())


def _lower_list(raw: str) -> tuple[str, ...]:
    return tuple(item.lower() for item in _list(raw))


def _host_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip("[]") for item in _lower_list(raw))


def _store_url(raw: str) -> str:
    url = raw.strip()
    if url and not url.startswith(("file://", "s3://")):
        raise ValueError("file://<directory>, s3://<bucket>[/<prefix>], or empty for none")
    if url.startswith("s3://") and not url[5:].strip("/"):
        raise ValueError("s3:// needs a bucket: s3://<bucket>[/<prefix>]")
    return url


def _budgets(raw: str) -> dict[str, dict[str, int]]:
    budgets: dict[str, dict[str, int]] = {}
    for entry in _list(raw):
        tenant, _, rest = entry.partition(":")
        amount, _, unit = rest.partition(":")
        if not (tenant == "*" or TENANT_RE.match(tenant)) or not unit.strip() \
                or not amount.strip().isdigit():
            raise ValueError("comma-separated tenant:amount:unit (tenant * for every tenant "
                             "without its own), e.g. acme:200000:tokens,*:1000:points")
        budgets.setdefault(tenant, {})[unit.strip()] = int(amount)
    return budgets


def _secrets(raw: str) -> tuple[Secret, ...]:
    return tuple(Secret(key) for key in _list(raw))


def _api_keys(raw: str) -> dict[str, str]:
    try:
        return parse_api_keys(CommaSeparatedStrings(raw))
    except SettingsError as exc:
        raise ValueError(str(exc)) from None


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str, "int": int, "float": float, "bool": _bool,
    "str | None": lambda raw: raw or None,
    "Secret | None": lambda raw: Secret(raw) if raw else None,
    "tuple[str, ...]": _list,
}


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = setting(None)
    # Newest last: the newest signs, every one verifies (rotation).
    secret_keys: tuple[Secret, ...] = setting((), env="RECEIVER_SECRET_KEYS", parse=_secrets)
    public_base_url: str | None = setting(None)
    # api key -> tenant
    api_keys: dict[str, str] = setting({}, env="RECEIVER_API_KEYS", parse=_api_keys)
    host: str = setting("127.0.0.1")
    port: int = setting(8000)
    redis_prefix: str = setting(DEFAULT_PREFIX)
    max_body_bytes: int = setting(256 * 1024)
    # Longer than the longest task (providers time out at 15 minutes) plus retries and
    # delayed deliveries.
    callback_token_ttl: int = setting(3 * 24 * 3600)
    task_ttl: int = setting(7 * 24 * 3600)
    tenant_stream_maxlen: int = setting(100_000)
    task_history_maxlen: int = setting(1_000)
    redis_timeout: float = setting(5.0)
    # REDIS_URL names a node of a Redis Cluster (keys are hash-tagged for it)
    redis_cluster: bool = setting(False)
    # Sentinels (host:port) watching the master named redis_sentinel_master: the master's
    # address comes from them (REDIS_URL still gives the password and db)
    redis_sentinels: tuple[str, ...] = setting(())
    redis_sentinel_master: str = setting("mymaster")
    subscribe_token_ttl: int = setting(3600)
    # SSE: events a client may fall behind before it is cut off; keep-alive ping; the
    # reconnect delay suggested to clients; the longest a send may block; how many tasks'
    # snapshots a resume from a forgotten id gets.
    sse_queue_limit: int = setting(1000)
    sse_ping: float = setting(15.0, env="SSE_PING_SECONDS")
    sse_retry_ms: int = setting(2000)
    sse_send_timeout: float = setting(30.0)
    sse_snapshot_limit: int = setting(200)
    # The submitter: accounts by name (ACCOUNTS_FILE's, and the <PROVIDER>_* variables'),
    # the provider POST /tasks uses when none is named, a prices file replacing the seeds'.
    accounts: dict[str, ProviderAccount] = field(default_factory=dict)
    accounts_file: str | None = setting(None)
    default_provider: str | None = setting(None)
    prices_file: str | None = setting(None)
    # The reconciler: poll a task after this long without an update; fail it (inferred) after
    # task_timeout without one (the providers' 15 minutes); keep polling a task failed so for
    # a late final this long; how often it looks.
    reconcile_after: float = setting(30.0)
    task_timeout: float = setting(900.0)
    inferred_grace: float = setting(3600.0)
    reconcile_interval: float = setting(2.0)
    # A task the provider says it does not know (an empty fetch) fails after this long.
    unknown_task_grace: float = setting(120.0)
    # Image URLs fetched to be sent as data URLs: "host:port" allowed although private or
    # loopback (the built-in simulator's is added by `receiver serve --simulator`); the
    # largest image; the longest fetch.
    fetch_allow_hosts: tuple[str, ...] = setting((), parse=_lower_list)
    image_max_bytes: int = setting(32 * 1024 * 1024)
    fetch_timeout: float = setting(10.0)
    # Where a SUCCESS's images are kept (`receiver.images`): file://<directory>, or
    # s3://<bucket>[/<prefix>] for any S3-compatible store (credentials, region and endpoint
    # from the standard AWS_* variables: `aws`); empty: none kept. Signed image URLs last
    # image_url_ttl; a task's images are tried archive_attempts times, the first retry
    # after archive_backoff seconds, doubling.
    image_store: str = setting("file://.receiver/images", parse=_store_url)
    image_url_ttl: int = setting(3600)
    archive_attempts: int = setting(6)
    archive_backoff: float = setting(5.0)
    aws: dict[str, str] = field(default_factory=dict)
    # Confirm a callback's SUCCESS by polling the provider before storing it.
    verify_final: bool = setting(False)
    # Run the dispatcher and reconciler inside the web process.
    embedded_worker: bool = setting(False)
    # "text" for people, "json" (one object per line, with request ids) for log pipelines
    log_format: str = setting("text", parse=str.lower)
    # Abuse limits (0: none). Callbacks per task per second (a provider sends a few dozen
    # per task, ever), bursts; submissions per tenant per second, bursts; SSE streams per
    # tenant and process; JSON nesting; seconds to send a body that arrives in pieces.
    callback_rate: float = setting(20.0)
    callback_burst: float = setting(100.0)
    submit_rate: float = setting(10.0)
    submit_burst: float = setting(200.0)
    sse_max_per_tenant: int = setting(500)
    max_json_depth: int = setting(32)
    max_json_containers: int = setting(10_000)
    body_timeout: float = setting(10.0)
    # Every connection: seconds to send a request's head (line and headers), and its size at
    # most (past it: 431).
    head_timeout: float = setting(10.0)
    max_head_bytes: int = setting(32 * 1024)
    # Minting (POST /callback-urls and /subscribe-tokens) per tenant per second, bursts.
    mint_rate: float = setting(20.0)
    mint_burst: float = setting(100.0)
    # What one tenant may keep in the shared Redis (0: no limit): tasks created, and bytes
    # written (snapshots, histories, raw payloads), within the last TASK_TTL.
    tenant_max_tasks: int = setting(100_000)
    # the slots of one provider account a tenant may hold at once (0: as many as are free)
    tenant_max_in_flight: int = setting(0)
    # tenant -> unit -> the most it may commit (charged net of refunds, and its tasks not
    # yet charged at their price); "*": every tenant without its own
    tenant_budgets: dict[str, dict[str, int]] = setting({}, parse=_budgets)
    tenant_max_bytes: int = setting(1024 * 1024 * 1024)
    # Host names a request may use to form callback URLs when PUBLIC_BASE_URL is unset; the
    # proxies whose X-Forwarded-For and -Proto are believed (uvicorn's forwarded_allow_ips).
    trusted_hosts: tuple[str, ...] = setting(("localhost", "127.0.0.1", "::1"), parse=_host_list)
    trusted_proxies: tuple[str, ...] = setting(())
    # When set, GET /metrics wants "Authorization: Bearer <token>".
    metrics_token: Secret | None = setting(None)
    # operators' keys: GET /admin/accounts (accounts, slots, queues by tenant)
    admin_keys: tuple[Secret, ...] = setting((), env="RECEIVER_ADMIN_KEYS", parse=_secrets)
    # Origins whose pages may call the API from a browser (the dashboard needs none).
    cors_origins: tuple[str, ...] = setting(())

    @classmethod
    def from_env(cls, config: Config | None = None) -> Settings:
        """Every setting from its variable (`setting`'s ``env``), parsed by its type; a
        value that does not parse stops startup naming the variable. Unset: the default."""
        config = config or env_config()
        values: dict[str, Any] = {"accounts": read_accounts(config), "aws": read_aws(config)}
        for spec in fields(cls):
            if "env" not in spec.metadata:
                continue
            name = spec.metadata["env"] or spec.name.upper()
            raw = config(name, default=None)
            if raw is None:
                continue
            parse = spec.metadata["parse"] or _PARSERS[str(spec.type)]
            try:
                values[spec.name] = parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{name}={raw[:60]!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Each setting's environment variable, by field name."""
        return {spec.name: spec.metadata["env"] or spec.name.upper()
                for spec in fields(cls) if "env" in spec.metadata}

    @property
    def open_mode(self) -> bool:
        """No API keys: one tenant, ``default``, reachable from loopback only."""
        return not self.api_keys

    def callback_base(self) -> str:
        """What callback URLs start with when no request tells (the worker's submits)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return (self.public_base_url or f"http://{host}:{self.port}").rstrip("/")

    def pools(self) -> dict[str, list[ProviderAccount]]:
        """The enabled accounts by provider, in the order they were given."""
        pools: dict[str, list[ProviderAccount]] = {}
        for account in self.accounts.values():
            if account.enabled:
                pools.setdefault(account.provider, []).append(account)
        return pools

    def provider_for(self, provider: str | None) -> str | None:
        """The provider named, else the default, else the only one configured."""
        if provider:
            return provider
        if self.default_provider:
            return self.default_provider
        pools = self.pools()
        return next(iter(pools)) if len(pools) == 1 else None

    def budgets(self, tenant: str) -> dict[str, int]:
        """The tenant's budgets by unit (TENANT_BUDGETS: its own, else ``*``'s)."""
        own = self.tenant_budgets.get(tenant)
        return self.tenant_budgets.get("*", {}) if own is None else own

    def budget(self, tenant: str, unit: str) -> int | None:
        """The tenant's budget in ``unit``, or None for no limit."""
        return self.budgets(tenant).get(unit)

    def signing_keys(self) -> list[str]:
        """The secret keys as itsdangerous wants them; an ephemeral one if none is set."""
        if self.secret_keys:
            return [str(k) for k in self.secret_keys]
        return [_EPHEMERAL_KEY]


_EPHEMERAL_KEY = secrets.token_urlsafe(32)


def env_config(environ: Mapping[str, str] | None = None) -> Config:
    """Where settings are read: ``environ`` (the process's environment unless given), then
    ``.env`` in the working directory, if there is one."""
    env_file = ".env" if os.path.isfile(".env") else None
    return Config(env_file) if environ is None else Config(env_file, environ=environ)


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


# What an s3:// IMAGE_STORE reads (as the AWS CLI and SDKs do); AWS_ENDPOINT_URL names a
# store that is not AWS (MinIO, R2, Ceph, ...).
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_VIRTUAL_HOSTED_STYLE_REQUEST")


def read_aws(config: Config) -> dict[str, str]:
    """The ``AWS_*`` variables that are set, by name."""
    return {name: value for name in AWS_VARIABLES
            if (value := config(name, default=None)) is not None}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
