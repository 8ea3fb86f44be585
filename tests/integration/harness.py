"""One face for the three sources in the behaviour suite: a database to write to and a config.

``SourceHarness`` hides what differs between MySQL/MariaDB, postgres-notify and postgres-logical
(DDL dialect, how to run SQL, the qualified table name, the config's ``[source]`` and the
``setup`` step Postgres needs) so that each behaviour test is written once and proven on every
source. Each harness owns a fresh database (MySQL) or a fresh database with its own slot and
publication (Postgres), created per test and removed afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.integration.worker_process import run_cli, write_config
from tests.services import MariaDBServer, PostgresServer

SOURCES = ("mysql", "postgres-notify", "postgres-logical")

# Column types spelled per dialect, so one table definition serves every source.
_TYPES = {
    "mysql": {"datetime": "DATETIME(6)", "json": "JSON", "bytes": "VARBINARY(64)"},
    "postgres": {"datetime": "TIMESTAMP(6)", "json": "JSONB", "bytes": "BYTEA"},
}


class SourceHarness:
    """A per-test database on one source's server, and configs that follow it."""

    def __init__(self, kind: str, server: MariaDBServer | PostgresServer, tmp_path: Path) -> None:
        self.kind = kind
        self.server = server
        self.tmp_path = tmp_path
        self.db = f"t_{uuid.uuid4().hex[:12]}"
        self.dialect = "mysql" if kind == "mysql" else "postgres"
        self.tables: list[str] = []
        self.config_path: Path | None = None

    # -- database -------------------------------------------------------------------------

    def create(self) -> SourceHarness:
        if isinstance(self.server, MariaDBServer):
            self.server.admin_sql(f"CREATE DATABASE `{self.db}` CHARACTER SET utf8mb4")
        else:
            with self.server.connect() as conn:
                conn.execute(f'CREATE DATABASE "{self.db}"')
        return self

    def drop(self) -> None:
        if isinstance(self.server, MariaDBServer):
            self.server.admin_sql(f"DROP DATABASE IF EXISTS `{self.db}`")
            return
        with self.server.connect() as conn:
            # A logical slot pins its database; drop it (and kick our own consumers) first.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.db,),
            )
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s AND NOT active",
                (self.db,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def type(self, name: str) -> str:
        return _TYPES[self.dialect][name]

    def table(self, name: str) -> str:
        """The rule's ``table`` value: database.table on MySQL, public.table on Postgres."""
        return f"{self.db}.{name}" if self.dialect == "mysql" else f"public.{name}"

    def sql(self, *statements: str, args: Sequence[Any] | None = None) -> None:
        """Run each statement in its own autocommit transaction."""
        if isinstance(self.server, MariaDBServer):
            conn = self.server.connect(self.db)
            try:
                with conn.cursor() as cur:
                    for statement in statements:
                        cur.execute(statement, args)
            finally:
                conn.close()
            return
        with self.server.connect(self.db) as pg:
            for statement in statements:
                pg.execute(statement, args)

    def transaction(self, statements: Sequence[str]) -> None:
        """Run the statements in one transaction."""
        if isinstance(self.server, MariaDBServer):
            conn = self.server.connect(self.db, autocommit=False)
            try:
                with conn.cursor() as cur:
                    for statement in statements:
                        cur.execute(statement)
                conn.commit()
            finally:
                conn.close()
            return
        with self.server.connect(self.db) as pg, pg.transaction():
            for statement in statements:
                pg.execute(statement)

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement over many parameter rows, in one transaction."""
        if isinstance(self.server, MariaDBServer):
            conn = self.server.connect(self.db, autocommit=False)
            try:
                with conn.cursor() as cur:
                    cur.executemany(statement, rows)
                conn.commit()
            finally:
                conn.close()
            return
        with self.server.connect(self.db) as pg, pg.transaction(), pg.cursor() as cur:
            cur.executemany(statement, rows)

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        if isinstance(self.server, MariaDBServer):
            conn = self.server.connect(self.db)
            try:
                with conn.cursor() as cur:
                    cur.execute(statement)
                    return list(cur.fetchall())
            finally:
                conn.close()
        with self.server.connect(self.db) as pg:
            return list(pg.execute(statement).fetchall())

    def create_table(self, name: str, ddl_body: str) -> None:
        """``CREATE TABLE name (ddl_body)``; Postgres tables get REPLICA IDENTITY FULL.

        FULL makes logical decoding carry the whole old row, which rules need to evict the old
        key when a non-key column used in a key template changes (``check`` says so too).
        """
        self.sql(f"CREATE TABLE {name} ({ddl_body})")
        if self.dialect == "postgres":
            self.sql(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
        self.tables.append(name)

    # -- worker config --------------------------------------------------------------------

    def dsn(self) -> str:
        return self.server.dsn(self.db)

    def config(
        self, redis_url: str, rules: Sequence[dict[str, Any]], extra: str = "", **source: Any
    ) -> Path:
        """Write the config (rules' ``table`` may say ``DB.name``) and run ``setup`` if needed."""
        resolved = []
        for rule in rules:
            rule = dict(rule)
            rule["table"] = self.table(rule["table"].removeprefix("DB."))
            resolved.append(rule)
        path = write_config(
            self.tmp_path / f"{self.kind}.toml",
            name=self.db,
            source_dsn=self.dsn(),
            redis_url=redis_url,
            rules=resolved,
            source={"kind": self.kind, "poll_interval": "0.5s", **source},
            extra=extra,
        )
        if self.kind != "mysql":
            result = run_cli(path, "setup")
            assert result.returncode == 0, result.stdout + result.stderr
        self.config_path = path
        return path
