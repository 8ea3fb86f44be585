"""The configuration: TOML file, overridden by ``CACHE_WORKER_*`` environment variables.

``load_settings(path)`` reads the TOML file, layers the environment on top (``CACHE_WORKER_``
prefix, ``__`` between levels, e.g. ``CACHE_WORKER_REDIS__URL``) and validates everything with
pydantic. Secrets come from the environment or from ``*_file`` fields and are held as
``SecretStr`` so they never print. Every error becomes one ``ConfigError`` whose lines name the
field (``rules[1].keys[0]: ...``) and what is wrong with it. ``compile_rules`` turns the rule
settings into the core's ``RuleSet``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from worker.errors import ConfigError
from worker.events import TableRef
from worker.rules import DEFAULT_MAX_VALUE_BYTES, KeyTemplate, Rule, RuleSet

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``"90s"``, ``"10m"``, ``"1h"``, ``"5ms"``, ``"1d"`` or a number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '90s', '10m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration like '5ms', '90s', '10m', '1h', '1d'")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or text like '90s', '10m', '1h'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

# Redis's own limit on a string (proto-max-bulk-len); a larger setting could never matter.
_REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret_file(path: Path | None, field: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None


class SourceSettings(_Section):
    """``[source]``: which database log to follow and how to connect to it."""

    kind: Literal["mysql", "postgres-notify", "postgres-logical"] = "mysql"
    dsn: str
    password: SecretStr | None = None
    password_file: Path | None = None
    server_id: int | None = Field(default=None, ge=1, le=4294967295)
    start: Literal["end", "beginning"] = "end"
    resume: Literal["auto", "gtid", "file"] = "auto"
    heartbeat: Duration = 1.0
    chunk_rows: int = Field(default=5000, ge=1)
    connect_timeout: Duration = 10.0
    ssl: bool = False
    ssl_ca: Path | None = None
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    ssl_verify: bool = True
    # Postgres only.
    schema_name: str = Field(default="cache_worker", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    channel: str = Field(default="cache_worker", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    outbox_batch: int = Field(default=1000, ge=1, le=100_000)
    poll_interval: Duration = 1.0
    slot: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,63}$")
    publication: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    max_changes: int = Field(default=5000, ge=1, le=1_000_000)

    @field_validator("dsn")
    @classmethod
    def _dsn_shape(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mysql", "mariadb", "postgres", "postgresql"):
            raise ValueError("must start with mysql://, mariadb://, postgres:// or postgresql://")
        if not parts.hostname:
            raise ValueError("names no host")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @model_validator(mode="after")
    def _kind_matches_dsn(self) -> SourceSettings:
        scheme = urlsplit(self.dsn).scheme
        is_mysql = scheme in ("mysql", "mariadb")
        if is_mysql != (self.kind == "mysql"):
            raise ValueError(f"kind {self.kind!r} does not match a {scheme}:// dsn")
        return self

    def resolved_password(self) -> str | None:
        """password_file, else password, else the DSN's password."""
        from_file = _read_secret_file(self.password_file, "source.password_file")
        if from_file is not None:
            return from_file
        if self.password is not None:
            return self.password.get_secret_value()
        raw = urlsplit(self.dsn).password
        return unquote(raw) if raw is not None else None


class RedisSettings(_Section):
    """``[redis]``: the cache (and, by default, where the checkpoint lives)."""

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    ssl_ca: Path | None = None
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    ssl_verify: bool = True
    socket_timeout: Duration = 5.0
    connect_timeout: Duration = 5.0

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    def resolved_password(self) -> str | None:
        from_file = _read_secret_file(self.password_file, "redis.password_file")
        if from_file is not None:
            return from_file
        return self.password.get_secret_value() if self.password is not None else None


class CheckpointSettings(_Section):
    """``[checkpoint]``: where the last applied position is remembered."""

    store: Literal["redis", "file"] = "redis"
    key: str | None = None
    path: Path | None = None
    interval: Duration = 1.0

    @model_validator(mode="after")
    def _file_needs_path(self) -> CheckpointSettings:
        if self.store == "file" and self.path is None:
            raise ValueError("store = 'file' needs path")
        return self


class BatchSettings(_Section):
    """``[batch]``: how changes are grouped into Redis round trips."""

    max_transactions: int = Field(default=2000, ge=1)
    max_actions: int = Field(default=5000, ge=1)
    max_delay: Duration = 0.005
    queue_size: int = Field(default=20000, ge=1)
    queue_rows: int = Field(default=50000, ge=1)
    retry_max_backoff: Duration = 30.0
    poison_retries: int = Field(default=3, ge=0, le=100)


class LogSettings(_Section):
    """``[log]``: structured logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    progress_interval: Duration = 10.0


class DefaultsSettings(_Section):
    """``[defaults]``: what rules inherit when they say nothing."""

    ttl: Duration = 3600.0
    jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_value_bytes: int = Field(default=DEFAULT_MAX_VALUE_BYTES, ge=1, le=_REDIS_MAX_VALUE_BYTES)


WhenScalar = str | int | float | bool


def _check_template(value: str) -> str:
    KeyTemplate.parse(value)
    return value


class RuleSettings(_Section):
    """One ``[[rules]]`` entry, as written."""

    name: str | None = None
    table: str
    keys: list[Annotated[str, AfterValidator(_check_template)]] = Field(min_length=1)
    action: Literal["refresh", "evict"] = "refresh"
    format: Literal["json", "hash"] | None = None
    columns: list[str] | None = None
    watch: list[str] | None = None
    ttl: Duration | None = None
    jitter: float | None = Field(default=None, ge=0.0, lt=1.0)
    max_value_bytes: int | None = Field(default=None, ge=1, le=_REDIS_MAX_VALUE_BYTES)
    when: dict[str, WhenScalar | list[WhenScalar]] = Field(default_factory=dict)

    @field_validator("table")
    @classmethod
    def _table_shape(cls, value: str) -> str:
        TableRef.parse(value)
        return value

    @field_validator("columns", "watch")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("leave it out rather than empty (empty would mean nothing)")
        return value

    @field_validator("ttl")
    @classmethod
    def _positive_ttl(cls, value: float | None) -> float | None:
        if value is not None and value < 0.001:
            raise ValueError("must be at least 1ms: refresh keys always carry a TTL")
        return value

    @model_validator(mode="after")
    def _refresh_only_fields(self) -> RuleSettings:
        if self.action == "evict":
            for name in ("format", "columns", "ttl", "jitter", "max_value_bytes"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to refresh rules only (action = 'evict')")
        return self


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="CACHE_WORKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    name: str = Field(default="cache-worker", pattern=r"^[A-Za-z0-9_.:-]+$")
    source: SourceSettings
    redis: RedisSettings = RedisSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    batch: BatchSettings = BatchSettings()
    log: LogSettings = LogSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    rules: list[RuleSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Settings:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            name = rule_name(rule, i)
            if name in seen:
                raise ValueError(
                    f"rules[{i}].name: {name!r} is already the name of rules[{seen[name]}]"
                )
            seen[name] = i
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is passed as init values by load_settings; the environment wins over it.
        return (env_settings, init_settings)

    def _pg_default_name(self) -> str:
        """``cache_worker_<name>`` folded to a Postgres identifier (slot, publication)."""
        return "cache_worker_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())[:50]

    def slot_name(self) -> str:
        return self.source.slot or self._pg_default_name()

    def publication_name(self) -> str:
        return self.source.publication or self._pg_default_name()

    def checkpoint_key(self) -> str:
        return self.checkpoint.key or f"cache-worker:checkpoint:{self.name}"

    def dead_letter_key(self) -> str:
        """The Redis stream of this worker's dead letters."""
        return f"cache-worker:dlq:{self.name}"

    def server_id(self) -> int:
        """The replica id to register with; derived from ``name`` unless set."""
        if self.source.server_id is not None:
            return self.source.server_id
        import zlib

        # Stable per worker name and away from the small ids humans give real replicas.
        return 100_000 + zlib.crc32(self.name.encode()) % 1_000_000_000


def rule_name(rule: RuleSettings, index: int) -> str:
    return rule.name or f"{rule.table}#{index}"


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif (
            part.startswith(
                ("function-", "literal[", "list[", "union[", "str", "int", "float", "bool")
            )
            and text
        ):
            continue
        else:
            text += ("." if text else "") + part
    return text or "config"


def _format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        loc = _format_loc(tuple(error["loc"]))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see config.example.toml)"
        elif error["type"] == "missing":
            message = "is required"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        elif message.startswith("Assertion failed, "):
            message = message[len("Assertion failed, ") :]
        if error["type"] == "value_error" and loc == "config" and message.startswith("rules["):
            lines.append(message)
        else:
            lines.append(f"{loc}: {message}")
    return sorted(set(lines), key=lines.index)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read ``path`` (may be None: environment only) and the environment; raise ConfigError."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    if overrides:
        data.update(overrides)
    toml_data = data

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (env_settings, InitSettingsSource(settings_cls, toml_data))

    try:
        # Required fields arrive through the settings sources, which mypy cannot see.
        loaded = _FromFile()  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError("\n".join(_format_validation_error(exc))) from None
    except ValueError as exc:
        raise ConfigError(f"environment: {exc}") from None
    return loaded


def compile_rules(settings: Settings) -> RuleSet:
    """The core's RuleSet for the validated rule settings."""
    rules = []
    for index, raw in enumerate(settings.rules):
        when: dict[str, Any] = {
            column: tuple(value) if isinstance(value, list) else value
            for column, value in raw.when.items()
        }
        ttl = raw.ttl if raw.ttl is not None else settings.defaults.ttl
        rules.append(
            Rule(
                name=rule_name(raw, index),
                table=TableRef.parse(raw.table),
                keys=tuple(KeyTemplate.parse(t) for t in raw.keys),
                action=raw.action,
                format=raw.format or "json",
                columns=tuple(raw.columns) if raw.columns else None,
                watch=frozenset(raw.watch) if raw.watch else None,
                ttl_ms=max(1, int(ttl * 1000)),
                jitter=raw.jitter if raw.jitter is not None else settings.defaults.jitter,
                when=when,
                index=index,
                max_value_bytes=(
                    raw.max_value_bytes
                    if raw.max_value_bytes is not None
                    else settings.defaults.max_value_bytes
                ),
            )
        )
    return RuleSet(rules)
