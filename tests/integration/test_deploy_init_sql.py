"""Runs deploy/init.sql on a real MariaDB and streams the binlog as the account it creates.

This is what docker-compose does at first start, minus Docker: if the SQL is invalid, or the
``cache_worker`` grants are too narrow to read the binlog with column names, this fails here
rather than in someone's ``docker compose up``. A throwaway server keeps the ``shop`` database
and the user away from the session MariaDB.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import WriteRowsEvent

from tests.services import MariaDBServer, start_local_mariadb

INIT_SQL = Path(__file__).resolve().parents[2] / "deploy" / "init.sql"


def _statements(sql: str) -> list[str]:
    without_comments = re.sub(r"^\s*--.*$", "", sql, flags=re.MULTILINE)
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def _password(sql: str) -> str:
    found = re.search(r"'cache_worker'@'%' IDENTIFIED BY '([^']*)'", sql)
    assert found
    return found.group(1)


@pytest.fixture(scope="module")
def initialised() -> Iterator[MariaDBServer]:
    server = start_local_mariadb()
    try:
        conn = server.connect()
        try:
            with conn.cursor() as cur:
                for statement in _statements(INIT_SQL.read_text()):
                    cur.execute(statement)
        finally:
            conn.close()
        yield server
    finally:
        server.close()


def _as_worker(server: MariaDBServer) -> pymysql.Connection[pymysql.cursors.Cursor]:
    password = _password(INIT_SQL.read_text())
    return pymysql.connect(
        host=server.host, port=server.port, user="cache_worker", password=password, database="shop"
    )


def test_worker_account_reads_shop_and_binlog_position(initialised: MariaDBServer) -> None:
    conn = _as_worker(initialised)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, name, email, status FROM users ORDER BY id")
            assert [row[1] for row in cur.fetchall()] == ["Ada Lovelace", "Grace Hopper"]
            cur.execute("SHOW MASTER STATUS")
            assert cur.fetchone() is not None
            with pytest.raises(pymysql.err.OperationalError):
                cur.execute("SELECT 1 FROM mysql.user LIMIT 1")
    finally:
        conn.close()


def test_worker_account_streams_row_events_with_column_names(initialised: MariaDBServer) -> None:
    stream = BinLogStreamReader(
        connection_settings={
            "host": initialised.host,
            "port": initialised.port,
            "user": "cache_worker",
            "password": _password(INIT_SQL.read_text()),
        },
        server_id=4242,
        blocking=False,
        only_events=[WriteRowsEvent],
        only_schemas=["shop"],
    )
    try:
        rows = [(event.table, row["values"]) for event in stream for row in event.rows]
    finally:
        stream.close()
    assert rows == [
        (
            "users",
            {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "status": "active"},
        ),
        (
            "users",
            {"id": 2, "name": "Grace Hopper", "email": "grace@example.com", "status": "active"},
        ),
    ]
