"""Faults on every source: the database restarts under load, the log position is lost.

The worker must reconnect with backoff and lose nothing across a database restart, and must stop
with exit code 5 and a recovery hint when its position is gone (binlog purged, slot dropped).
Loopback servers only; every wait is bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.integration.harness import SOURCES, SourceHarness
from tests.integration.worker_process import WorkerProcess, run_cli, wait_until
from tests.services import MariaDBServer, PostgresServer, RedisServer, start_local_mariadb


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceHarness]:
    kind = request.param
    server = request.getfixturevalue("mariadb" if kind == "mysql" else "postgres")
    if not server.is_local:
        pytest.fail("fault tests restart the database: they need a locally started server")
    server.start()
    harness = SourceHarness(kind, server, tmp_path).create()
    try:
        yield harness
    finally:
        server.start()
        harness.drop()


def _rule() -> list[dict[str, object]]:
    return [{"name": "items", "table": "DB.items", "keys": ["item:{id}"]}]


def test_database_restart_under_load_loses_nothing(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    source.create_table("items", "id INT PRIMARY KEY, v INT NOT NULL")
    cfg = source.config(redis_server.url(), _rule())
    worker = WorkerProcess(cfg).start()
    try:
        worker.wait_streaming()
        for start in range(0, 3000, 500):
            source.executemany(
                "INSERT INTO items (id, v) VALUES (%s, %s)",
                [(i, i) for i in range(start, start + 500)],
            )
        # The worker is still working through that backlog when the database goes away.
        source.server.restart()
        source.executemany(
            "INSERT INTO items (id, v) VALUES (%s, %s)", [(i, i) for i in range(3000, 3500)]
        )
        source.sql("UPDATE items SET v = v + 1 WHERE id < 100")

        def all_applied() -> bool:
            pipe = redis_client.pipeline()
            for i in range(3500):
                pipe.get(f"item:{i}")
            values = pipe.execute()
            return all(
                v is not None and json.loads(v)["v"] == (i + 1 if i < 100 else i)
                for i, v in enumerate(values)
            )

        wait_until(all_applied, timeout=120, interval=0.5, what="every row after the restart")
        assert not worker.exited(), worker.output()
        assert worker.has_event("source_reconnect") or worker.has_event("retrying")
        assert worker.stop() == 0
    finally:
        if not worker.exited():
            worker.kill()


def _purge_binlogs(server: MariaDBServer) -> None:
    server.admin_sql("FLUSH BINARY LOGS")
    current = str(server.admin_sql("SHOW MASTER STATUS")[0][0])
    deadline = time.monotonic() + 20
    while True:
        # MariaDB keeps a binlog until InnoDB made its commits durable; with lazy flushing that
        # happens in the background, so ask again until the old files are really gone.
        server.admin_sql("FLUSH ENGINE LOGS")
        server.admin_sql(f"PURGE BINARY LOGS TO '{current}'")
        if str(server.admin_sql("SHOW BINARY LOGS")[0][0]) == current:
            return
        assert time.monotonic() < deadline, "the server did not purge its old binlogs"
        time.sleep(0.2)


def test_purged_binlog_exits_position_lost(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # A server of its own: purging the session server's binlogs would pull the floor from
    # under other tests' checkpoints.
    server = start_local_mariadb()
    try:
        harness = SourceHarness("mysql", server, tmp_path).create()
        harness.create_table("items", "id INT PRIMARY KEY, v INT NOT NULL")
        cfg = harness.config(redis_server.url(), _rule(), resume="file")
        assert run_cli(cfg, "run", "--until-idle").returncode == 0  # checkpoint saved
        harness.sql("INSERT INTO items VALUES (1, 1)")
        _purge_binlogs(server)
        result = run_cli(cfg, "run", "--until-idle", "--log-format", "json")
        assert result.returncode == 5, result.stdout + result.stderr
        fatal = [json.loads(line) for line in result.stdout.splitlines() if '"fatal"' in line]
        assert fatal and "reset-checkpoint" in fatal[0]["error"]
        check = run_cli(cfg, "check")
        assert check.returncode == 7
        assert any(
            line.startswith("FAIL") and "binlog" in line for line in check.stdout.splitlines()
        ), check.stdout

        # The documented recovery: forget the checkpoint, start again.
        assert run_cli(cfg, "reset-checkpoint", "--yes").returncode == 0
        assert run_cli(cfg, "run", "--until-idle").returncode == 0
    finally:
        server.close()


def test_dropped_slot_exits_position_lost(
    postgres: PostgresServer,
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    harness = SourceHarness("postgres-logical", postgres, tmp_path).create()
    try:
        harness.create_table("items", "id INT PRIMARY KEY, v INT NOT NULL")
        cfg = harness.config(redis_server.url(), _rule())
        assert run_cli(cfg, "run", "--until-idle").returncode == 0
        with postgres.connect(harness.db) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s",
                (harness.db,),
            )
        harness.sql("INSERT INTO items VALUES (1, 1)")
        result = run_cli(cfg, "run", "--until-idle", "--log-format", "json")
        assert result.returncode == 5, result.stdout + result.stderr
        fatal = [json.loads(line) for line in result.stdout.splitlines() if '"fatal"' in line]
        assert fatal and "setup" in fatal[0]["error"]
    finally:
        harness.drop()
