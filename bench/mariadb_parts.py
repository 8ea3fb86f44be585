"""The MariaDB parts of a run, in order: throughput (small, bulk), memory, lag.

One MariaDB serves them all; it is stopped before the Postgres parts start, since even an idle
database server costs the later parts some CPU on two cores. Each workload is written right
before its contenders run, so a worker reading to the end of the binlog stops at its range.
"""

from __future__ import annotations

from bench import lag, memory
from bench import mysql_contenders as mysql
from bench.rules import lag_rule
from bench.run import Run
from bench.worker_run import write_config
from bench.workload import bulk_statements, generate_transactions
from tests import services
from tests.services import MariaDBServer, RedisServer


def run_mariadb(run: Run, redis_server: RedisServer) -> None:
    """Every MariaDB part the run asks for."""
    s = run.sizes
    run.log("starting MariaDB ...")
    server = services.start_local_mariadb()
    try:
        run.step("mariadb: load", lambda: mysql.prepare(server, s.table_rows, run.seed))
        if "mariadb" in run.parts:
            run.step("mariadb: small transactions", lambda: _small(run, server, redis_server))
            run.step("mariadb: bulk statements", lambda: _bulk(run, server, redis_server))
        if "memory" in run.parts:
            run.step("mariadb: memory", lambda: _memory(run, server, redis_server))
        if "lag" in run.parts:
            run.step("mariadb: lag", lambda: _lag(run, server, redis_server))
    finally:
        server.close()


def _contenders(
    run: Run,
    server: MariaDBServer,
    redis_server: RedisServer,
    rng: mysql.BinlogRange,
    rows: int,
    workload: str,
    title: str,
) -> None:
    into = run.section("mariadb", workload, title)
    run.log(f"  binlog {rng}")
    s = run.sizes
    mysql.run_contenders(
        server, redis_server, run.work, rng, rows, s.naive_rows, s.worker_timeout_s, run.log, into
    )


def _small(run: Run, server: MariaDBServer, redis_server: RedisServer) -> None:
    s = run.sizes
    txs = generate_transactions(s.table_rows, s.small_changes, run.seed)
    rng = mysql.write_range(server, mysql.small_writer(txs))
    title = run.small_title("MariaDB")
    _contenders(run, server, redis_server, rng, s.small_changes, "small", title)


def _bulk(run: Run, server: MariaDBServer, redis_server: RedisServer) -> None:
    s = run.sizes
    statements = bulk_statements(s.table_rows, mysql.TABLE)
    rng = mysql.write_range(server, mysql.statements_writer(statements))
    title = run.bulk_title("MariaDB")
    _contenders(run, server, redis_server, rng, s.bulk_changes, "bulk", title)


def _memory(run: Run, server: MariaDBServer, redis_server: RedisServer) -> None:
    s = run.sizes
    result = memory.measure(
        server, redis_server, run.work, s.table_rows, s.backlog_changes, s.worker_timeout_s, run.log
    )
    run.report.memory.append(result)


def _lag(run: Run, server: MariaDBServer, redis_server: RedisServer) -> None:
    # No checkpoint: the worker starts at the end of the binlog, as a fresh deployment would.
    config = write_config(
        run.work,
        "mariadb_lag",
        mysql.source_settings(server),
        redis_server.url(),
        [lag_rule(mysql.LAG_TABLE)],
    )

    def open_writer() -> lag.Writer:
        conn = server.connect()  # autocommit: each INSERT is one transaction
        cur = conn.cursor()
        sql = f"INSERT INTO {mysql.LAG_TABLE} (id, committed_at) VALUES (%s, NOW(6))"

        def insert(i: int) -> None:
            cur.execute(sql, (i,))

        return insert, conn.close

    s = run.sizes
    run.report.lag.append(
        lag.measure(
            "mariadb",
            config,
            redis_server,
            open_writer,
            s.lag_rate,
            s.lag_seconds,
            run.work,
            run.log,
        )
    )
