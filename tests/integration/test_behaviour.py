"""The rule behaviour suite, proven on every source: MySQL, postgres-notify, postgres-logical.

Each test runs the real ``cache-worker`` CLI as a child process against a fresh database on a real
server and a flushed real Redis, then checks Redis. The same assertions hold for all three
sources: that is the promise of one rule language over several logs.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal

import redis

from tests.integration.harness import SourceHarness
from tests.integration.redis_reads import get_json
from tests.integration.worker_process import WorkerProcess, run_cli, wait_until
from tests.services import RedisServer


def users_table(source: SourceHarness) -> None:
    source.create_table(
        "users",
        "id INT PRIMARY KEY, name VARCHAR(100), email VARCHAR(200), "
        "status VARCHAR(20) NOT NULL DEFAULT 'active', balance DECIMAL(12,2), "
        f"seen_at {source.type('datetime')}, visits INT NOT NULL DEFAULT 0",
    )


def orders_table(source: SourceHarness) -> None:
    source.create_table("orders", "id INT PRIMARY KEY, user_id INT, total DECIMAL(10,2)")


def test_insert_update_delete_and_key_move(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    users_table(source)
    orders_table(source)
    cfg = source.config(
        redis_server.url(),
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
        source.sql(
            "INSERT INTO users (id, name, email, balance, seen_at) VALUES "
            "(1, 'Zoë 😀', 'zoë😀@x', 10.50, '2024-02-29 13:14:15.123456')"
        )
        expected = {
            "id": 1,
            "name": "Zoë 😀",
            "email": "zoë😀@x",
            "balance": "10.50",
            "seen_at": "2024-02-29T13:14:15.123456",
        }
        wait_until(lambda: get_json(redis_client, "user:1") == expected, what="insert refreshed")
        assert get_json(redis_client, "user:email:zoë😀@x") == expected
        assert 3_600_000 * 0.89 < redis_client.pttl("user:1") <= 3_600_000
        assert redis_client.exists("{user:1}:cw:v")

        # A key column moves: the old email key goes, the new one appears.
        source.sql("UPDATE users SET email = 'new@x', name = 'Zed' WHERE id = 1")
        wait_until(lambda: redis_client.exists("user:email:new@x"), what="new key")
        assert not redis_client.exists("user:email:zoë😀@x")
        assert get_json(redis_client, "user:1")["name"] == "Zed"

        # Evict rule: moving an order to another user evicts both users' keys.
        redis_client.set("user:7:orders", "cached")
        redis_client.set("user:8:orders", "cached")
        source.sql("INSERT INTO orders VALUES (1, 7, 5.00)")
        wait_until(lambda: not redis_client.exists("user:7:orders"), what="evict on insert")
        redis_client.set("user:7:orders", "cached")
        source.sql("UPDATE orders SET user_id = 8 WHERE id = 1")
        wait_until(lambda: not redis_client.exists("user:8:orders"), what="evict new owner")
        assert not redis_client.exists("user:7:orders")

        # A multi-statement transaction is applied as a whole.
        source.transaction(
            [
                "INSERT INTO users (id, name, email) VALUES (2, 'a', 'a@x')",
                "UPDATE users SET name = 'b' WHERE id = 2",
            ]
        )
        wait_until(lambda: get_json(redis_client, "user:2"), what="transaction applied")
        assert get_json(redis_client, "user:2")["name"] == "b"

        # A lease taken by a web-tier reader is dropped by the next action on the key.
        redis_client.set("{user:1}:cw:lease", "token")
        source.sql("DELETE FROM users WHERE id = 1")
        wait_until(lambda: not redis_client.exists("user:1"), what="delete evicts")
        assert not redis_client.exists("user:email:new@x", "{user:1}:cw:v", "{user:1}:cw:lease")
        assert worker.stop() == 0
    assert worker.has_event("started") and worker.has_event("stopped")
    assert source.server.password not in worker.output()


def test_watch_when_and_hash_format(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    users_table(source)
    cfg = source.config(
        redis_server.url(),
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
            }
        ],
    )
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        source.sql(
            "INSERT INTO users (id, name, status, balance) VALUES "
            "(1, 'a', 'active', 1.25), (2, 'b', 'banned', 0)"
        )
        wait_until(lambda: redis_client.exists("active:1"), what="hash written")
        assert redis_client.hgetall("active:1") == {"id": "1", "name": "a", "balance": "1.25"}
        assert 0 < redis_client.pttl("active:1") <= 600_000
        assert not redis_client.exists("active:2")  # filtered by when

        # An unwatched column changes: nothing is written (the marker we plant survives).
        redis_client.hset("active:1", "marker", "kept")
        source.sql("UPDATE users SET visits = visits + 1 WHERE id = 1")
        source.sql("UPDATE users SET status = 'trial' WHERE id = 2")  # enters the filter
        wait_until(lambda: redis_client.exists("active:2"), what="row entering when")
        assert redis_client.hget("active:1", "marker") == "kept"

        # Leaving the filter evicts.
        source.sql("UPDATE users SET status = 'banned' WHERE id = 1")
        wait_until(lambda: not redis_client.exists("active:1"), what="row leaving when")
        assert worker.stop() == 0


def test_restart_applies_every_row_written_while_stopped(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    users_table(source)
    cfg = source.config(
        redis_server.url(),
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}"],
                "columns": ["id", "name"],
            }
        ],
    )
    first = WorkerProcess(cfg).start()
    first.wait_streaming()
    assert first.stop() == 0

    for start in range(0, 10_000, 1000):
        source.executemany(
            "INSERT INTO users (id, name) VALUES (%s, %s)",
            [(i, f"n{i}") for i in range(start, start + 1000)],
        )

    result = run_cli(cfg, "run", "--until-idle", "--log-format", "json", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    pipe = redis_client.pipeline()
    for i in range(10_000):
        pipe.get(f"user:{i}")
    values = pipe.execute()
    assert [i for i, v in enumerate(values) if v is None] == []
    assert all(json.loads(v) == {"id": i, "name": f"n{i}"} for i, v in enumerate(values))


def test_kill_9_mid_stream_loses_nothing_and_never_goes_backwards(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    users_table(source)
    cfg = source.config(
        redis_server.url(),
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}"],
                "columns": ["id", "visits"],
            }
        ],
    )
    rows = 200
    source.sql(
        "INSERT INTO users (id, visits) VALUES " + ",".join(f"({i}, 0)" for i in range(rows))
    )
    rng = random.Random(7)
    worker = WorkerProcess(cfg).start()
    worker.wait_streaming()
    try:
        for _round in range(4):
            source.executemany(
                "UPDATE users SET visits = visits + 1 WHERE id = %s",
                [(rng.randrange(rows),) for _ in range(300)],
            )
            for _ in range(100):
                source.sql(f"UPDATE users SET visits = visits + 1 WHERE id = {rng.randrange(rows)}")
            worker.kill()
            worker = WorkerProcess(cfg).start()
            worker.wait_streaming()
        truth = dict(source.query("SELECT id, visits FROM users"))

        def caught_up() -> bool:
            pipe = redis_client.pipeline()
            for i in range(rows):
                pipe.get(f"user:{i}")
            got = pipe.execute()
            return all(
                v is not None and json.loads(v)["visits"] == truth[i] for i, v in enumerate(got)
            )

        wait_until(caught_up, timeout=90, what="every key equal to its row")
        assert worker.stop() == 0
    finally:
        if not worker.exited():
            worker.kill()


def test_values_are_encoded_faithfully(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    source.create_table(
        "t",
        f"id INT PRIMARY KEY, d DECIMAL(30,10), j {source.type('json')}, "
        f"b {source.type('bytes')}, n VARCHAR(5), dt DATE, f DOUBLE PRECISION, ok BOOLEAN",
    )
    cfg = source.config(redis_server.url(), [{"name": "t", "table": "DB.t", "keys": ["t:{id}"]}])
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        source.sql(
            "INSERT INTO t VALUES (1, 12345678901234567890.0123456789, "
            "'{\"a\": [1, 2.5, null, \"x\"]}', %s, NULL, '2024-01-02', 0.1, TRUE)",
            args=(b"\x00\xff",),
        )
        value = wait_until(lambda: get_json(redis_client, "t:1"), what="typed row")
        # BOOLEAN is TINYINT(1) on MySQL: 1 there, true on Postgres.
        ok = value.pop("ok")
        assert ok is True or ok == 1
        assert value == {
            "id": 1,
            "d": "12345678901234567890.0123456789",
            "j": {"a": [1, 2.5, None, "x"]},
            "b": "AP8=",
            "n": None,
            "dt": "2024-01-02",
            "f": 0.1,
        }
        assert Decimal(value["d"]) == Decimal("12345678901234567890.0123456789")
        assert worker.stop() == 0


def test_ddl_while_running_keeps_column_names_right(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    source.create_table("items", "id INT PRIMARY KEY, name VARCHAR(40), email VARCHAR(40)")
    cfg = source.config(
        redis_server.url(),
        [
            {"name": "all", "table": "DB.items", "keys": ["item:{id}"]},
            {"name": "narrow", "table": "DB.items", "keys": ["n:{id}"], "columns": ["id", "email"]},
        ],
    )
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        source.sql("INSERT INTO items VALUES (1, 'a', 'a@x')")
        wait_until(lambda: get_json(redis_client, "item:1"), what="first row")

        source.sql("ALTER TABLE items ADD COLUMN qty INT")
        source.sql("INSERT INTO items VALUES (2, 'b', 'b@x', 5)")
        wait_until(lambda: get_json(redis_client, "item:2"), what="row after ADD COLUMN")
        assert get_json(redis_client, "item:2") == {"id": 2, "name": "b", "email": "b@x", "qty": 5}

        source.sql("ALTER TABLE items RENAME COLUMN name TO full_name")
        source.sql("UPDATE items SET full_name = 'c' WHERE id = 2")
        wait_until(
            lambda: (get_json(redis_client, "item:2") or {}).get("full_name") == "c",
            what="row after RENAME COLUMN",
        )
        assert "name" not in get_json(redis_client, "item:2")

        source.sql("ALTER TABLE items DROP COLUMN email")
        source.sql("INSERT INTO items VALUES (3, 'd', 7)")
        wait_until(lambda: get_json(redis_client, "item:3"), what="row after DROP COLUMN")
        assert get_json(redis_client, "item:3") == {"id": 3, "full_name": "d", "qty": 7}
        assert get_json(redis_client, "n:3") == {"id": 3}
        wait_until(lambda: worker.has_event("rule_column_missing"), what="missing column warned")
        [warning] = [e for e in worker.events() if e.get("event") == "rule_column_missing"]
        assert warning["rule"] == "narrow" and warning["columns"] == ["email"]
        assert not worker.exited()
        assert worker.stop() == 0
