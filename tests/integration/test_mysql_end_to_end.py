"""The daemon end to end on real MariaDB and Redis: rules, formats, restarts and crashes.

Each test gets its own database on the session MariaDB, a flushed Redis, and runs the real
``cache-worker`` CLI as a child process, so signals, exit codes and logs are the production ones.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.worker_process import WorkerProcess, run_cli, wait_until, write_config
from tests.services import MariaDBServer, RedisServer

USERS_DDL = """
CREATE TABLE users (
  id INT PRIMARY KEY,
  name VARCHAR(100),
  email VARCHAR(200),
  status VARCHAR(20) NOT NULL DEFAULT 'active',
  balance DECIMAL(12,2),
  seen_at DATETIME(6),
  visits INT NOT NULL DEFAULT 0
)
"""
ORDERS_DDL = "CREATE TABLE orders (id INT PRIMARY KEY, user_id INT, total DECIMAL(10,2))"


def sql(mariadb: MariaDBServer, db: str, *statements: str, args: Any = None) -> None:
    conn = mariadb.connect(db)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement, args)
    finally:
        conn.close()


def config(
    tmp_path: Path,
    mariadb: MariaDBServer,
    db: str,
    redis_server: RedisServer,
    rules: list[dict[str, Any]],
    **source: Any,
) -> Path:
    for rule in rules:
        rule["table"] = rule["table"].replace("DB.", f"{db}.")
    return write_config(
        tmp_path / "config.toml",
        name=db,
        source_dsn=mariadb.dsn(db),
        redis_url=redis_server.url(),
        rules=rules,
        source=source,
    )


@pytest.fixture
def shop(mariadb: MariaDBServer, mysql_db: str) -> str:
    sql(mariadb, mysql_db, USERS_DDL, ORDERS_DDL)
    return mysql_db


def get_json(r: redis.Redis, key: str) -> Any:
    raw = r.get(key)
    return None if raw is None else json.loads(raw)


def test_insert_update_delete_and_key_move(tmp_path, mariadb, shop, redis_server, redis_client):
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}", "user:email:{email}"],
                "columns": ["id", "name", "email", "balance", "seen_at"],
                "ttl": "1h",
            },
            {
                "name": "orders",
                "table": "DB.orders",
                "keys": ["user:{user_id}:orders"],
                "action": "evict",
            },
        ],
    )
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        sql(
            mariadb,
            shop,
            "INSERT INTO users (id, name, email, balance, seen_at) VALUES "
            "(1, 'Zoë 😀', 'z@x', 10.50, '2024-02-29 13:14:15.123456')",
        )
        expected = {
            "id": 1,
            "name": "Zoë 😀",
            "email": "z@x",
            "balance": "10.50",
            "seen_at": "2024-02-29T13:14:15.123456",
        }
        wait_until(lambda: get_json(redis_client, "user:1") == expected, what="insert refreshed")
        assert get_json(redis_client, "user:email:z@x") == expected
        ttl = redis_client.pttl("user:1")
        assert 3_600_000 * 0.89 < ttl <= 3_600_000
        assert redis_client.exists("{user:1}:cw:v")

        # A key column moves: the old email key goes, the new one appears.
        sql(mariadb, shop, "UPDATE users SET email = 'new@x', name = 'Zed' WHERE id = 1")
        wait_until(lambda: redis_client.exists("user:email:new@x"), what="new key")
        assert not redis_client.exists("user:email:z@x")
        assert get_json(redis_client, "user:1")["name"] == "Zed"

        # Evict rule: moving an order to another user evicts both users' keys.
        redis_client.set("user:7:orders", "cached")
        redis_client.set("user:8:orders", "cached")
        sql(mariadb, shop, "INSERT INTO orders VALUES (1, 7, 5.00)")
        wait_until(lambda: not redis_client.exists("user:7:orders"), what="evict on insert")
        redis_client.set("user:7:orders", "cached")
        sql(mariadb, shop, "UPDATE orders SET user_id = 8 WHERE id = 1")
        wait_until(lambda: not redis_client.exists("user:8:orders"), what="evict new owner")
        assert not redis_client.exists("user:7:orders")

        # A lease taken by a web-tier reader is dropped by the next action on the key.
        redis_client.set("{user:1}:cw:lease", "token")
        sql(mariadb, shop, "DELETE FROM users WHERE id = 1")
        wait_until(lambda: not redis_client.exists("user:1"), what="delete evicts")
        assert not redis_client.exists("user:email:new@x", "{user:1}:cw:v", "{user:1}:cw:lease")
        assert worker.stop() == 0
    assert worker.has_event("started") and worker.has_event("stopped")
    assert mariadb.password not in worker.output()  # the DSN's password never reaches a log line


def test_watch_when_and_hash_format(tmp_path, mariadb, shop, redis_server, redis_client):
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {
                "name": "active",
                "table": "DB.users",
                "keys": ["active:{id}"],
                "format": "hash",
                "columns": ["id", "name", "balance", "email"],
                "watch": ["name", "status"],
                "when": {"status": ["active", "trial"]},
                "ttl": "10m",
            },
        ],
    )
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        sql(
            mariadb,
            shop,
            "INSERT INTO users (id, name, status, balance) VALUES "
            "(1, 'a', 'active', 1.25), (2, 'b', 'banned', 0)",
        )
        wait_until(lambda: redis_client.exists("active:1"), what="hash written")
        assert redis_client.hgetall("active:1") == {"id": "1", "name": "a", "balance": "1.25"}
        assert 0 < redis_client.pttl("active:1") <= 600_000
        assert not redis_client.exists("active:2")  # filtered by when

        # An unwatched column changes: nothing is written (the marker we plant survives).
        redis_client.hset("active:1", "marker", "kept")
        sql(mariadb, shop, "UPDATE users SET visits = visits + 1 WHERE id = 1")
        sql(mariadb, shop, "UPDATE users SET status = 'trial' WHERE id = 2")  # enters the filter
        wait_until(lambda: redis_client.exists("active:2"), what="row entering when")
        assert redis_client.hget("active:1", "marker") == "kept"

        # Leaving the filter evicts.
        sql(mariadb, shop, "UPDATE users SET status = 'banned' WHERE id = 1")
        wait_until(lambda: not redis_client.exists("active:1"), what="row leaving when")
        assert worker.stop() == 0


def test_restart_applies_every_row_written_while_stopped(
    tmp_path, mariadb, shop, redis_server, redis_client
):
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}"],
                "columns": ["id", "name"],
            },
        ],
    )
    first = WorkerProcess(cfg).start()
    first.wait_streaming()
    assert first.stop() == 0

    conn = mariadb.connect(shop)
    with conn.cursor() as cur:
        for start in range(0, 10_000, 1000):
            cur.executemany(
                "INSERT INTO users (id, name) VALUES (%s, %s)",
                [(i, f"n{i}") for i in range(start, start + 1000)],
            )
    conn.close()

    result = run_cli(cfg, "run", "--until-idle", "--log-format", "json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    pipe = redis_client.pipeline()
    for i in range(10_000):
        pipe.get(f"user:{i}")
    values = pipe.execute()
    missing = [i for i, v in enumerate(values) if v is None]
    assert missing == []
    assert all(json.loads(v) == {"id": i, "name": f"n{i}"} for i, v in enumerate(values))


def test_kill_9_mid_stream_loses_nothing_and_never_goes_backwards(
    tmp_path, mariadb, shop, redis_server, redis_client
):
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}"],
                "columns": ["id", "visits"],
            },
        ],
    )
    rows = 200
    sql(
        mariadb,
        shop,
        "INSERT INTO users (id, visits) VALUES " + ",".join(f"({i}, 0)" for i in range(rows)),
    )
    rng = random.Random(7)
    conn = mariadb.connect(shop)
    worker = WorkerProcess(cfg).start()
    worker.wait_streaming()
    try:
        for _round in range(4):
            with conn.cursor() as cur:
                for _ in range(1500):
                    cur.execute(
                        "UPDATE users SET visits = visits + 1 WHERE id = %s", (rng.randrange(rows),)
                    )
            worker.kill()
            worker = WorkerProcess(cfg).start()
            worker.wait_streaming()
        with conn.cursor() as cur:
            cur.execute("SELECT id, visits FROM users")
            truth = dict(cur.fetchall())

        def caught_up() -> bool:
            pipe = redis_client.pipeline()
            for i in range(rows):
                pipe.get(f"user:{i}")
            got = pipe.execute()
            return all(
                v is not None and json.loads(v)["visits"] == truth[i] for i, v in enumerate(got)
            )

        wait_until(caught_up, timeout=60, what="every key equal to its row")
        assert worker.stop() == 0
    finally:
        conn.close()
        if not worker.exited():
            worker.kill()


def test_versions_refuse_replay_of_older_values(
    tmp_path, mariadb, shop, redis_server, redis_client
):
    """Replaying the log from an old checkpoint never moves a key back in time."""
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}"],
                "columns": ["id", "name"],
            },
        ],
    )
    assert run_cli(cfg, "run", "--until-idle").returncode == 0  # saves the start position
    checkpoint_key = f"cache-worker:checkpoint:{shop}"
    old_checkpoint = redis_client.get(checkpoint_key)
    sql(mariadb, shop, "INSERT INTO users (id, name) VALUES (1, 'v1')")
    sql(mariadb, shop, "UPDATE users SET name = 'v2' WHERE id = 1")
    assert run_cli(cfg, "run", "--until-idle").returncode == 0
    assert get_json(redis_client, "user:1") == {"id": 1, "name": "v2"}
    version = int(redis_client.get("{user:1}:cw:v"))

    # Rewind the checkpoint and stop before the UPDATE: the INSERT replays with a lower version.
    redis_client.set(checkpoint_key, old_checkpoint)
    result = run_cli(cfg, "run", "--max-transactions", "1", "--log-format", "json")
    assert result.returncode == 0, result.stdout
    assert get_json(redis_client, "user:1") == {"id": 1, "name": "v2"}
    assert int(redis_client.get("{user:1}:cw:v")) == version


def test_check_passes_on_good_setup(tmp_path, mariadb, shop, redis_server, redis_client):
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {"name": "profile", "table": "DB.users", "keys": ["user:{id}"]},
        ],
    )
    result = run_cli(cfg, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert "binlog_format" in result.stdout
    assert mariadb.password not in result.stdout + result.stderr


def test_check_and_run_name_missing_columns(tmp_path, mariadb, shop, redis_server, redis_client):
    cfg = config(
        tmp_path,
        mariadb,
        shop,
        redis_server,
        [
            {"name": "profile", "table": "DB.users", "keys": ["user:{usr_id}"]},
        ],
    )
    result = run_cli(cfg, "check")
    assert result.returncode == 7
    expected = (
        f"rules[0].keys[0]: template 'user:{{usr_id}}' names column 'usr_id', "
        f"which table {shop}.users does not have"
    )
    assert expected in result.stdout
    run = run_cli(cfg, "run", "--until-idle", "--log-format", "json")
    assert run.returncode == 3
    assert expected in run.stdout


def test_check_fails_on_missing_privileges(tmp_path, mariadb, shop, redis_server, redis_client):
    user = f"ro_{shop[-8:]}"
    mariadb.admin_sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'ro-secret-pw'")
    mariadb.admin_sql(f"GRANT SELECT ON `{shop}`.* TO '{user}'@'%'")
    try:
        cfg = write_config(
            tmp_path / "ro.toml",
            name=shop,
            source_dsn=f"mysql://{user}:ro-secret-pw@{mariadb.host}:{mariadb.port}/{shop}",
            redis_url=redis_server.url(),
            rules=[{"table": f"{shop}.users", "keys": ["user:{id}"]}],
        )
        result = run_cli(cfg, "check")
        assert result.returncode == 7
        fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
        assert any("REPLICATION SLAVE" in line for line in fails), result.stdout
        assert "ro-secret-pw" not in result.stdout + result.stderr
        run = run_cli(cfg, "run", "--until-idle", "--log-format", "json")
        assert run.returncode == 6, run.stdout
        assert "ro-secret-pw" not in run.stdout + run.stderr
    finally:
        mariadb.admin_sql(f"DROP USER '{user}'@'%'")


def test_check_fails_on_statement_binlog(tmp_path, redis_server, redis_client):
    from tests.services import start_local_mariadb

    server = start_local_mariadb(["--binlog-format=STATEMENT", "--binlog-row-image=MINIMAL"])
    try:
        server.admin_sql("CREATE DATABASE shop")
        server.admin_sql("CREATE TABLE shop.users (id INT PRIMARY KEY)")
        cfg = write_config(
            tmp_path / "stmt.toml",
            name="stmt",
            source_dsn=server.dsn("shop"),
            redis_url=redis_server.url(),
            rules=[{"table": "shop.users", "keys": ["user:{id}"]}],
        )
        result = run_cli(cfg, "check")
        assert result.returncode == 7
        fails = "\n".join(line for line in result.stdout.splitlines() if line.startswith("FAIL"))
        assert "binlog_format" in fails and "STATEMENT" in fails
        assert "binlog_row_image" in fails
        run = run_cli(cfg, "run", "--until-idle", "--log-format", "json")
        assert run.returncode == 6
    finally:
        server.close()


def test_decimal_and_types_round_trip(tmp_path, mariadb, mysql_db, redis_server, redis_client):
    sql(
        mariadb,
        mysql_db,
        "CREATE TABLE t (id INT PRIMARY KEY, d DECIMAL(30,10), j JSON, "
        "b VARBINARY(8), n VARCHAR(5), dt DATE, tm TIME)",
    )
    cfg = config(
        tmp_path,
        mariadb,
        mysql_db,
        redis_server,
        [
            {"name": "t", "table": "DB.t", "keys": ["t:{id}"]},
        ],
    )
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        sql(
            mariadb,
            mysql_db,
            "INSERT INTO t VALUES (1, '12345678901234567890.0123456789', "
            "'{\"a\": [1, 2.5, null, \"x\"]}', x'00ff', NULL, '2024-01-02', '-12:34:56')",
        )
        value = wait_until(lambda: get_json(redis_client, "t:1"), what="typed row")
        assert value == {
            "id": 1,
            "d": "12345678901234567890.0123456789",
            "j": {"a": [1, 2.5, None, "x"]},
            "b": "AP8=",
            "n": None,
            "dt": "2024-01-02",
            "tm": "-12:34:56",
        }
        assert Decimal(value["d"]) == Decimal("12345678901234567890.0123456789")
        assert worker.stop() == 0
