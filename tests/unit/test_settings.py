"""Unit tests of configuration loading: TOML, environment overrides, secrets, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from worker.errors import ConfigError
from worker.settings import compile_rules, load_settings, parse_duration

GOOD = """
name = "shop-cache"
[source]
kind = "mysql"
dsn = "mysql://cw:dsnpass@127.0.0.1:3306/shop"
[redis]
url = "redis://127.0.0.1:6379/0"
[defaults]
ttl = "2h"
[[rules]]
name = "user-profile"
table = "shop.users"
keys = ["user:{id}"]
columns = ["id", "name"]
watch = ["name"]
ttl = "90s"
when = { status = "active" }
[[rules]]
name = "user-orders"
table = "shop.orders"
keys = ["user:{user_id}:orders"]
action = "evict"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_loads_good_config_and_compiles_rules(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.name == "shop-cache"
    assert settings.checkpoint_key() == "cache-worker:checkpoint:shop-cache"
    rules = compile_rules(settings)
    profile, orders = rules.rules
    assert (
        profile.ttl_ms == 90_000
        and profile.format == "json"
        and profile.when == {"status": "active"}
    )
    assert profile.watch == frozenset({"name"})
    assert orders.action == "evict" and orders.ttl_ms == 7_200_000
    assert 100_000 <= settings.server_id() < 1_000_100_000


def test_environment_overrides_nested_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_WORKER_REDIS__URL", "redis://cache.internal:6380/1")
    monkeypatch.setenv("CACHE_WORKER_BATCH__MAX_DELAY", "20ms")
    monkeypatch.setenv("CACHE_WORKER_SOURCE__PASSWORD", "envpass")
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.redis.url == "redis://cache.internal:6380/1"
    assert settings.batch.max_delay == pytest.approx(0.02)
    assert settings.source.kind == "mysql"  # untouched fields keep the file's values
    assert settings.source.resolved_password() == "envpass"
    assert "envpass" not in repr(settings)


def test_password_precedence_file_then_env_then_dsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(write(tmp_path, GOOD)).source.resolved_password() == "dsnpass"
    secret = tmp_path / "pw"
    secret.write_text("filepass\n")
    monkeypatch.setenv("CACHE_WORKER_SOURCE__PASSWORD", "envpass")
    monkeypatch.setenv("CACHE_WORKER_SOURCE__PASSWORD_FILE", str(secret))
    assert load_settings(write(tmp_path, GOOD)).source.resolved_password() == "filepass"


def test_every_bad_field_is_named(tmp_path: Path) -> None:
    bad = GOOD.replace('ttl = "90s"', 'ttl = "soon"').replace(
        'keys = ["user:{user_id}:orders"]', 'keys = ["user:{user_id.x}:orders"]\ncolour = "red"'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, bad))
    lines = str(info.value).splitlines()
    assert "rules[0].ttl: 'soon' is not a duration like '5ms', '90s', '10m', '1h', '1d'" in lines
    assert any(line.startswith("rules[1].keys[0]: template") for line in lines)
    assert any(line.startswith("rules[1].colour: unknown field") for line in lines)
    assert "dsnpass" not in str(info.value)


@pytest.mark.parametrize(
    ("snippet", "replacement", "expected"),
    [
        ('kind = "mysql"', 'kind = "oracle"', "source.kind:"),
        (
            'table = "shop.users"',
            'table = "users"',
            "rules[0].table: table 'users' is not of the form",
        ),
        (
            'action = "evict"',
            'action = "evict"\nformat = "hash"',
            "rules[1]: format applies to refresh",
        ),
        (
            'name = "user-orders"',
            'name = "user-profile"',
            "rules[1].name: 'user-profile' is already",
        ),
        ('url = "redis://127.0.0.1:6379/0"', 'url = "http://x"', "redis.url: must start with"),
        (
            'dsn = "mysql://cw:dsnpass@127.0.0.1:3306/shop"',
            'dsn = "postgres://h/db"',
            "kind 'mysql' does not match",
        ),
    ],
)
def test_specific_errors(tmp_path: Path, snippet: str, replacement: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, GOOD.replace(snippet, replacement, 1)))
    assert expected in str(info.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[source\n"))


def test_rules_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rules: is required"):
        load_settings(write(tmp_path, GOOD.split("[[rules]]")[0]))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5ms", 0.005), ("90s", 90), ("10m", 600), ("1h", 3600), ("1d", 86400), (3, 3)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    settings = load_settings(example)
    assert compile_rules(settings).rules


def test_example_config_documents_every_field() -> None:
    import re

    from worker.settings import (
        BatchSettings,
        CheckpointSettings,
        DefaultsSettings,
        LogSettings,
        RedisSettings,
        RuleSettings,
        Settings,
        SourceSettings,
    )

    text = (Path(__file__).resolve().parents[2] / "config.example.toml").read_text()
    models: list[type[BaseModel]] = [
        Settings,
        SourceSettings,
        RedisSettings,
        CheckpointSettings,
        BatchSettings,
        LogSettings,
        DefaultsSettings,
        RuleSettings,
    ]
    missing = []
    for model in models:
        for field in model.model_fields:
            if field in {"source", "redis", "checkpoint", "batch", "log", "defaults", "rules"}:
                assert f"[{field}]" in text or f"[[{field}]]" in text
                continue
            pattern = rf"^# ?{field} = |^{field} = "
            if not re.search(pattern, text, re.M):
                missing.append(f"{model.__name__}.{field}")
    assert missing == []
