"""Proves the server fixtures of tests/services.py give real, correctly configured servers.

Each test talks to the server over the network the way the worker will: Redis answers SET/GET
and survives a restart on the same port, MariaDB has the binlog settings the binlog source needs
and enforces the root password, Postgres has ``wal_level=logical``, and a second, deliberately
misconfigured MariaDB can be started and is cleaned up.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pymysql
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.services import MariaDBServer, PostgresServer, RedisServer, start_local_mariadb


def _require_local(server: MariaDBServer | RedisServer | PostgresServer) -> None:
    if not server.is_local:
        pytest.skip(f"{server.backend} server: only locally started servers can be restarted")


def _variables(server: MariaDBServer, pattern: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in server.admin_sql(f"SHOW VARIABLES LIKE '{pattern}'")}


def test_tests_here_are_marked_integration(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is not None


# --- Redis ------------------------------------------------------------------------------------


def test_redis_set_get(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set("user:1", '{"id": 1}')
    assert redis_client.get("user:1") == '{"id": 1}'


def test_redis_url_reaches_the_same_server(redis_server: RedisServer) -> None:
    via_url = redis.Redis.from_url(redis_server.url(3), decode_responses=True)
    try:
        via_url.set("probe", "x")
        assert redis_server.client(db=3, decode_responses=True).get("probe") == "x"
        assert redis_server.client(db=0).get("probe") is None
    finally:
        via_url.flushdb()
        via_url.close()


def test_redis_restart_keeps_port_and_answers(redis_server: RedisServer) -> None:
    _require_local(redis_server)
    port = redis_server.port
    try:
        redis_server.stop()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            redis_server.client(socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
        redis_server.start()
        assert redis_server.port == port
        assert redis_server.client().ping()

        redis_server.kill()
        assert not redis_server.running
        redis_server.start()
        assert redis_server.client().ping()
    finally:
        redis_server.start()


# --- MariaDB ----------------------------------------------------------------------------------


def test_mariadb_has_row_binlog_with_full_images(mariadb: MariaDBServer) -> None:
    variables = _variables(mariadb, "%binlog%") | _variables(mariadb, "log_bin")
    assert variables["binlog_format"] == "ROW"
    assert variables["log_bin"] == "ON"
    assert variables["binlog_row_image"] == "FULL"
    assert variables["binlog_row_metadata"] == "FULL"
    assert _variables(mariadb, "server_id")["server_id"] == "1"


def test_mariadb_enforces_the_root_password(mariadb: MariaDBServer) -> None:
    with pytest.raises(pymysql.err.OperationalError) as caught:
        pymysql.connect(
            host=mariadb.host, port=mariadb.port, user=mariadb.user, password="wrong"
        ).close()
    assert caught.value.args[0] == 1045


def test_mariadb_dsn_names_the_server(mariadb: MariaDBServer, mysql_db: str) -> None:
    dsn = mariadb.dsn(mysql_db)
    assert (
        dsn == f"mysql://{mariadb.user}:{mariadb.password}@{mariadb.host}:{mariadb.port}/{mysql_db}"
    )


def test_mysql_db_is_a_fresh_database(mariadb: MariaDBServer, mysql_db: str) -> None:
    conn = mariadb.connect(mysql_db)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW TABLES")
            assert cur.fetchall() == ()
            cur.execute("CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(100))")
            cur.execute("INSERT INTO users VALUES (1, 'ada')")
            cur.execute("SELECT name FROM users WHERE id = 1")
            assert cur.fetchone() == ("ada",)
    finally:
        conn.close()


def test_mariadb_restart_keeps_data_and_binlog(mariadb: MariaDBServer, mysql_db: str) -> None:
    _require_local(mariadb)
    mariadb.admin_sql(f"CREATE TABLE `{mysql_db}`.t (id INT PRIMARY KEY)")
    mariadb.admin_sql(f"INSERT INTO `{mysql_db}`.t VALUES (7)")
    before = mariadb.admin_sql("SHOW MASTER STATUS")[0][0]
    try:
        mariadb.restart()
        assert mariadb.admin_sql(f"SELECT id FROM `{mysql_db}`.t") == [(7,)]
        after = mariadb.admin_sql("SHOW MASTER STATUS")[0][0]
        # A restart rotates the binlog; the old file must still be listed (not purged).
        assert after != before
        logs = [row[0] for row in mariadb.admin_sql("SHOW BINARY LOGS")]
        assert before in logs
        assert after in logs
        assert _variables(mariadb, "binlog_format")["binlog_format"] == "ROW"
    finally:
        mariadb.start()


def test_second_misconfigured_mariadb_starts_and_is_cleaned_up() -> None:
    began = time.monotonic()
    server = start_local_mariadb(["--binlog-format=STATEMENT", "--binlog-row-image=MINIMAL"])
    started_in = time.monotonic() - began
    try:
        assert server.is_local
        assert _variables(server, "binlog_format")["binlog_format"] == "STATEMENT"
        assert _variables(server, "binlog_row_image")["binlog_row_image"] == "MINIMAL"
        assert server.datadir is not None
        assert started_in < 30
    finally:
        server.close()
    assert not server.running
    assert server.datadir is not None
    assert not Path(server.datadir).exists()
    with pytest.raises(pymysql.err.OperationalError):
        server.connect(connect_timeout=1)


# --- Postgres ---------------------------------------------------------------------------------


def test_postgres_has_logical_wal(postgres: PostgresServer) -> None:
    with postgres.connect() as conn:
        row = conn.execute("SHOW wal_level").fetchone()
        assert row == ("logical",)
        assert conn.execute("SELECT current_user").fetchone() == (postgres.user,)


def test_postgres_dsn_carries_user_and_password(postgres: PostgresServer) -> None:
    assert postgres.dsn().startswith(f"postgresql://{postgres.user}:")
    with psycopg.connect(postgres.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if postgres.is_local:
        # Local servers use password auth over TCP, so a wrong password must be refused.
        wrong = postgres.dsn().replace(f":{postgres.password}@", ":wrong@")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(wrong, connect_timeout=5).close()


def test_postgres_restart(postgres: PostgresServer) -> None:
    _require_local(postgres)
    with postgres.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS restart_probe (id int)")
        conn.execute("INSERT INTO restart_probe VALUES (1)")
    try:
        postgres.restart()
        with postgres.connect() as conn:
            assert conn.execute("SELECT count(*) FROM restart_probe").fetchone() == (1,)
            conn.execute("DROP TABLE restart_probe")
    finally:
        postgres.start()


def test_local_postgres_runs_unprivileged(postgres: PostgresServer) -> None:
    # Postgres refuses root; the helper must have dropped to the postgres user to get here.
    _require_local(postgres)
    with postgres.connect() as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    owner = Path(row[0]).stat().st_uid
    if os.geteuid() == 0:
        assert owner != 0
    else:
        assert owner == os.geteuid()
