"""Session fixtures for real MariaDB, Redis and Postgres servers, and per-test scratch state.

The servers come from ``tests/services.py`` (env-named server, testcontainers, or local Debian
binaries) and start lazily: a test run that uses only Redis never starts MariaDB. Each session
server is closed when the session ends; per-test fixtures give every test a flushed Redis and its
own MariaDB database so tests do not see each other's data.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pymysql
import pytest
import redis

from tests.services import (
    STARTUP_SECONDS,
    MariaDBServer,
    PostgresServer,
    RedisServer,
    provide_mariadb,
    provide_postgres,
    provide_redis,
)

_S = TypeVar("_S", MariaDBServer, RedisServer, PostgresServer)


def _timed(kind: str, provide: Callable[[], _S]) -> _S:
    began = time.monotonic()
    server = provide()
    STARTUP_SECONDS[kind] = (server.backend, time.monotonic() - began)
    return server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """A MariaDB with ROW binlog for the whole session; admin user in ``user``/``password``."""
    server = _timed("mariadb", provide_mariadb)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis server for the whole session."""
    server = _timed("redis", provide_redis)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A Postgres with ``wal_level=logical`` for the whole session; superuser in ``user``."""
    server = _timed("postgres", provide_postgres)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The session Redis, emptied with FLUSHALL, as a ``decode_responses=True`` client."""
    # A previous test may have stopped or killed the local server and failed before restarting.
    if redis_server.is_local:
        redis_server.start()
    client = redis_server.client(decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def mysql_db(mariadb: MariaDBServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, uniquely named database on the session MariaDB, dropped after the test."""
    if mariadb.is_local:
        mariadb.start()
    # The test name makes leftovers traceable; the suffix keeps parametrized runs apart.
    stem = re.sub(r"[^0-9a-zA-Z]+", "_", request.node.name).strip("_").lower()[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    mariadb.admin_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        if mariadb.is_local:
            mariadb.start()
        mariadb.admin_sql(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def mysql_conn(mariadb: MariaDBServer, mysql_db: str) -> Iterator[pymysql.Connection[Any]]:
    """An admin connection to ``mysql_db`` (autocommit, as the server's admin_sql uses)."""
    connection = mariadb.connect(mysql_db)
    try:
        yield connection
    finally:
        connection.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not STARTUP_SECONDS:
        return
    terminalreporter.section("test servers")
    for kind, (backend, seconds) in sorted(STARTUP_SECONDS.items()):
        terminalreporter.write_line(f"{kind}: {backend}, ready in {seconds:.2f}s")
