"""The memory test: peak RSS of one worker draining a large MariaDB backlog.

The backlog is a few UPDATEs of every seed row (cheap to write: 10 statements of 100k rows make
the full run's 1M row changes), each one large transaction the worker must apply in chunks.
The worker is ``cache-worker run --until-idle`` with the json refresh rule and a checkpoint
preset to the backlog's start; its peak RSS is its own ``ru_maxrss`` as ``os.wait4`` reports it
(see ``bench.worker_run``), so nothing samples it and no peak is missed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench import mysql_contenders as mysql
from bench.report import MemoryResult
from bench.rules import refresh_rule
from bench.worker_run import run_until_idle, write_config
from bench.workload import backlog_statements
from connectors.mysql import make_position
from tests.services import MariaDBServer, RedisServer

FULL_BACKLOG = 1_000_000


def measure(
    mariadb: MariaDBServer,
    redis_server: RedisServer,
    work: Path,
    table_rows: int,
    backlog_changes: int,
    timeout: float,
    log: Callable[[str], None],
) -> MemoryResult:
    """Write the backlog, drain it with one worker, report that worker's peak RSS."""
    statements = backlog_statements(table_rows, backlog_changes, mysql.TABLE)
    log(f"  writing {len(statements)} UPDATEs of {table_rows:,} rows ...")
    rng = mysql.write_range(mariadb, mysql.statements_writer(statements))
    rows = len(statements) * table_rows
    client = redis_server.client()
    try:
        client.flushdb()
    finally:
        client.close()
    config = write_config(
        work,
        "mariadb_memory",
        mysql.source_settings(mariadb),
        redis_server.url(),
        [refresh_rule(mysql.TABLE)],
        checkpoint=make_position(rng.start_file, rng.start_pos, None),
    )
    log("  cache-worker json refresh rule ...")
    result = run_until_idle(
        "cache-worker json refresh rule",
        "refresh",
        config,
        work / "mariadb_memory.log",
        timeout,
        rows,
    )
    notes = f"{len(statements)} UPDATEs of {table_rows:,} rows; json refresh rule"
    if rows < FULL_BACKLOG:
        notes += f"; smaller than the target's {FULL_BACKLOG:,}-row backlog"
    if result.notes:
        notes += f"; {result.notes}"
    return MemoryResult("mariadb", rows, result.rows, result.seconds, result.peak_rss_mb, notes)
