"""Settings declared once: each field's variable, default and parser, and the README's
table kept true by this test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.config import Config

from receiver.core.settings import Settings, SettingsError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_nothing_set_is_every_default() -> None:
    assert Settings.from_env(Config(environ={})) == Settings()


def test_each_variable_is_read_by_its_type() -> None:
    settings = Settings.from_env(Config(environ={
        "PORT": "9000", "SSE_PING_SECONDS": "2.5", "VERIFY_FINAL": "true",
        "TRUSTED_HOSTS": "Example.COM, [::1]", "RECEIVER_API_KEYS": "acme:k1,beta:k2",
        "PUBLIC_BASE_URL": "", "METRICS_TOKEN": "m", "LOG_FORMAT": "JSON"}))
    assert (settings.port, settings.sse_ping, settings.verify_final) == (9000, 2.5, True)
    assert settings.trusted_hosts == ("example.com", "::1")
    assert settings.api_keys == {"k1": "acme", "k2": "beta"}
    assert settings.public_base_url is None and str(settings.metrics_token) == "m"
    assert settings.log_format == "json"


@pytest.mark.parametrize(("name", "value"), [
    ("PORT", "eighty"), ("VERIFY_FINAL", "maybe"), ("SSE_PING_SECONDS", "soon"),
    ("RECEIVER_API_KEYS", "no-colon"), ("MJPROXY_FLAVOR", "other"),
])
def test_a_bad_value_stops_startup_naming_its_variable(name: str, value: str) -> None:
    env = {name: value, "MJPROXY_BASE_URL": "http://127.0.0.1:9"}
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(Config(environ=env))


def test_the_readme_table_names_every_setting() -> None:
    section = README.read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    missing = set(Settings.variables().values()) - named
    assert not missing, f"README's settings table does not name {sorted(missing)}"


def test_an_image_store_must_be_a_directory_or_a_bucket() -> None:
    def read(**environ: str) -> Settings:
        return Settings.from_env(Config(environ=environ))

    assert read().image_store == "file://.receiver/images"
    assert read(IMAGE_STORE="").image_store == ""
    assert read(IMAGE_STORE="s3://bucket/prefix", AWS_ENDPOINT_URL="http://127.0.0.1:9000",
                AWS_REGION="eu-west-1").aws == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}
    for bad in ("https://bucket.example/x", "/var/images", "s3://"):
        with pytest.raises(SettingsError, match="IMAGE_STORE"):
            read(IMAGE_STORE=bad)


def test_budgets_are_tenant_amount_unit_with_a_default() -> None:
    settings = Settings.from_env(Config(environ={
        "TENANT_BUDGETS": "acme:200000:tokens, acme:50:points,*:1000:points"}))
    assert settings.budget("acme", "tokens") == 200000
    assert settings.budget("acme", "points") == 50
    assert settings.budget("beta", "points") == 1000 and settings.budget("beta", "tokens") is None
    for bad in ("acme:lots:tokens", "acme:100", "ac me:1:points"):
        with pytest.raises(SettingsError, match="TENANT_BUDGETS"):
            Settings.from_env(Config(environ={"TENANT_BUDGETS": bad}))
