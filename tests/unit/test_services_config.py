"""Unit checks of tests/services.py's parts that this machine cannot exercise for real.

The env-var backend (a server named by ``CACHE_WORKER_TEST_*``) and the DSN/URL builders are
plain parsing; they are checked here so a CI that sets those variables does not find the bugs.
"""

from __future__ import annotations

import pytest

from tests.services import (
    MariaDBServer,
    PostgresServer,
    RedisServer,
    ServiceError,
    mariadb_from_dsn,
    postgres_from_dsn,
    redis_from_url,
)


def test_mariadb_from_dsn_round_trips() -> None:
    server = mariadb_from_dsn("mysql://admin:p%40ss@db.example:3307/")
    assert (server.host, server.port, server.user, server.password) == (
        "db.example",
        3307,
        "admin",
        "p@ss",
    )
    assert server.dsn("shop") == "mysql://admin:p%40ss@db.example:3307/shop"
    assert server.backend == "external"
    assert not server.is_local


def test_mariadb_from_dsn_defaults() -> None:
    server = mariadb_from_dsn("mysql://127.0.0.1/")
    assert (server.port, server.user, server.password) == (3306, "root", "")
    assert server.dsn() == "mysql://root@127.0.0.1:3306/"


def test_redis_from_url() -> None:
    server = redis_from_url("redis://:s3cret@cache:6380/4")
    assert (server.host, server.port, server.password) == ("cache", 6380, "s3cret")
    assert server.url() == "redis://:s3cret@cache:6380/0"
    assert server.url(2) == "redis://:s3cret@cache:6380/2"
    assert RedisServer("127.0.0.1", 6379).url(1) == "redis://127.0.0.1:6379/1"


def test_postgres_from_dsn() -> None:
    server = postgres_from_dsn("postgresql://pg:pw@10.0.0.5:5433/app")
    assert (server.host, server.port, server.user, server.password, server.dbname) == (
        "10.0.0.5",
        5433,
        "pg",
        "pw",
        "app",
    )
    assert server.dsn() == "postgresql://pg:pw@10.0.0.5:5433/app"
    assert server.dsn("other") == "postgresql://pg:pw@10.0.0.5:5433/other"
    assert postgres_from_dsn("postgres://h/").dbname == "postgres"


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (mariadb_from_dsn, "postgresql://h/db"),
        (mariadb_from_dsn, "mysql:///nohost"),
        (redis_from_url, "http://h:6379"),
        (postgres_from_dsn, "mysql://h/"),
    ],
)
def test_bad_addresses_are_refused(parse: object, text: str) -> None:
    assert callable(parse)
    with pytest.raises(ServiceError):
        parse(text)


def test_external_servers_cannot_be_stopped() -> None:
    for server in (
        MariaDBServer("h", 1, "u", "p"),
        RedisServer("h", 1),
        PostgresServer("h", 1, "u", "p", "d"),
    ):
        with pytest.raises(ServiceError, match="external server"):
            server.stop()
        server.close()  # nothing to close: must not raise


def test_handles_are_frozen_and_hide_their_control() -> None:
    server = RedisServer("h", 1)
    with pytest.raises(AttributeError):
        server.port = 2  # type: ignore[misc]
    assert "_control" not in repr(server)
