"""Command line of the benchmark: ``python -m bench [--quick] [--seed N] [--only PARTS]``.

Starts Redis, MariaDB and Postgres from the Debian binaries (never a shared server: the benchmark
writes and flushes freely), runs every part in turn, prints the Markdown report and writes it as
JSON under ``bench/results/``. A part that fails is reported (and makes the exit code 1) without
stopping the others; unmet targets never fail the run. Every server it started is stopped in a
``finally``, so errors and Ctrl-C leave nothing running.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench import lag, memory, pgbench, targets
from bench import mysql_contenders as mysql
from bench import postgres_contenders as postgres
from bench.report import Report, Result, Section, markdown, write_json
from bench.rules import lag_rule
from bench.sizes import FULL, QUICK, Sizes
from bench.worker_run import write_config
from bench.workload import (
    CHANGES_PER_TRANSACTION,
    bulk_statements,
    generate_transactions,
)
from tests import services
from tests.services import MariaDBServer, PostgresServer, RedisServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("mariadb", "memory", "logical", "notify", "lag", "pgbench")


class Run:
    """One benchmark run: its sizes, report, scratch directory and progress log."""

    def __init__(self, sizes: Sizes, seed: int, parts: set[str], work: Path) -> None:
        self.sizes = sizes
        self.seed = seed
        self.parts = parts
        self.work = work
        self.report = Report()
        self.began = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.1f}s] {message}", file=sys.stderr, flush=True)

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one part; a failure is reported and the run goes on with the next part."""
        self.log(name)
        try:
            fn()
        except Exception as exc:
            text = str(exc).strip().splitlines()
            detail = " / ".join(text[:1] + text[-3:]) if len(text) > 1 else "".join(text)
            self.report.errors.append(f"{name}: {type(exc).__name__}: {detail}")
            self.log(f"{name} FAILED: {type(exc).__name__}: {exc}")

    def section(self, source: str, workload: str, title: str) -> list[Result]:
        """A new section in the report; its results list fills as contenders finish."""
        section = Section(source, workload, title)
        self.report.sections.append(section)
        return section.results

    # -- titles ----------------------------------------------------------------------------

    def small_title(self, source: str) -> str:
        s = self.sizes
        return (
            f"{source}: small transactions ({s.small_changes:,} row changes in "
            f"{s.small_changes // CHANGES_PER_TRANSACTION:,} transactions of 2 UPDATE + DELETE "
            f"+ INSERT, {s.table_rows:,}-row table)"
        )

    def bulk_title(self, source: str) -> str:
        rows = self.sizes.table_rows
        return (
            f"{source}: bulk statements ({self.sizes.bulk_changes:,} row changes: one "
            f"{rows:,}-row UPDATE, one {rows:,}-row INSERT ... SELECT)"
        )

    # -- MariaDB ---------------------------------------------------------------------------

    def mariadb(self, redis_server: RedisServer) -> None:
        s = self.sizes
        self.log("starting MariaDB ...")
        server = services.start_local_mariadb()
        try:
            self.step("mariadb: load", lambda: mysql.prepare(server, s.table_rows, self.seed))
            if "mariadb" in self.parts:
                self.step(
                    "mariadb: small transactions", lambda: self._mariadb_small(server, redis_server)
                )
                self.step(
                    "mariadb: bulk statements", lambda: self._mariadb_bulk(server, redis_server)
                )
            if "memory" in self.parts:
                self.step("mariadb: memory", lambda: self._memory(server, redis_server))
            if "lag" in self.parts:
                self.step("mariadb: lag", lambda: self._mariadb_lag(server, redis_server))
        finally:
            # Stopped before Postgres starts: two idle database servers on two cores still
            # cost the later parts some CPU.
            server.close()

    def _mariadb_small(self, server: MariaDBServer, redis_server: RedisServer) -> None:
        s = self.sizes
        into = self.section("mariadb", "small", self.small_title("MariaDB"))
        txs = generate_transactions(s.table_rows, s.small_changes, self.seed)
        rng = mysql.write_range(server, mysql.small_writer(txs))
        self.log(f"  binlog {rng}")
        mysql.run_contenders(
            server,
            redis_server,
            self.work,
            rng,
            s.small_changes,
            s.naive_rows,
            s.worker_timeout_s,
            self.log,
            into,
        )

    def _mariadb_bulk(self, server: MariaDBServer, redis_server: RedisServer) -> None:
        s = self.sizes
        into = self.section("mariadb", "bulk", self.bulk_title("MariaDB"))
        statements = bulk_statements(s.table_rows, mysql.TABLE)
        rng = mysql.write_range(server, mysql.statements_writer(statements))
        self.log(f"  binlog {rng}")
        mysql.run_contenders(
            server,
            redis_server,
            self.work,
            rng,
            s.bulk_changes,
            s.naive_rows,
            s.worker_timeout_s,
            self.log,
            into,
        )

    def _memory(self, server: MariaDBServer, redis_server: RedisServer) -> None:
        s = self.sizes
        result = memory.measure(
            server,
            redis_server,
            self.work,
            s.table_rows,
            s.backlog_changes,
            s.worker_timeout_s,
            self.log,
        )
        self.report.memory.append(result)

    def _mariadb_lag(self, server: MariaDBServer, redis_server: RedisServer) -> None:
        config = write_config(
            self.work,
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

        self._lag("mariadb", config, redis_server, open_writer)

    def _lag(
        self,
        source: str,
        config: Path,
        redis_server: RedisServer,
        open_writer: Callable[[], lag.Writer],
        notes: str = "",
    ) -> None:
        s = self.sizes
        result = lag.measure(
            source,
            config,
            redis_server,
            open_writer,
            s.lag_rate,
            s.lag_seconds,
            self.work,
            self.log,
            notes,
        )
        self.report.lag.append(result)

    # -- Postgres --------------------------------------------------------------------------

    def postgres(self, redis_server: RedisServer) -> None:
        self.log("starting Postgres ...")
        server = services.start_local_postgres()
        try:
            postgres.configure(server)
            if "logical" in self.parts or "lag" in self.parts:
                self._postgres_source("postgres-logical", server, redis_server)
            if "notify" in self.parts or "lag" in self.parts:
                self._postgres_source("postgres-notify", server, redis_server)
            if "pgbench" in self.parts:
                s = self.sizes
                self.step(
                    "postgres: pgbench",
                    lambda: pgbench.run(
                        server,
                        redis_server,
                        self.work,
                        s.pgbench_seconds,
                        s.pgbench_clients,
                        s.worker_timeout_s,
                        self.report,
                        self.log,
                    ),
                )
        finally:
            server.close()

    def _postgres_source(
        self, source: str, server: PostgresServer, redis_server: RedisServer
    ) -> None:
        s = self.sizes
        logical = source == "postgres-logical"
        part = "logical" if logical else "notify"
        schema = f"bench_{part}"
        tables: list[tuple[str, str]] = []
        self.step(
            f"{source}: load",
            lambda: tables.append(postgres.prepare(server, schema, s.table_rows, self.seed)),
        )
        if not tables:
            return
        table, lag_table = tables[0]
        kind = postgres.LogicalBench if logical else postgres.NotifyBench
        bench = kind(
            server, redis_server, self.work, table, lag_table, s.worker_timeout_s, self.log
        )
        try:
            self.step(f"{source}: setup", bench.setup)
            if part in self.parts:

                def small() -> None:
                    into = self.section(source, "small", self.small_title(source))
                    txs = generate_transactions(s.table_rows, s.small_changes, self.seed)
                    bench.run(
                        postgres.small_writer(txs, table), s.small_changes, s.naive_rows, into
                    )

                def bulk() -> None:
                    into = self.section(source, "bulk", self.bulk_title(source))
                    writer = postgres.statements_writer(bulk_statements(s.table_rows, table))
                    bench.run(writer, s.bulk_changes, s.naive_rows, into)

                self.step(f"{source}: small transactions", small)
                self.step(f"{source}: bulk statements", bulk)
            if "lag" in self.parts:

                def open_writer() -> lag.Writer:
                    conn = server.connect()  # autocommit: each INSERT is one transaction
                    sql = f"INSERT INTO {lag_table} (id, committed_at) VALUES (%s, now())"

                    def insert(i: int) -> None:
                        conn.execute(sql, (i,))

                    return insert, conn.close

                notes = f"poll_interval {postgres.LogicalBench.poll_interval}" if logical else ""
                self.step(
                    f"{source}: lag",
                    lambda: self._lag(source, bench.lag_config, redis_server, open_writer, notes),
                )
        finally:
            self.step(f"{source}: teardown", bench.teardown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all): {', '.join(PARTS)}",
    )
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    try:
        with tempfile.TemporaryDirectory(prefix="cache-worker-bench-") as tmp:
            return _run(Run(sizes, args.seed, parts, Path(tmp)))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        services.close_all()


def _run(run: Run) -> int:
    run.log(f"{run.sizes.mode} run; starting Redis ...")
    redis_server = services.start_local_redis()
    if run.parts & {"mariadb", "memory", "lag"}:
        run.mariadb(redis_server)
    if run.parts & {"logical", "notify", "lag", "pgbench"}:
        run.postgres(redis_server)
    report = run.report
    report.targets = targets.evaluate(report)
    total = time.perf_counter() - run.began
    text = markdown(report)
    print(text)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.json"
    write_json(
        path,
        report,
        {
            "timestamp": stamp,
            "mode": run.sizes.mode,
            "seed": run.seed,
            "parts": sorted(run.parts),
            "sizes": asdict(run.sizes),
            "total_seconds": round(total, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
        },
    )
    print(f"\n{run.sizes.mode} run took {total:.0f}s; written {path}", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
