"""The Postgres parts of a run, in order: postgres-logical, postgres-notify, pgbench.

Each source gets its own schema (items and lag tables) and is set up once (``cache-worker
setup``: the workers' slots, or their outboxes and triggers) for its throughput workloads and
its lag test, then torn down, so nothing of one source (a slot retaining WAL, triggers adding
outbox writes) slows the next part. pgbench runs last, in a database of its own.
"""

from __future__ import annotations

from bench import lag, pgbench
from bench import postgres_common as postgres
from bench.logical_contenders import LogicalBench
from bench.notify_contenders import NotifyBench
from bench.run import Run
from bench.workload import bulk_statements, generate_transactions
from tests import services
from tests.services import PostgresServer, RedisServer


def run_postgres(run: Run, redis_server: RedisServer) -> None:
    """Every Postgres part the run asks for."""
    run.log("starting Postgres ...")
    server = services.start_local_postgres()
    try:
        postgres.configure(server)
        if run.parts & {"logical", "lag"}:
            _source(run, "postgres-logical", server, redis_server)
        if run.parts & {"notify", "lag"}:
            _source(run, "postgres-notify", server, redis_server)
        if "pgbench" in run.parts:
            s = run.sizes
            run.step(
                "postgres: pgbench",
                lambda: pgbench.run(
                    server,
                    redis_server,
                    run.work,
                    s.pgbench_seconds,
                    s.pgbench_rounds,
                    s.pgbench_clients,
                    s.worker_timeout_s,
                    run.report,
                    run.log,
                ),
            )
    finally:
        server.close()


def _source(run: Run, source: str, server: PostgresServer, redis_server: RedisServer) -> None:
    s = run.sizes
    logical = source == "postgres-logical"
    part = "logical" if logical else "notify"
    tables: list[tuple[str, str]] = []
    run.step(
        f"{source}: load",
        lambda: tables.append(postgres.prepare(server, f"bench_{part}", s.table_rows, run.seed)),
    )
    if not tables:
        return
    table, lag_table = tables[0]
    kind = LogicalBench if logical else NotifyBench
    bench = kind(server, redis_server, run.work, table, lag_table, s.worker_timeout_s, run.log)
    try:
        run.step(f"{source}: setup", bench.setup)
        if part in run.parts:

            def small() -> None:
                into = run.section(source, "small", run.small_title(source))
                txs = generate_transactions(s.table_rows, s.small_changes, run.seed)
                writer = postgres.small_writer(txs, table)
                bench.run(writer, s.small_changes, s.naive_rows, into)

            def bulk() -> None:
                into = run.section(source, "bulk", run.bulk_title(source))
                writer = postgres.statements_writer(bulk_statements(s.table_rows, table))
                bench.run(writer, s.bulk_changes, s.naive_rows, into)

            run.step(f"{source}: small transactions", small)
            run.step(f"{source}: bulk statements", bulk)
        if "lag" in run.parts:
            run.step(f"{source}: lag", lambda: _lag(run, source, bench, server, lag_table))
    finally:
        run.step(f"{source}: teardown", bench.teardown)


def _lag(
    run: Run,
    source: str,
    bench: LogicalBench | NotifyBench,
    server: PostgresServer,
    lag_table: str,
) -> None:
    def open_writer() -> lag.Writer:
        conn = server.connect()  # autocommit: each INSERT is one transaction
        sql = f"INSERT INTO {lag_table} (id, committed_at) VALUES (%s, now())"

        def insert(i: int) -> None:
            conn.execute(sql, (i,))

        return insert, conn.close

    notes = ""
    if isinstance(bench, LogicalBench):
        notes = f"poll_interval {bench.poll_interval}"
    s = run.sizes
    run.report.lag.append(
        lag.measure(
            source,
            bench.lag_config,
            bench.redis_server,
            open_writer,
            s.lag_rate,
            s.lag_seconds,
            run.work,
            run.log,
            notes,
        )
    )
