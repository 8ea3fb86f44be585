"""The Postgres part of the benchmark: loading workloads and the contenders of both sources.

``prepare`` creates and fills ``<schema>.items`` (and the lag test's table). ``LogicalBench`` and
``NotifyBench`` set up what holds a backlog *before* any workload is written (``cache-worker
setup``: the workers' replication slots, or their outboxes and triggers), then per workload
write it and replay the same changes through every contender from an empty cache; ``teardown``
removes it all.

- postgres-logical: stock ``pg_recvlogical`` receiving the pgoutput stream of a fresh slot into
  /dev/null (the server's decoding ceiling), the tutorial baseline ``pg_recvlogical`` with
  ``test_decoding`` piped into one unpipelined Redis DEL per row, and ``cache-worker run
  --until-idle`` with an evict and a json refresh rule, each on its own slot (the slot is the
  checkpoint, so no preset is needed).
- postgres-notify: reading the evict worker's outbox in id order and parsing its JSON images
  (the ceiling of reading that table), the same read with one DEL per row, and the two workers,
  each consuming its own outbox (``schema_name`` differs) filled by its own triggers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import rules
from bench.report import Result
from bench.worker_run import cli, run_until_idle, write_config
from bench.workload import Transaction, initial_rows, insert_rows_sql, render_batch, table_ddl
from tests import services
from tests.services import PostgresServer, RedisServer

LOAD_BATCH_ROWS = 2000
TX_PER_BATCH = 200
OUTBOX_READ_BATCH = 1000
RECV_SLOT = "bench_recv"
NAIVE_SLOT = "bench_naive"
RECV_PUBLICATION = "bench_recv"
LAG_DDL = "CREATE TABLE {table} (id INT PRIMARY KEY, committed_at TIMESTAMPTZ)"
# test_decoding prints "table <schema>.<name>: <OP>: id[integer]:<id> ..." per row change.
_TEST_DECODING_ROW = re.compile(rb"^table [^:]+: (?:INSERT|UPDATE|DELETE): id\[integer\]:(\d+)")

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


def _write(pg: PostgresServer, write: Callable[[Connection], None]) -> str:
    """Run ``write`` on an autocommit connection; the WAL insert position after it."""
    with pg.connect() as conn:
        write(conn)
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def _sample_note(rows: int, max_rows: int) -> str:
    return f"stopped after the first {max_rows:,} rows" if rows >= max_rows else ""


def _flush(redis_server: RedisServer) -> None:
    client = redis_server.client()
    try:
        client.flushdb()
    finally:
        client.close()


# ------------------------------------------------------------------------------------------
# postgres-logical
# ------------------------------------------------------------------------------------------


def _recvlogical(pg: PostgresServer, slot: str, end_lsn: str, options: list[str]) -> list[str]:
    return [
        pg_tool("pg_recvlogical"),
        "--start",
        "--no-loop",
        "-S", slot,
        "-E", end_lsn,
        "-d", f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}",
        *options,
    ]  # fmt: skip


def recv_only(pg: PostgresServer, end_lsn: str, expected_rows: int, timeout: float) -> Result:
    """Stock pg_recvlogical receiving pgoutput up to ``end_lsn`` into /dev/null."""
    command = _recvlogical(
        pg,
        RECV_SLOT,
        end_lsn,
        [
            "-P", "pgoutput",
            "-o", "proto_version=1",
            "-o", f"publication_names={RECV_PUBLICATION}",
            "-f", "/dev/null",
        ],
    )  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        command, env=tool_env(pg), capture_output=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({done.returncode}): {done.stderr[-2000:]!r}")
    return Result(
        "pg_recvlogical receive-only (pgoutput)",
        expected_rows,
        seconds,
        "rows: the workload's count (the stream is not parsed); process wall time",
        kind="parse",
    )


def naive_recv(
    pg: PostgresServer, redis_server: RedisServer, end_lsn: str, max_rows: int, timeout: float
) -> Result:
    """pg_recvlogical with test_decoding, one unpipelined ``DEL item:<id>`` per row.

    Stops after ``max_rows`` rows: its rate is steady, and the whole range would cost minutes.
    """
    command = _recvlogical(pg, NAIVE_SLOT, end_lsn, ["-P", "test_decoding", "-f", "-"])
    client = redis_server.client()
    rows = 0
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        command,
        env=tool_env(pg),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _TEST_DECODING_ROW.match(line)
            if match is not None:
                client.delete(rules.item_key(int(match.group(1))))
                rows += 1
                if rows >= max_rows:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive pg_recvlogical reader took more than {timeout}s")
        seconds = time.perf_counter() - started
        if rows >= max_rows:
            proc.kill()
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code != 0 and rows < max_rows:
            stderr = proc.stderr.read() if proc.stderr is not None else b""
            raise RuntimeError(f"pg_recvlogical failed ({code}): {stderr[-2000:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        client.close()
    return Result(
        "naive DEL per row (pg_recvlogical test_decoding)",
        rows,
        seconds,
        _sample_note(rows, max_rows),
        kind="naive",
    )


def _baseline_slots(pg: PostgresServer, table: str, create: bool) -> None:
    """Drop the two baseline slots and their publication; with ``create``, make them anew."""
    with pg.connect() as conn:
        for slot in (RECV_SLOT, NAIVE_SLOT):
            exists = conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if exists:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f"DROP PUBLICATION IF EXISTS {RECV_PUBLICATION}")
        if create:
            conn.execute(f"CREATE PUBLICATION {RECV_PUBLICATION} FOR TABLE {table}")
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (RECV_SLOT,))
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (NAIVE_SLOT,)
            )


class _SourceBench:
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
        self.configs: list[tuple[str, str, Path]] = []
        for label, kind, rule in rules.WORKER_CONTENDERS:
            worker_rules = [rule(table)]
            if kind == "refresh":
                worker_rules.append(rules.lag_rule(lag_table))
            name = f"{self.prefix}_{kind}"
            config = write_config(work, name, self.source(kind), redis_server.url(), worker_rules)
            self.configs.append((label, kind, config))

    def source(self, kind: str) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def lag_config(self) -> Path:
        return next(config for _label, kind, config in self.configs if kind == "refresh")

    def setup(self) -> None:
        cli("setup", configs=[config for _label, _kind, config in self.configs])

    def teardown(self) -> None:
        cli("teardown", configs=[config for _label, _kind, config in self.configs])

    def _workers(self, expected_rows: int, into: list[Result]) -> None:
        for label, kind, config in self.configs:
            _flush(self.redis_server)
            self.log(f"  {label} ...")
            log_path = self.work / f"{self.prefix}_{kind}.{len(into)}.log"
            into.append(run_until_idle(label, kind, config, log_path, self.timeout, expected_rows))


class LogicalBench(_SourceBench):
    """postgres-logical: the workers' slots (``setup``) and two baseline slots per workload."""

    prefix = "logical"
    # The slot is polled this often when the worker is caught up (default 1 s); the lag test
    # needs a short one, or a commit arriving just after an empty peek waits a whole interval.
    poll_interval = "10ms"

    def source(self, kind: str) -> dict[str, Any]:
        return {
            "kind": "postgres-logical",
            "dsn": self.pg.dsn(),
            "poll_interval": self.poll_interval,
        }

    def setup(self) -> None:
        # One at a time: creating a slot waits for every running transaction, another
        # setup's included.
        for _label, _kind, config in self.configs:
            cli("setup", configs=[config])

    def teardown(self) -> None:
        # Slots keep WAL and make every later peek decode more: never leave one behind.
        try:
            _baseline_slots(self.pg, self.table, create=False)
        finally:
            super().teardown()

    def run(
        self,
        write: Callable[[Connection], None],
        expected_rows: int,
        naive_rows: int,
        into: list[Result],
    ) -> None:
        """Fresh baseline slots, the workload, then every contender; appends to ``into``."""
        _baseline_slots(self.pg, self.table, create=True)
        self.log("  writing ...")
        end_lsn = _write(self.pg, write)
        _flush(self.redis_server)
        self.log("  pg_recvlogical receive-only ...")
        into.append(recv_only(self.pg, end_lsn, expected_rows, self.timeout))
        _flush(self.redis_server)
        self.log("  naive ...")
        into.append(naive_recv(self.pg, self.redis_server, end_lsn, naive_rows, self.timeout))
        self._workers(expected_rows, into)


# ------------------------------------------------------------------------------------------
# postgres-notify
# ------------------------------------------------------------------------------------------


def outbox_read(
    pg: PostgresServer,
    schema_name: str,
    client: redis.Redis | None,
    max_rows: int | None,
    label: str,
    kind: str,
    timeout: float,
) -> Result:
    """Read the outbox in id order and parse its images; with ``client``, DEL per row.

    Reads without consuming (the worker consumes the same outbox afterwards), up to
    ``max_rows`` rows when given.
    """
    select = (
        f"SELECT id, old::text, new::text FROM {schema_name}.outbox "
        "WHERE id > %s ORDER BY id LIMIT %s"
    )
    rows = 0
    last = 0
    started = time.perf_counter()
    limit = max_rows if max_rows is not None else float("inf")
    deadline = time.monotonic() + timeout
    with pg.connect() as conn:
        while rows < limit:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading the outbox took more than {timeout:.0f}s")
            batch = conn.execute(select, (last, OUTBOX_READ_BATCH)).fetchall()
            if not batch:
                break
            for outbox_id, old, new in batch:
                before = json.loads(old) if old is not None else None
                after = json.loads(new) if new is not None else None
                image = after if after is not None else before
                if client is not None and image is not None:
                    client.delete(rules.item_key(image["id"]))
                rows += 1
                last = outbox_id
                if rows >= limit:
                    break
    note = _sample_note(rows, max_rows) if max_rows is not None else ""
    return Result(label, rows, time.perf_counter() - started, note, kind=kind)


class NotifyBench(_SourceBench):
    """postgres-notify: one outbox schema (and channel) per worker, filled by its triggers."""

    prefix = "notify"

    def source(self, kind: str) -> dict[str, Any]:
        schema_name = f"cw_{kind}"
        return {
            "kind": "postgres-notify",
            "dsn": self.pg.dsn(),
            "schema_name": schema_name,
            "channel": schema_name,
        }

    def run(
        self,
        write: Callable[[Connection], None],
        expected_rows: int,
        naive_rows: int,
        into: list[Result],
    ) -> None:
        """The workload, the two outbox readers on the first outbox, then the workers."""
        outbox = str(self.source(self.configs[0][1])["schema_name"])
        self.log("  writing ...")
        _write(self.pg, write)
        _flush(self.redis_server)
        self.log("  outbox read-only ...")
        into.append(
            outbox_read(
                self.pg,
                outbox,
                None,
                None,
                "outbox SELECT + JSON parse only",
                "parse",
                self.timeout,
            )
        )
        _flush(self.redis_server)
        self.log("  naive ...")
        client = self.redis_server.client()
        try:
            into.append(
                outbox_read(
                    self.pg,
                    outbox,
                    client,
                    naive_rows,
                    "naive DEL per row (outbox SELECT)",
                    "naive",
                    self.timeout,
                )
            )
        finally:
            client.close()
        self._workers(expected_rows, into)
