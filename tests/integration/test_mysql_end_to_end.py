"""MySQL-specific end-to-end behaviour: version refusals on replay, ``check`` and preflight.

The rule behaviour shared by every source is in ``test_behaviour.py``. Each test here gets its
own database on the session MariaDB and a flushed Redis, and runs the real ``cache-worker`` CLI
as a child process, so exit codes and output are the production ones.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from tests.integration.redis_reads import get_json
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


def test_versions_refuse_replay_of_older_values(
    tmp_path: Path,
    mariadb: MariaDBServer,
    shop: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
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
    assert isinstance(old_checkpoint, str), "the first run saved no checkpoint"
    sql(mariadb, shop, "INSERT INTO users (id, name) VALUES (1, 'v1')")
    sql(mariadb, shop, "UPDATE users SET name = 'v2' WHERE id = 1")
    assert run_cli(cfg, "run", "--until-idle").returncode == 0
    assert get_json(redis_client, "user:1") == {"id": 1, "name": "v2"}
    # redis_client decodes responses (str), and the run above set this key.
    version = int(cast(str, redis_client.get("{user:1}:cw:v")))

    # Rewind the checkpoint and stop before the UPDATE: the INSERT replays with a lower version.
    redis_client.set(checkpoint_key, old_checkpoint)
    result = run_cli(cfg, "run", "--max-transactions", "1", "--log-format", "json")
    assert result.returncode == 0, result.stdout
    assert get_json(redis_client, "user:1") == {"id": 1, "name": "v2"}
    assert int(cast(str, redis_client.get("{user:1}:cw:v"))) == version


def test_check_passes_on_good_setup(
    tmp_path: Path,
    mariadb: MariaDBServer,
    shop: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
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


def test_check_and_run_name_missing_columns(
    tmp_path: Path,
    mariadb: MariaDBServer,
    shop: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
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


def test_check_fails_on_missing_privileges(
    tmp_path: Path,
    mariadb: MariaDBServer,
    shop: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
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


def test_check_fails_on_statement_binlog(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
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


def test_decimal_and_types_round_trip(
    tmp_path: Path,
    mariadb: MariaDBServer,
    mysql_db: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
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
