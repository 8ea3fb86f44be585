"""The MariaDB part of the benchmark: loading the binlog and the contenders that read it.

``prepare`` creates and fills ``bench.items``; ``write_range`` runs a workload and returns the
binlog range it occupies. ``run_contenders`` then replays exactly that range through each
contender from an empty cache: two stock ``pymysqlreplication`` loops (parse only, the library
ceiling; one unpipelined Redis DEL per row, the tutorial baseline) and the real ``cache-worker
run --until-idle`` with an evict and a json refresh rule, each with a file checkpoint preset to
the range's start. Nothing writes to the binlog while they run, so the end of the binlog is the
end of the range for the worker too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import pymysql
from pymysql.constants import CLIENT
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from bench import rules
from bench.report import Result
from bench.worker_run import run_until_idle, write_config
from bench.workload import Transaction, initial_rows, insert_rows_sql, render_batch, table_ddl
from connectors.mysql import make_position
from tests.services import MariaDBServer, RedisServer

TABLE = "bench.items"
LAG_TABLE = "bench.lag"
LAG_DDL = f"CREATE TABLE {LAG_TABLE} (id INT PRIMARY KEY, committed_at DATETIME(6))"
LOAD_BATCH_ROWS = 2000
TX_PER_BATCH = 200
WORKER_SERVER_ID = 9100
# A stock reader that has not finished by then is stuck, not slow.
READ_TIMEOUT_S = 900.0

Cursor = Any  # a pymysql cursor; pymysql's stubs make the generic type awkward to spell


@dataclass(frozen=True, slots=True)
class BinlogRange:
    """Where a workload starts and ends in the binlog."""

    start_file: str
    start_pos: int
    end_file: str
    end_pos: int

    def __str__(self) -> str:
        return f"{self.start_file}:{self.start_pos}..{self.end_file}:{self.end_pos}"


def _master_status(conn: pymysql.Connection[Any]) -> tuple[str, int]:
    with conn.cursor() as cur:
        cur.execute("SHOW MASTER STATUS")
        row = cur.fetchone()
    if row is None:
        raise RuntimeError("SHOW MASTER STATUS returned nothing: is the binlog enabled?")
    return str(row[0]), int(row[1])


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _connect(mariadb: MariaDBServer) -> pymysql.Connection[Any]:
    # Multi-statement batches: one round trip per TX_PER_BATCH transactions keeps loading fast,
    # while each transaction still gets its own BEGIN/COMMIT and so its own binlog transaction.
    return mariadb.connect(client_flag=CLIENT.MULTI_STATEMENTS, read_timeout=600)


def prepare(mariadb: MariaDBServer, rows: int, seed: int) -> None:
    """Create ``bench.items`` with ``rows`` seed rows and the empty ``bench.lag``."""
    conn = _connect(mariadb)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS bench")
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
            cur.execute(table_ddl(TABLE, "mysql"))
            cur.execute(f"DROP TABLE IF EXISTS {LAG_TABLE}")
            cur.execute(LAG_DDL)
            for batch in _batches(initial_rows(rows, seed), LOAD_BATCH_ROWS):
                cur.execute(insert_rows_sql(batch, TABLE))
    finally:
        conn.close()


def write_range(mariadb: MariaDBServer, write: Callable[[Cursor], None]) -> BinlogRange:
    """Run ``write`` on an autocommit multi-statement cursor; the binlog range it wrote."""
    conn = _connect(mariadb)
    try:
        start = _master_status(conn)
        with conn.cursor() as cur:
            write(cur)
        end = _master_status(conn)
    finally:
        conn.close()
    return BinlogRange(start[0], start[1], end[0], end[1])


def small_writer(txs: Iterable[Transaction]) -> Callable[[Cursor], None]:
    """Writes the small transactions, TX_PER_BATCH per round trip."""

    def write(cur: Cursor) -> None:
        for tx_batch in _batches(txs, TX_PER_BATCH):
            cur.execute(render_batch(tx_batch, TABLE))
            while cur.nextset():
                pass

    return write


def statements_writer(statements: list[str]) -> Callable[[Cursor], None]:
    """Runs each statement as its own (autocommit) transaction."""

    def write(cur: Cursor) -> None:
        for statement in statements:
            cur.execute(statement)

    return write


def _reader(mariadb: MariaDBServer, rng: BinlogRange, server_id: int) -> BinLogStreamReader:
    return BinLogStreamReader(
        connection_settings={
            "host": mariadb.host,
            "port": mariadb.port,
            "user": mariadb.user,
            "passwd": mariadb.password,
        },
        server_id=server_id,
        blocking=False,
        resume_stream=True,
        log_file=rng.start_file,
        log_pos=rng.start_pos,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
        is_mariadb=False,
    )


def _past_end(stream: BinLogStreamReader, rng: BinlogRange) -> bool:
    file, pos = stream.log_file, stream.log_pos
    return bool(file is not None and pos is not None and (file, pos) >= (rng.end_file, rng.end_pos))


def _stream_rows(
    mariadb: MariaDBServer,
    rng: BinlogRange,
    server_id: int,
    on_row: Callable[[Any], None],
    max_rows: int | None = None,
) -> tuple[int, float]:
    started = time.perf_counter()
    deadline = time.monotonic() + READ_TIMEOUT_S
    stream = _reader(mariadb, rng, server_id)
    count = 0
    limit = max_rows if max_rows is not None else float("inf")
    try:
        for event in stream:
            for row in event.rows:
                on_row(row)
                count += 1
            # Nothing writes after the workload, so the log's end is the range's end; the check
            # just keeps the loop honest if something ever does.
            if _past_end(stream, rng) or count >= limit:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading the binlog took more than {READ_TIMEOUT_S:.0f}s")
    finally:
        stream.close()
    return count, time.perf_counter() - started


def parse_only(mariadb: MariaDBServer, rng: BinlogRange) -> Result:
    """Stock BinLogStreamReader decoding every row and doing nothing with it."""
    rows, seconds = _stream_rows(mariadb, rng, 9001, lambda _row: None)
    return Result("mysql-replication parse-only", rows, seconds, kind="parse")


def naive_delete(
    mariadb: MariaDBServer, redis_server: RedisServer, rng: BinlogRange, max_rows: int
) -> Result:
    """Stock reader plus one unpipelined ``DEL item:<id>`` per row (the tutorial baseline).

    Stops after the event that reaches ``max_rows``: its rate is steady (a round trip per row)
    and the whole range would cost minutes of the run.
    """
    client = redis_server.client()
    try:

        def delete(row: Any) -> None:
            values = row.get("values") or row.get("after_values")
            client.delete(rules.item_key(values["id"]))

        rows, seconds = _stream_rows(mariadb, rng, 9002, delete, max_rows)
    finally:
        client.close()
    note = f"stopped after the first {rows:,} rows" if rows >= max_rows else ""
    return Result("naive DEL per row", rows, seconds, note, kind="naive")


def source_settings(mariadb: MariaDBServer) -> dict[str, Any]:
    """The ``[source]`` of a benchmark worker on this MariaDB."""
    return {
        "kind": "mysql",
        "dsn": mariadb.dsn(),
        "resume": "file",
        "server_id": WORKER_SERVER_ID,
    }


def run_contenders(
    mariadb: MariaDBServer,
    redis_server: RedisServer,
    work: Path,
    rng: BinlogRange,
    expected_rows: int,
    naive_rows: int,
    timeout: float,
    log: Callable[[str], None],
    into: list[Result],
) -> None:
    """Every contender over ``rng``, each from an empty cache; appends to ``into`` as they end."""
    flush = redis_server.client()
    try:
        runs: list[tuple[str, Callable[[], Result]]] = [
            ("parse-only", lambda: parse_only(mariadb, rng)),
            ("naive", lambda: naive_delete(mariadb, redis_server, rng, naive_rows)),
        ]
        for label, kind, rule in rules.WORKER_CONTENDERS:
            config = write_config(
                work,
                f"mariadb_{kind}",
                source_settings(mariadb),
                redis_server.url(),
                [rule(TABLE)],
                checkpoint=make_position(rng.start_file, rng.start_pos, None),
            )
            log_path = work / f"mariadb_{kind}.{rng.start_pos}.log"
            worker = partial(
                run_until_idle, label, kind, config, log_path, timeout, expected_rows, redis_server
            )
            runs.append((label, worker))
        for label, run in runs:
            # Every contender starts from an empty cache so none benefits from another's keys.
            flush.flushdb()
            log(f"  {label} ...")
            into.append(run())
    finally:
        flush.close()
