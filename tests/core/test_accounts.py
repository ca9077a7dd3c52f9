"""ACCOUNTS_FILE: pools of accounts read at startup, and refused with the line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.config import Config

from receiver.core.settings import Settings, SettingsError

GOOD = """\
# two mjproxy accounts and an OhMyGPT one
[[accounts]]
name = "mj-fast"
provider = "mjproxy"
base_url = "https://mj-a.example"
api_key = "sk-a"
queue_limit = 20
modes = ["fast", "TURBO"]
weight = 2

[[accounts]]
name = "mj-relax"
provider = "mjproxy"
base_url = "https://mj-b.example"
api_key_env = "MJ_B_KEY"
flavor = "novicezk"
auth_header = "mj-api-secret"

[[accounts]]
name = "omg"
provider = "ohmygpt"
base_url = "https://api.ohmygpt.example"
api_key = "sk-o"
enabled = false
"""


def read(tmp_path: Path, text: str, **environ: str) -> Settings:
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    return Settings.from_env(Config(environ={"ACCOUNTS_FILE": str(path), **environ}))


def test_a_file_of_accounts_makes_pools(tmp_path: Path) -> None:
    settings = read(tmp_path, GOOD, MJ_B_KEY="sk-b", AIGC2D_BASE_URL="https://a.example",
                    AIGC2D_API_KEY="sk-c")
    accounts = settings.accounts
    assert list(accounts) == ["mj-fast", "mj-relax", "omg", "aigc2d"]
    fast, relax = accounts["mj-fast"], accounts["mj-relax"]
    assert (fast.provider, fast.queue_limit, fast.modes, fast.weight) == (
        "mjproxy", 20, ("FAST", "TURBO"), 2.0)
    assert str(relax.api_key) == "sk-b" and relax.flavor == "novicezk"
    assert relax.queue_limit == 3 and relax.modes == () and relax.enabled
    assert accounts["aigc2d"].name == "aigc2d"  # the variables' account, named as before
    # a disabled account is known (its tasks' actions fail clearly) but in no pool
    assert {p: [a.name for a in pool] for p, pool in settings.pools().items()} == {
        "mjproxy": ["mj-fast", "mj-relax"], "aigc2d": ["aigc2d"]}


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("[[accounts]]\nname = 'a'\n", 1, "provider is missing"),
    (GOOD.replace('provider = "ohmygpt"', 'provider = "midjourney"'), 19,
     "provider 'midjourney' is none of"),
    (GOOD.replace('api_key = "sk-o"', ""), 19, "give api_key or api_key_env"),
    (GOOD.replace('name = "mj-relax"', 'name = "mj-fast"'), 11, "a second account named"),
    (GOOD.replace("queue_limit = 20", "queue_limit = 0"), 2, "queue_limit 0"),
    (GOOD.replace('modes = ["fast", "TURBO"]', 'modes = ["SLOW"]'), 2, "mode 'SLOW'"),
    (GOOD.replace("weight = 2", "weight = -1"), 2, "weight -1"),
    (GOOD.replace('flavor = "novicezk"', 'flavor = "plus"'), 11, "flavor 'plus'"),
    (GOOD.replace('api_key_env = "MJ_B_KEY"', 'api_key_env = "NOT_SET_ANYWHERE"'), 11,
     "NOT_SET_ANYWHERE, which is not set"),
    (GOOD.replace("enabled = false", "colour = 'red'"), 19, "unknown key 'colour'"),
    (GOOD.replace('base_url = "https://mj-a.example"', 'base_url = "mj-a.example"'), 2,
     "is not an http(s) URL"),
    # novicezk reads mj-api-secret only: every request would be a 401
    (GOOD.replace('auth_header = "mj-api-secret"', 'auth_header = "Authorization"'), 11,
     "novicezk reads the key from mj-api-secret only"),
])
def test_a_bad_file_is_refused_with_its_line_and_reason(
        tmp_path: Path, text: str, line: int, reason: str) -> None:
    with pytest.raises(SettingsError) as refused:
        read(tmp_path, text, MJ_B_KEY="sk-b")
    assert f"line {line}: " in str(refused.value) and reason in str(refused.value)


def test_the_variables_auth_header_is_one_the_flavour_reads() -> None:
    def account(**environ: str) -> str:
        settings = Settings.from_env(Config(environ={"MJPROXY_BASE_URL": "https://x.example",
                                                     **environ}))
        return settings.accounts["mjproxy"].auth_header
    assert account(MJPROXY_AUTH_HEADER="Authorization") == "Authorization"  # trueai's
    with pytest.raises(SettingsError, match="MJPROXY_AUTH_HEADER 'X-Api-Key': trueai reads"):
        account(MJPROXY_AUTH_HEADER="X-Api-Key")
    with pytest.raises(SettingsError, match="novicezk reads the key from mj-api-secret only"):
        account(MJPROXY_AUTH_HEADER="Authorization", MJPROXY_FLAVOR="novicezk")


def test_toml_that_does_not_parse_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"line 2"):
        read(tmp_path, "[[accounts]]\nname = \n")
    with pytest.raises(SettingsError, match="No such file"):
        Settings.from_env(Config(environ={"ACCOUNTS_FILE": str(tmp_path / "none.toml")}))
    with pytest.raises(SettingsError, match="MJPROXY_BASE_URL is set and ACCOUNTS_FILE"):
        read(tmp_path, GOOD.replace('name = "mj-fast"', 'name = "mjproxy"'),
             MJ_B_KEY="k", MJPROXY_BASE_URL="https://x.example")


def test_the_readmes_example_file_reads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = read(tmp_path, example, MJ_A_KEY="a", MJ_B_KEY="b")
    assert [(a.name, a.queue_limit, a.modes, a.weight, a.enabled)
            for a in settings.accounts.values()] == [
        ("mj-fast", 20, ("FAST", "TURBO"), 2.0, True), ("mj-relax", 3, (), 1.0, False)]
