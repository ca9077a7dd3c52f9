"""Provider accounts: ACCOUNTS_FILE's ``[[accounts]]`` and the ``<PROVIDER>_*`` shorthand.

One account per provider is what the environment variables give (named as the provider);
operators who run pools of accounts list them in a TOML file instead, each with its key (or
the name of a variable that holds it), limit, modes and weight. A file that does not read is
refused at startup with its line and the reason.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

from starlette.config import Config
from starlette.datastructures import Secret

from receiver.core.constants import NAME_RE

MJPROXY_FLAVORS = ("trueai", "novicezk")  # midjourney-proxy's two API generations
PROVIDERS = ("mjproxy", "ohmygpt", "aigc2d")
MODES = ("FAST", "RELAX", "TURBO", "NORMAL")  # midjourney-proxy's three, OhMyGPT's NORMAL
_FIELDS = {"name", "provider", "base_url", "api_key", "api_key_env", "queue_limit", "flavor",
           "auth_header", "modes", "weight", "enabled"}


class SettingsError(ValueError):
    """A setting that cannot be used as given."""


@dataclass(frozen=True)
class ProviderAccount:
    """One provider account the submitter sends tasks to (an ``[[accounts]]`` entry of
    ACCOUNTS_FILE, or ``<PROVIDER>_BASE_URL`` and ``_API_KEY``); ``queue_limit`` is its
    unfinished tasks at most (the seeds' tiers: 3, 20, 50). A provider's accounts are its
    pool (`store.admission`)."""

    provider: str
    base_url: str
    api_key: Secret
    queue_limit: int = 3
    # mjproxy only: ``mj-api-secret``, or ``Authorization`` (sent the raw key, which trueai
    # compares whole); and the API generation: ``trueai`` (and plus) or ``novicezk``
    auth_header: str = "mj-api-secret"
    flavor: str = "trueai"
    # In Redis keys, /admin/accounts and logs; the provider's for the <PROVIDER>_* account.
    name: str = ""
    # the modes it serves (FAST, RELAX, TURBO; none: every mode its provider has); its share
    # of the pool's tasks for its limit; false: sends nothing (its tasks' actions fail)
    modes: tuple[str, ...] = ()
    weight: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.provider)


def read_accounts(config: Config) -> dict[str, ProviderAccount]:
    """Every account, by name: ACCOUNTS_FILE's, then each provider's whose
    ``<PROVIDER>_BASE_URL`` is set (named as the provider)."""
    accounts: dict[str, ProviderAccount] = {}
    path = config("ACCOUNTS_FILE", default=None)
    if path:
        accounts.update(read_accounts_file(path, config))
    for provider in PROVIDERS:
        env = provider.upper()
        base_url = config(f"{env}_BASE_URL", default=None)
        if not base_url:
            continue
        if provider in accounts:
            raise SettingsError(f"{env}_BASE_URL is set and ACCOUNTS_FILE names an account "
                                f"{provider!r} too: rename that one, or unset the variable")
        limit = config(f"{env}_QUEUE_LIMIT", cast=int, default=3)
        if limit < 1:
            raise SettingsError(f"{env}_QUEUE_LIMIT must be 1 or more")
        flavor = config(f"{env}_FLAVOR", default="trueai").strip().lower()
        if provider == "mjproxy" and flavor not in MJPROXY_FLAVORS:
            raise SettingsError(f"MJPROXY_FLAVOR is one of {', '.join(MJPROXY_FLAVORS)}, "
                                f"not {flavor!r}")
        header = config(f"{env}_AUTH_HEADER", default="mj-api-secret")
        if provider == "mjproxy":
            _check_auth_header(f"{env}_AUTH_HEADER", header, flavor)
        accounts[provider] = ProviderAccount(
            provider, base_url, Secret(config(f"{env}_API_KEY", default="")), limit, header,
            flavor)
    return accounts


def read_accounts_file(path: str, config: Config) -> dict[str, ProviderAccount]:
    """The ``[[accounts]]`` of a TOML file; `SettingsError` naming the file, the line and
    the reason for anything it cannot use."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise SettingsError(f"ACCOUNTS_FILE {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"ACCOUNTS_FILE {path}: {exc}") from None
    extra = set(document) - {"accounts"}
    if extra:
        raise SettingsError(f"ACCOUNTS_FILE {path}: unknown table {sorted(extra)[0]!r} "
                            "(the file holds [[accounts]] only)")
    entries = document.get("accounts", [])
    if not isinstance(entries, list) or not entries:
        raise SettingsError(f"ACCOUNTS_FILE {path}: no [[accounts]]")
    # where each [[accounts]] starts, for the messages
    lines = [n for n, text in enumerate(raw.decode("utf-8").splitlines(), start=1)
             if re.match(r"\s*\[\[\s*accounts\s*\]\]", text)]
    accounts: dict[str, ProviderAccount] = {}
    for i, entry in enumerate(entries):
        where = f"ACCOUNTS_FILE {path}, line {lines[i] if i < len(lines) else '?'}"
        try:
            account = _account(entry, config)
        except (SettingsError, ValueError, TypeError) as exc:
            raise SettingsError(f"{where}: {exc}") from None
        if account.name in accounts:
            raise SettingsError(f"{where}: a second account named {account.name!r}")
        accounts[account.name] = account
    return accounts


def _account(entry: Any, config: Config) -> ProviderAccount:
    if not isinstance(entry, dict):
        raise SettingsError("an [[accounts]] entry is a table")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise SettingsError(f"unknown key {sorted(unknown)[0]!r} (known: "
                            f"{', '.join(sorted(_FIELDS))})")
    name = _text(entry, "name")
    if not NAME_RE.match(name):
        raise SettingsError(f"name {name!r}: letters, digits, '_', '.', '-', 64 at most")
    provider = _text(entry, "provider")
    if provider not in PROVIDERS:
        raise SettingsError(f"provider {provider!r} is none of {', '.join(PROVIDERS)}")
    if name in PROVIDERS and name != provider:
        # a provider's name is its pool's, and the name its tasks of before pools carry
        raise SettingsError(f"name {name!r} is another provider's: name a {provider} account "
                            f"{provider!r} or something else")
    base_url = _text(entry, "base_url")
    if not base_url.startswith(("http://", "https://")):
        raise SettingsError(f"base_url {base_url[:80]!r} is not an http(s) URL")
    if ("api_key" in entry) == ("api_key_env" in entry):
        raise SettingsError("give api_key or api_key_env (the variable that holds it), "
                            "one of them")
    if "api_key" in entry:
        key = _text(entry, "api_key")
    else:
        variable = _text(entry, "api_key_env")
        from_env = config(variable, default=None)
        if from_env is None:
            raise SettingsError(f"api_key_env names {variable}, which is not set")
        key = from_env
    limit = entry.get("queue_limit", 3)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise SettingsError(f"queue_limit {limit!r} is not an integer of 1 or more")
    flavor = str(entry.get("flavor", "trueai")).lower()
    if provider == "mjproxy" and flavor not in MJPROXY_FLAVORS:
        raise SettingsError(f"flavor {flavor!r} is none of {', '.join(MJPROXY_FLAVORS)}")
    modes = entry.get("modes", [])
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise SettingsError("modes is a list of strings, e.g. [\"FAST\", \"RELAX\"]")
    modes = [m.strip().upper() for m in modes]
    if bad := [m for m in modes if m not in MODES]:
        raise SettingsError(f"mode {bad[0]!r} is none of {', '.join(MODES)}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
        raise SettingsError(f"weight {weight!r} is not a number above 0")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SettingsError(f"enabled {enabled!r} is not true or false")
    header = _text(entry, "auth_header", "mj-api-secret")
    if provider == "mjproxy":
        _check_auth_header("auth_header", header, flavor)
    return ProviderAccount(
        provider, base_url, Secret(key), limit, header, flavor, name=name,
        modes=tuple(dict.fromkeys(modes)), weight=float(weight), enabled=enabled)


# The headers each flavour reads a key from (PROVIDERS.md, auth): novicezk's
# ApiAuthorizeInterceptor reads mj-api-secret; trueai's WorkContext takes Authorization's
# whole value, else mj-api-secret. Any other is a 401 on every request.
AUTH_HEADERS = {"novicezk": ("mj-api-secret",), "trueai": ("mj-api-secret", "authorization")}


def _check_auth_header(setting: str, header: str, flavor: str) -> None:
    if header.strip().lower() not in AUTH_HEADERS[flavor]:
        raise SettingsError(f"{setting} {header!r}: {flavor} reads the key from "
                            f"{' or '.join(AUTH_HEADERS[flavor])} only")


def _text(entry: dict[str, Any], key: str, default: str | None = None) -> str:
    value = entry.get(key, default)
    if value is None:
        raise SettingsError(f"{key} is missing")
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{key} is not a non-empty string")
    return value.strip()
