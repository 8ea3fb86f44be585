"""``cache-worker verify`` against the real worker on every source: MySQL, postgres-notify, logical.

The key test writes a table with a wide mix of types through the real worker (its log path) and
then runs ``verify``, which reads the same rows with SELECT: zero stale keys proves that the
SELECT path decodes every type exactly as the binlog or pgoutput path did. Then keys are
corrupted, deleted or left behind for a row outside ``when``, and ``verify`` must say exactly so.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis

from tests.integration.harness import SourceHarness
from tests.integration.worker_process import WorkerProcess, run_cli, wait_until
from tests.services import RedisServer, free_port

COMMON = (
    "id INT PRIMARY KEY, n INT, big BIGINT, d DECIMAL(12,4), name VARCHAR(100), day DATE, "
    "at {datetime}, j {json}, note VARCHAR(50), f DOUBLE PRECISION, ok BOOLEAN, b {bytes}, "
    "status VARCHAR(20) NOT NULL"
)
MYSQL_ONLY = (
    "ts TIMESTAMP(3) NULL, bits BIT(10), tags SET('x','a','b'), mood ENUM('sad','ok'), "
    "fl FLOAT, yr YEAR, tm TIME(6), bin BINARY(4), zd DATE, ub BIGINT UNSIGNED, "
    "l VARCHAR(20) CHARACTER SET latin1"
)
POSTGRES_ONLY = "tz TIMESTAMPTZ, u UUID, arr INT[], r REAL, words TEXT[], iv INTERVAL"

JSONS = [
    '{"a": [1, 2.5, null, "x"], "b": {"c": true, "d": 1.50}}',
    "[]",
    "1.50",
    '"str"',
    '{"emoji": "😀", "n": -0.0, "big": 12345678901234567890}',
]


def common_row(i: int) -> list[Any]:
    if i == 9:
        return [i, None, None, None, None, None, None, None, None, None, None, None, "active"]
    return [
        i,
        -i * 7,
        9007199254740993 + i,
        Decimal(f"{i}.3") * (-1 if i % 2 else 1),
        f"Zoë {i} 😀",
        dt.date(2024, 2, 29) + dt.timedelta(days=i),
        dt.datetime(2024, 2, 29, 13, 14, 15, 123456 * (i % 2)),
        JSONS[i % len(JSONS)],
        f"n{i}" if i % 3 else None,
        [0.1, 1e300, -2.5, 1 / 3][i % 4],
        i % 2 == 0,
        bytes([0, 255, i]),
        "active" if i % 4 else "inactive",
    ]


def mysql_row(i: int) -> list[Any]:
    if i == 9:
        return [None] * 11
    return [
        f"2024-02-29 13:14:15.{i:03d}" if i != 3 else "0000-00-00 00:00:00",
        [0, 5, 1023][i % 3],
        ["b,a", "", "x,a,b"][i % 3],
        ["ok", "sad"][i % 2],
        [3.1415927, 16777217.0, 0.1, -1.5e-7][i % 4],
        [2024, 0, 1999][i % 3],
        ["838:59:59", "-01:02:03.5", "00:00:00.000001"][i % 3],
        [b"ab", b"\x00\x01\x02\x03", b""][i % 3],
        ["0000-00-00", "2024-01-02", "9999-12-31"][i % 3],
        18446744073709551615 - i,
        ["€uro ÿ", "plain", "Ä"][i % 3],
    ]


def postgres_row(i: int) -> list[Any]:
    if i == 9:
        return [None] * 6
    return [
        dt.datetime(2024, 2, 29, 13, 14, 15, 500000, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        uuid.UUID(int=i * 2**100 + 7),
        [1, None, i],
        [3.1415927, 16777217.0, 0.1, -1.5e-7][i % 4],
        ["a b", f"w{i}", 'q"uote'],
        dt.timedelta(days=i, hours=2, microseconds=5),
    ]


def wide_table(source: SourceHarness) -> None:
    body = COMMON.format(
        datetime=source.type("datetime"), json=source.type("json"), bytes=source.type("bytes")
    )
    extra = MYSQL_ONLY if source.dialect == "mysql" else POSTGRES_ONLY
    source.create_table("wide", f"{body}, {extra}")


def fill(source: SourceHarness) -> int:
    """Write the rows (the worker is stopped: they wait in the log); returns how many remain."""
    specific = mysql_row if source.dialect == "mysql" else postgres_row
    rows = [common_row(i) + specific(i) for i in range(1, 13)]
    marks = ", ".join(["%s"] * len(rows[0]))
    source.executemany(f"INSERT INTO wide VALUES ({marks})", rows)
    # Updates and a delete take the log's other paths (before and after images).
    source.sql("UPDATE wide SET name = 'changed 🎉', j = '{\"z\": [1.25]}' WHERE id = 2")
    source.sql("UPDATE wide SET status = 'inactive' WHERE id = 5")
    source.sql("UPDATE wide SET status = 'active', d = 0.0001 WHERE id = 8")
    source.sql("DELETE FROM wide WHERE id = 12")
    return 11


RULES: list[dict[str, Any]] = [
    {"name": "wide", "table": "DB.wide", "keys": ["w:{id}"]},
    {"name": "wide-hash", "table": "DB.wide", "keys": ["wh:{id}", "wn:{name}"], "format": "hash"},
    {
        "name": "active",
        "table": "DB.wide",
        "keys": ["a:{id}"],
        "columns": ["id", "name", "d", "j"],
        "when": {"status": "active"},
    },
]


def warm_through_worker(source: SourceHarness, redis_url: str) -> tuple[Path, int]:
    wide_table(source)
    cfg = source.config(redis_url, RULES)
    # The first run saves the start of the log; rows written while it is stopped come after.
    first = WorkerProcess(cfg).start()
    first.wait_streaming()
    assert first.stop() == 0
    rows = fill(source)
    result = run_cli(cfg, "run", "--until-idle", "--log-format", "json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return cfg, rows


def rule_line(output: str, rule: str) -> str:
    [line] = [x for x in output.splitlines() if re.match(rf"^\S+\s+{re.escape(rule)} \(", x)]
    return line


def counts(line: str) -> dict[str, int]:
    match = re.search(
        r": (?:sample of )?(\d+) rows?, (\d+) keys?: (\d+) fresh, (\d+) missing, (\d+) stale",
        line,
    )
    assert match, line
    names = ("rows", "keys", "fresh", "missing", "stale")
    return dict(zip(names, map(int, match.groups()), strict=True))


def verify(cfg: Path, *args: str) -> tuple[int, str]:
    result = run_cli(cfg, "verify", *args, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def test_verify_finds_nothing_stale_after_the_worker_then_finds_what_was_broken(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    cfg, rows = warm_through_worker(source, redis_server.url())
    assert redis_client.exists("w:1", "w:11", "wh:1", "wn:changed 🎉") == 4
    active = {r[0] for r in source.query("SELECT id FROM wide WHERE status = 'active'")}

    # The SELECT path agrees with the log path on every type, across pages of 4 rows.
    code, out = verify(cfg, "--chunk", "4")
    assert code == 0, out
    assert counts(rule_line(out, "wide")) == {
        "rows": rows,
        "keys": rows,
        "fresh": rows,
        "missing": 0,
        "stale": 0,
    }
    hash_counts = counts(rule_line(out, "wide-hash"))
    assert hash_counts["stale"] == 0 and hash_counts["missing"] == 0
    assert hash_counts["keys"] == hash_counts["fresh"] == 2 * rows - 1  # row 9 has no name
    active_counts = counts(rule_line(out, "active"))
    assert active_counts["fresh"] == len(active)
    assert active_counts["missing"] == rows - len(active)  # rows outside `when` have no key
    assert active_counts["stale"] == 0
    assert out.splitlines()[-1].endswith(" 0 stale")
    assert source.server.password not in out

    # A sample checks that many random rows per rule.
    code, out = verify(cfg, "--sample", "5")
    assert code == 0, out
    assert counts(rule_line(out, "wide")) == {
        "rows": 5,
        "keys": 5,
        "fresh": 5,
        "missing": 0,
        "stale": 0,
    }
    assert "sample of 5 rows" in rule_line(out, "wide")

    # One wrong value and one deleted key: exactly one stale (shown) and one missing.
    redis_client.set("w:3", '{"id": 3, "name": "wrong"}')
    redis_client.delete("w:4")
    code, out = verify(cfg)
    assert code == 7, out
    line = rule_line(out, "wide")
    assert line.startswith("STALE")
    assert counts(line) == {
        "rows": rows,
        "keys": rows,
        "fresh": rows - 2,
        "missing": 1,
        "stale": 1,
    }
    assert "stale w:3 [id=3]: the value differs" in out
    assert 'actual:   {"id": 3, "name": "wrong"}' in out
    assert rule_line(out, "active").startswith("ok")

    # A key left behind for a row outside `when` is stale too: it should have been evicted.
    # So is a key holding another Redis type than the rule's format.
    outside = min(set(range(1, 12)) - active)
    redis_client.set(f"a:{outside}", '{"id": 0}')
    redis_client.set("wh:6", "a string")
    code, out = verify(cfg, "--examples", "1")
    assert code == 7, out
    assert counts(rule_line(out, "active"))["stale"] == 1
    assert f"stale a:{outside} [id={outside}]: the key exists but the row is outside `when`" in out
    assert counts(rule_line(out, "wide-hash"))["stale"] == 1
    assert "stale wh:6 [id=6]: the key holds a string, not hash" in out


def test_verify_while_the_worker_applies_changes_reports_nothing_stale(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    source.create_table("hot", "id INT PRIMARY KEY, v INT NOT NULL")
    cfg = source.config(
        redis_server.url(), [{"name": "hot", "table": "DB.hot", "keys": ["hot:{id}"]}]
    )
    rows = 200
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        source.executemany("INSERT INTO hot VALUES (%s, 0)", [(i,) for i in range(rows)])
        keys = [f"hot:{i}" for i in range(rows)]
        wait_until(lambda: redis_client.exists(*keys) == rows, timeout=60, what="warm")
        stop = threading.Event()
        updates: list[int] = []

        def write() -> None:
            # Rows change between verify's SELECT and GET; the re-check must absorb that.
            rng = random.Random(3)
            while not stop.is_set():
                source.sql(f"UPDATE hot SET v = v + 1 WHERE id = {rng.randrange(rows)}")
                updates.append(1)
                time.sleep(0.02)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            code, out = verify(cfg, "--chunk", "20")
        finally:
            stop.set()
            writer.join(timeout=10)
        assert code == 0, out
        line = rule_line(out, "hot")
        unsettled = re.search(r"(\d+) keys? whose row changed", line)
        fresh = counts(line)["fresh"]
        assert fresh + (int(unsettled.group(1)) if unsettled else 0) == rows, line
        assert updates
        assert worker.stop() == 0


def test_verify_skips_evict_rules_and_reports_config_and_connection_errors(
    source: SourceHarness, redis_server: RedisServer, tmp_path: Path
) -> None:
    source.create_table("orders", "id INT PRIMARY KEY, user_id INT")
    cfg = source.config(
        redis_server.url(),
        [
            {"name": "orders", "table": "DB.orders", "keys": ["user:{user_id}"], "action": "evict"},
            {"name": "order", "table": "DB.orders", "keys": ["order:{id}"]},
        ],
    )
    code, out = verify(cfg)
    assert code == 0, out
    assert "skip   orders (" in out and "an evict rule" in out
    assert counts(rule_line(out, "order"))["rows"] == 0

    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace('action = "evict"', 'action = "sometimes"'))
    result = run_cli(bad, "verify")
    assert result.returncode == 3
    assert "rules[0].action" in result.stderr

    # A database that does not answer: exit 4, and the password is not in the message.
    port = f":{source.server.port}/"
    dsn = source.dsn().replace(port, f":{free_port()}/")
    result = run_cli(cfg, "verify", env={"CACHE_WORKER_SOURCE__DSN": dsn})
    assert result.returncode == 4, result.stdout + result.stderr
    assert "unavailable" in result.stderr
    assert source.server.password not in result.stdout + result.stderr
