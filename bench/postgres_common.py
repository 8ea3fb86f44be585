"""Shared Postgres plumbing of the benchmark: tools, loading, writing, and the per-source base.

``configure`` restores the default commit behaviour for the bench database, ``prepare`` creates
and fills ``<schema>.items`` (and the lag test's table), the writers run a workload on an
autocommit connection. ``SourceBench`` holds the two worker configs of one Postgres source
(evict and json refresh rule, plus the lag rule on the refresh one) that ``cache-worker setup``
prepares once for every workload and the lag test, and runs them with ``run --until-idle``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg

from bench import rules
from bench.report import Result
from bench.worker_run import cli, run_until_idle, write_config
from bench.workload import Transaction, initial_rows, insert_rows_sql, render_batch, table_ddl
from tests import services
from tests.services import PostgresServer, RedisServer

LOAD_BATCH_ROWS = 2000
TX_PER_BATCH = 200
LAG_DDL = "CREATE TABLE {table} (id INT PRIMARY KEY, committed_at TIMESTAMPTZ)"

Connection = psycopg.Connection[tuple[Any, ...]]


def pg_tool(name: str) -> str:
    """A Postgres client program (pgbench, pg_recvlogical) of the server's version."""
    # The server binary may be a symlink into the real bin dir (which has the client tools).
    bindir = (services._postgres_bindir() / "postgres").resolve().parent
    candidate = bindir / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` not found (Debian: postgresql-15 / postgresql-client-15)")
    return found


def tool_env(pg: PostgresServer) -> dict[str, str]:
    """The environment of a libpq client program: the password, no ~/.pgpass surprises."""
    return {**os.environ, "PGPASSWORD": pg.password, "PGCONNECT_TIMEOUT": "10"}


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def configure(pg: PostgresServer) -> None:
    """Commits wait for their WAL flush again in this database, as by default.

    tests/services.py starts Postgres with ``synchronous_commit=off`` for test speed; with it a
    commit returns before logical decoding can see it, which would add up to a few
    wal_writer_delay to every lag sample. A database setting overrides the command line for
    new sessions; fsync stays off, so a flush is only a write to the page cache.
    """
    with pg.connect() as conn:
        conn.execute(f"ALTER DATABASE {pg.dbname} SET synchronous_commit = on")


def prepare(pg: PostgresServer, schema: str, rows: int, seed: int) -> tuple[str, str]:
    """Create ``<schema>.items`` with ``rows`` seed rows and the empty lag table; their names."""
    table, lag_table = f"{schema}.items", f"{schema}.lag"
    with pg.connect() as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(table_ddl(table, "postgres"))
        conn.execute(LAG_DDL.format(table=lag_table))
        for batch in _batches(initial_rows(rows, seed), LOAD_BATCH_ROWS):
            conn.execute(insert_rows_sql(batch, table))
        conn.execute(f"VACUUM ANALYZE {table}")
    return table, lag_table


def small_writer(txs: Iterable[Transaction], table: str) -> Callable[[Connection], None]:
    """Writes the small transactions, TX_PER_BATCH per round trip."""

    def write(conn: Connection) -> None:
        # Without parameters psycopg sends the simple query protocol, which runs several
        # statements, each BEGIN ... COMMIT its own transaction.
        for tx_batch in _batches(txs, TX_PER_BATCH):
            conn.execute(render_batch(tx_batch, table))

    return write


def statements_writer(statements: list[str]) -> Callable[[Connection], None]:
    """Runs each statement as its own (autocommit) transaction."""

    def write(conn: Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return write


def write_workload(pg: PostgresServer, write: Callable[[Connection], None]) -> str:
    """Run ``write`` on an autocommit connection; the WAL insert position after it."""
    with pg.connect() as conn:
        write(conn)
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def sample_note(rows: int, max_rows: int) -> str:
    return f"stopped after the first {max_rows:,} rows" if rows >= max_rows else ""


def flush(redis_server: RedisServer) -> None:
    client = redis_server.client()
    try:
        client.flushdb()
    finally:
        client.close()


class SourceBench:
    """The two worker configs of one Postgres source, set up once for all its workloads.

    The refresh worker's config also carries the lag rule, so the lag test reuses its slot or
    outbox (and checkpoint) instead of setting up another.
    """

    prefix = ""

    def __init__(
        self,
        pg: PostgresServer,
        redis_server: RedisServer,
        work: Path,
        table: str,
        lag_table: str,
        timeout: float,
        log: Callable[[str], None],
    ) -> None:
        self.pg = pg
        self.redis_server = redis_server
        self.work = work
        self.table = table
        self.timeout = timeout
        self.log = log
        self._runs = 0  # numbers the worker logs, which --keep leaves behind
        self.configs: list[tuple[str, str, Path]] = []
        for label, kind, rule in rules.WORKER_CONTENDERS:
            worker_rules = [rule(table)]
            if kind == "refresh":
                worker_rules.append(rules.lag_rule(lag_table))
            name = f"{self.prefix}_{kind}"
            config = write_config(work, name, self.source(kind), redis_server.url(), worker_rules)
            self.configs.append((label, kind, config))

    def source(self, kind: str) -> dict[str, Any]:
        """The ``[source]`` of the worker with the ``kind`` rule (each subclass says)."""
        raise NotImplementedError

    @property
    def lag_config(self) -> Path:
        return next(config for _label, kind, config in self.configs if kind == "refresh")

    def setup(self) -> None:
        cli("setup", configs=[config for _label, _kind, config in self.configs])

    def teardown(self) -> None:
        cli("teardown", configs=[config for _label, _kind, config in self.configs])

    def before_worker(self, index: int) -> None:
        """Called before the ``index``-th worker contender runs (nothing to do by default)."""

    def _workers(self, expected_rows: int, into: list[Result]) -> None:
        for index, (label, kind, config) in enumerate(self.configs):
            self.before_worker(index)
            flush(self.redis_server)
            self.log(f"  {label} ...")
            self._runs += 1
            log_path = self.work / f"{self.prefix}_{kind}.{self._runs}.log"
            into.append(
                run_until_idle(
                    label, kind, config, log_path, self.timeout, expected_rows, self.redis_server
                )
            )
