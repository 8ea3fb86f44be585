"""Adapters to external systems, one module per system, and the builders the CLI wires them with.

``build_source``, ``build_sink``, ``build_checkpoint_store`` and ``build_dead_letter_store`` turn
validated ``Settings`` into adapter instances. Driver modules are imported inside the builders,
so choosing the MySQL source never imports psycopg and the core can be imported with no driver at
all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError
from worker.settings import Settings, compile_rules

if TYPE_CHECKING:
    import redis

    from connectors.mysql import MySQLOptions
    from connectors.postgres_common import PostgresOptions
    from connectors.redis import RedisOptions
    from worker.events import Position
    from worker.interfaces import CheckpointStore, CheckResult, DeadLetterStore, Sink, Source
    from worker.rules import RuleSet
    from worker.verify import CacheReader, RowReader


def mysql_options(settings: Settings) -> MySQLOptions:
    """MySQLOptions from ``[source]`` (DSN, password from env/file, SSL)."""
    from connectors.mysql import MySQLOptions

    src = settings.source
    parts = urlsplit(src.dsn)
    rules = compile_rules(settings)
    ssl: dict[str, Any] | None = None
    if src.ssl or src.ssl_ca or src.ssl_cert:
        ssl = {"check_hostname": src.ssl_verify}
        if src.ssl_ca:
            ssl["ca"] = str(src.ssl_ca)
        if src.ssl_cert:
            ssl["cert"] = str(src.ssl_cert)
        if src.ssl_key:
            ssl["key"] = str(src.ssl_key)
        if not src.ssl_verify:
            ssl["verify_mode"] = False
    return MySQLOptions(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username) if parts.username else "root",
        password=src.resolved_password(),
        server_id=settings.server_id(),
        tables=tuple(_rule_tables(settings)),
        start=src.start,
        resume=src.resume,
        heartbeat_s=src.heartbeat,
        chunk_rows=src.chunk_rows,
        connect_timeout_s=src.connect_timeout,
        ssl=ssl,
        reconnect_max_backoff_s=settings.batch.retry_max_backoff,
        columns=rules.needed_columns(),
        old_columns=rules.needed_old_columns(),
    )


def _rule_tables(settings: Settings) -> list[Any]:
    from worker.events import TableRef

    return list(dict.fromkeys(TableRef.parse(rule.table) for rule in settings.rules))


def postgres_options(settings: Settings) -> PostgresOptions:
    """PostgresOptions from ``[source]`` (DSN, password from env/file, libpq SSL parameters)."""
    from connectors.postgres_common import PostgresOptions

    src = settings.source
    ssl: dict[str, str] | None = None
    if src.ssl or src.ssl_ca or src.ssl_cert:
        ssl = {"sslmode": "verify-full" if src.ssl_verify else "require"}
        if src.ssl_ca:
            ssl["sslrootcert"] = str(src.ssl_ca)
        if src.ssl_cert:
            ssl["sslcert"] = str(src.ssl_cert)
        if src.ssl_key:
            ssl["sslkey"] = str(src.ssl_key)
    return PostgresOptions(
        dsn=src.dsn,
        password=src.resolved_password(),
        tables=tuple(_rule_tables(settings)),
        name=settings.name,
        start=src.start,
        connect_timeout_s=src.connect_timeout,
        ssl=ssl,
        reconnect_max_backoff_s=settings.batch.retry_max_backoff,
        poll_interval_s=src.poll_interval,
        schema_name=src.schema_name,
        channel=src.channel,
        outbox_batch=src.outbox_batch,
        slot=settings.slot_name(),
        publication=settings.publication_name(),
        max_changes=src.max_changes,
        heartbeat_s=src.heartbeat,
        columns=compile_rules(settings).needed_columns(),
    )


def build_source(settings: Settings) -> Source:
    kind = settings.source.kind
    if kind == "mysql":
        from connectors.mysql import MySQLSource

        return MySQLSource(mysql_options(settings))
    if kind == "postgres-notify":
        from connectors.postgres_notify import PostgresNotifySource

        return PostgresNotifySource(postgres_options(settings))
    if kind == "postgres-logical":
        from connectors.postgres_logical import PostgresLogicalSource

        return PostgresLogicalSource(postgres_options(settings))
    raise ConfigError(f"source.kind: {kind!r} is not a known source")


def preflight(settings: Settings) -> Callable[[Position | None], None]:
    """The start-up check of the configured source, as a callable the run loop retries.

    It gets the loaded checkpoint: a source may treat missing state differently on a resume.
    """
    kind = settings.source.kind
    if kind == "mysql":
        from connectors.mysql import preflight as mysql_preflight

        mysql_opts = mysql_options(settings)
        return lambda checkpoint: mysql_preflight(mysql_opts)
    pg_opts = postgres_options(settings)
    if kind == "postgres-notify":
        from connectors.postgres_notify import preflight as notify_preflight

        return lambda checkpoint: notify_preflight(pg_opts)
    from connectors.postgres_logical import preflight as logical_preflight

    return lambda checkpoint: logical_preflight(pg_opts, resuming=checkpoint is not None)


def source_checks(settings: Settings, source: Source, rules: RuleSet) -> list[CheckResult]:
    """The source's ``check`` lines; the logical source also judges replica identity per rule."""
    if settings.source.kind == "postgres-logical":
        checks = getattr(source, "checks")  # noqa: B009 - the protocol's checks() takes no argument
        result: list[CheckResult] = checks(key_columns=rules.needed_old_columns(watch=False))
        return result
    return source.checks()


def redis_options(settings: Settings) -> RedisOptions:
    from connectors.redis import RedisOptions

    r = settings.redis
    return RedisOptions(
        url=r.url,
        password=r.resolved_password(),
        username=r.username,
        ssl_ca_file=str(r.ssl_ca) if r.ssl_ca else None,
        ssl_cert_file=str(r.ssl_cert) if r.ssl_cert else None,
        ssl_key_file=str(r.ssl_key) if r.ssl_key else None,
        ssl_verify=r.ssl_verify,
        socket_timeout_s=r.socket_timeout,
        connect_timeout_s=r.connect_timeout,
    )


def redis_client(settings: Settings) -> redis.Redis:
    from connectors.redis import connect

    return connect(redis_options(settings))


def build_sink(client: redis.Redis) -> Sink:
    from connectors.redis import RedisSink

    return RedisSink(client)


def build_checkpoint_store(settings: Settings, client: redis.Redis) -> CheckpointStore:
    if settings.checkpoint.store == "file":
        from pathlib import Path

        from worker.checkpoint import FileCheckpointStore

        return FileCheckpointStore(Path(str(settings.checkpoint.path)))
    from connectors.redis import RedisCheckpointStore

    return RedisCheckpointStore(client, settings.checkpoint_key())


def build_dead_letter_store(settings: Settings, client: redis.Redis) -> DeadLetterStore:
    from connectors.redis import RedisDeadLetterStore

    return RedisDeadLetterStore(client, settings.dead_letter_key())


def secrets_of(settings: Settings) -> list[str | None]:
    """Every secret the settings hold, for the log scrubber."""
    return [
        settings.source.resolved_password(),
        settings.redis.resolved_password(),
        urlsplit(settings.redis.url).password,
    ]


__all__ = [
    "build_checkpoint_store",
    "build_dead_letter_store",
    "build_sink",
    "build_source",
    "mysql_options",
    "postgres_options",
    "preflight",
    "redis_client",
    "redis_options",
    "secrets_of",
    "source_checks",
]


def build_verify_readers(settings: Settings) -> tuple[RowReader, CacheReader]:
    """The row reader of the configured source and the Redis key reader, for ``verify``."""
    from connectors.redis_values import RedisCacheReader

    cache = RedisCacheReader(redis_client(settings))
    if settings.source.kind == "mysql":
        from connectors.mysql_rows import MySQLRowReader

        return MySQLRowReader(mysql_options(settings)), cache
    from connectors.postgres_rows import PostgresRowReader

    return PostgresRowReader(postgres_options(settings)), cache
