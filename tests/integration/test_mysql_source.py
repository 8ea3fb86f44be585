"""Integration tests of ``connectors.mysql.MySQLSource`` against a real MariaDB server.

Every test drives ``stream()`` on a background thread through ``_Streamer`` and stops it with
``close()`` from the test thread, so a hang shows up as a failed deadline rather than a stuck run.
Writes go through the admin account; the source reads the binlog as a replica with its own
server id per test.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pymysql
import pytest
import structlog
from pymysqlreplication import BinLogStreamReader

from connectors.mysql import (
    CHECK_FORMAT,
    CHECK_PRIVILEGES,
    CHECK_REACHABLE,
    MySQLOptions,
    MySQLSource,
    make_position,
    open_connection,
    preflight,
)
from connectors.mysql_rows import MySQLRowReader
from connectors.mysql_stream import PacketEvents
from tests.services import MariaDBServer, start_local_mariadb
from worker.errors import PositionLost, SourceMisconfigured
from worker.events import Heartbeat, Op, Position, RowChange, SourceItem, TableRef, Transaction

_server_ids = itertools.count(1000 + os.getpid() % 1000 * 100)


def _options(server: MariaDBServer, tables: list[TableRef], **overrides: Any) -> MySQLOptions:
    settings: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "server_id": next(_server_ids),
        "tables": tuple(tables),
        "heartbeat_s": 0.5,
        "reconnect_max_backoff_s": 1.0,
        **overrides,
    }
    return MySQLOptions(**settings)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _Streamer:
    """Runs ``source.stream(start)`` on a thread and hands items to the test with deadlines."""

    def __init__(self, source: MySQLSource, start: Position) -> None:
        self.source = source
        self.items: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()

    def _run(self, start: Position) -> None:
        try:
            for item in self.source.stream(start):
                self.items.put(item)
        except BaseException as exc:
            self.items.put(_Failed(exc))
        finally:
            self.items.put(_END)

    def next(self, deadline: float) -> SourceItem:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for the source")
        try:
            item = self.items.get(timeout=remaining)
        except queue.Empty:
            raise AssertionError("timed out waiting for the source") from None
        if isinstance(item, _Failed):
            raise item.error
        if item is _END:
            raise AssertionError("the stream ended unexpectedly")
        assert isinstance(item, Transaction | Heartbeat)
        return item

    def until(self, done: Callable[[SourceItem], bool], timeout: float = 20.0) -> list[SourceItem]:
        """Items up to and including the first one ``done`` accepts."""
        deadline = time.monotonic() + timeout
        seen: list[SourceItem] = []
        while True:
            item = self.next(deadline)
            seen.append(item)
            if done(item):
                return seen

    def through(self, end: Position, timeout: float = 20.0) -> list[SourceItem]:
        """Items until one carries a position at or past ``end``."""
        return self.until(lambda i: i.position is not None and i.position >= end, timeout)

    def failure(self, timeout: float = 20.0) -> BaseException:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("the stream did not fail") from None
            if isinstance(item, _Failed):
                return item.error
            if item is _END:
                raise AssertionError("the stream ended without an error")

    def close(self) -> None:
        began = time.monotonic()
        self.source.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "stream() did not return after close()"
        assert time.monotonic() - began < 5

    def __enter__(self) -> _Streamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end(server: MariaDBServer) -> Position:
    """The current end of the binlog, as a position."""
    rows = server.admin_sql("SHOW MASTER STATUS")
    return make_position(str(rows[0][0]), int(rows[0][1]), None)


def _purge_to(server: MariaDBServer, current: str) -> None:
    """PURGE BINARY LOGS TO ``current`` and wait until the older files are really gone."""
    deadline = time.monotonic() + 20
    while True:
        # MariaDB keeps a binlog until InnoDB made its commits durable (the binlog checkpoint);
        # with a lazy innodb_flush_log_at_trx_commit that happens in the background.
        server.admin_sql("FLUSH ENGINE LOGS")
        server.admin_sql(f"PURGE BINARY LOGS TO '{current}'")
        if str(server.admin_sql("SHOW BINARY LOGS")[0][0]) == current:
            return
        assert time.monotonic() < deadline, "the server did not purge its old binlogs"
        time.sleep(0.2)


def _transactions(items: list[SourceItem]) -> list[Transaction]:
    return [i for i in items if isinstance(i, Transaction)]


def _rows(tx: Transaction) -> list[tuple[Op, Any, Any]]:
    return [(c.op, c.before, c.after) for c in tx.changes]


def _sql(connection: pymysql.Connection[Any], *statements: str) -> None:
    with connection.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


@pytest.fixture
def other_db(mariadb: MariaDBServer) -> Iterator[str]:
    name = f"t_other_{uuid.uuid4().hex[:8]}"
    mariadb.admin_sql(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        mariadb.admin_sql(f"DROP DATABASE IF EXISTS `{name}`")


# --------------------------------------------------------------------------------------------


def test_changes_grouped_per_transaction_in_order(
    mariadb: MariaDBServer, mysql_db: str, other_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(
        mysql_conn,
        "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
        "CREATE TABLE o (id INT PRIMARY KEY)",
        f"CREATE TABLE `{other_db}`.t (id INT PRIMARY KEY)",
        f"CREATE TABLE `{other_db}`.u (id INT PRIMARY KEY)",
    )
    # other_db.u is a rule table, so the library's by-name filter lets other_db.t through.
    tables = [TableRef(mysql_db, "t"), TableRef(other_db, "u")]
    source = MySQLSource(_options(mariadb, tables))
    start = source.initial_position()
    _sql(
        mysql_conn,
        "INSERT INTO t VALUES (1, 'a')",
        "BEGIN",
        "INSERT INTO t VALUES (2, 'b')",
        "UPDATE t SET v = 'c' WHERE id = 1",
        "DELETE FROM t WHERE id = 2",
        "COMMIT",
        "INSERT INTO o VALUES (1)",
        f"INSERT INTO `{other_db}`.t VALUES (1)",
        f"INSERT INTO `{other_db}`.u VALUES (7)",
        "UPDATE t SET v = 'd' WHERE id = 1",
    )
    end = _end(mariadb)
    with _Streamer(source, start) as streamer:
        txs = _transactions(streamer.through(end))
    t, u = TableRef(mysql_db, "t"), TableRef(other_db, "u")
    assert [_rows(tx) for tx in txs] == [
        [(Op.INSERT, None, {"id": 1, "v": "a"})],
        [
            (Op.INSERT, None, {"id": 2, "v": "b"}),
            (Op.UPDATE, {"id": 1, "v": "a"}, {"id": 1, "v": "c"}),
            (Op.DELETE, {"id": 2, "v": "b"}, None),
        ],
        [(Op.INSERT, None, {"id": 7})],
        [(Op.UPDATE, {"id": 1, "v": "c"}, {"id": 1, "v": "d"})],
    ]
    assert [c.table for tx in txs for c in tx.changes] == [t, t, t, t, u, t]
    positions = [tx.position for tx in txs]
    assert all(p is not None for p in positions)
    versions = [p.version for p in positions if p is not None]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    previous_end = start.version
    for tx in txs:
        assert tx.position is not None and tx.committed_at is not None
        assert len({c.version for c in tx.changes}) == 1
        # A change is versioned by where its transaction starts: after the previous boundary,
        # before its own end.
        assert previous_end <= tx.changes[0].version < tx.position.version
        previous_end = tx.position.version
    assert txs[-1].position == end
    assert source.describe_position(end) == f"{end.coords['file']}:{end.coords['pos']}"


def test_large_transaction_is_chunked(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY)")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")], chunk_rows=10))
    start = source.initial_position()
    values = ", ".join(f"({i})" for i in range(25))
    _sql(
        mysql_conn,
        "BEGIN",
        f"INSERT INTO t VALUES {values}",
        "INSERT INTO t VALUES (100), (101)",
        "COMMIT",
        "INSERT INTO t VALUES (200)",
    )
    end = _end(mariadb)
    with _Streamer(source, start) as streamer:
        txs = _transactions(streamer.through(end))
    assert [len(tx.changes) for tx in txs] == [10, 10, 7, 1]
    assert [tx.position is None for tx in txs] == [True, True, False, False]
    ids = [c.after["id"] for tx in txs[:3] for c in tx.changes if c.after]
    assert ids == [*range(25), 100, 101]
    assert len({c.version for tx in txs[:3] for c in tx.changes}) == 1


def test_start_end_skips_earlier_writes_and_beginning_sees_them(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    tables = [TableRef(mysql_db, "t")]
    at_end = MySQLSource(_options(mariadb, tables, start="end"))
    start = at_end.initial_position()
    assert start.coords["gtid"]  # MariaDB always has GTIDs
    _sql(mysql_conn, "INSERT INTO t VALUES (2)")
    end = _end(mariadb)
    with _Streamer(at_end, start) as streamer:
        txs = _transactions(streamer.through(end))
    assert [c.after for tx in txs for c in tx.changes] == [{"id": 2}]

    from_beginning = MySQLSource(_options(mariadb, tables, start="beginning"))
    first = from_beginning.initial_position()
    assert first.coords["pos"] == 4 and first.coords["gtid"] is None
    first_file = str(mariadb.admin_sql("SHOW BINARY LOGS")[0][0])
    assert first.coords["file"] == first_file
    with _Streamer(from_beginning, first) as streamer:
        txs = _transactions(streamer.through(end, timeout=60))
    assert [c.after for tx in txs for c in tx.changes] == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize("resume", ["file", "gtid"])
def test_resume_from_every_position_across_rotation(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any], resume: str
) -> None:
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY)", "CREATE TABLE o (id INT PRIMARY KEY)")
    tables = [TableRef(mysql_db, "t")]
    first = MySQLSource(_options(mariadb, tables, resume=resume))
    start = first.initial_position()
    for i in range(1, 4):
        _sql(mysql_conn, f"INSERT INTO t VALUES ({i})", f"INSERT INTO o VALUES ({i})")
    mariadb.admin_sql("FLUSH BINARY LOGS")
    for i in range(4, 7):
        _sql(mysql_conn, f"INSERT INTO o VALUES ({i})", f"INSERT INTO t VALUES ({i})")
    end = _end(mariadb)
    with _Streamer(first, start) as streamer:
        txs = _transactions(streamer.through(end))
    assert [tx.changes[0].after for tx in txs] == [{"id": i} for i in range(1, 7)]
    positions = [tx.position for tx in txs]
    files = {p.coords["file"] for p in positions if p is not None}
    assert len(files) == 2, "the writes should span a binlog rotation"
    assert all(p is not None and p.coords["gtid"] for p in positions)

    # Resuming from each transaction's position yields exactly the ones after it.
    for index, position in enumerate([start, *positions]):
        assert position is not None
        source = MySQLSource(_options(mariadb, tables, resume=resume))
        with structlog.testing.capture_logs() as logs, _Streamer(source, position) as streamer:
            items = streamer.until(lambda i: isinstance(i, Heartbeat) and i.caught_up)
        got = [tx.changes[0].after for tx in _transactions(items)]
        assert got == [{"id": i} for i in range(index + 1, 7)], f"resumed from {position}"
        modes = [e["resume"] for e in logs if e["event"] == "source_streaming"]
        assert modes == [resume]


def test_caught_up_heartbeat_when_idle(mariadb: MariaDBServer, mysql_db: str) -> None:
    mariadb.admin_sql(f"CREATE TABLE `{mysql_db}`.t (id INT PRIMARY KEY)")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
    start = source.initial_position()
    with _Streamer(source, start) as streamer:
        began = time.monotonic()
        items = streamer.until(lambda i: isinstance(i, Heartbeat) and i.caught_up, timeout=5)
        assert time.monotonic() - began < 5
        # Idle stays caught up: the server's own heartbeats keep arriving.
        again = streamer.until(lambda i: isinstance(i, Heartbeat) and i.caught_up, timeout=5)
    assert items[-1].position == start
    assert again[-1].position == start


def test_irrelevant_transactions_move_the_position_with_heartbeats(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY)", "CREATE TABLE o (id INT PRIMARY KEY)")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
    start = source.initial_position()
    with _Streamer(source, start) as streamer:
        streamer.until(lambda i: isinstance(i, Heartbeat) and i.caught_up)
        stop = time.monotonic() + 1.6
        i = 0
        while time.monotonic() < stop:
            i += 1
            _sql(mysql_conn, f"INSERT INTO o VALUES ({i})")
        end = _end(mariadb)
        items = streamer.through(end)
    assert not _transactions(items)
    beats = [b for b in items if isinstance(b, Heartbeat) and not b.caught_up]
    assert 1 <= len(beats) <= 6, "about one heartbeat per 0.5 s of irrelevant log"
    versions = [b.position.version for b in beats if b.position is not None]
    assert versions == sorted(versions) and versions[0] > start.version


def test_value_normalisation_matrix(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(
        mysql_conn,
        "SET SESSION time_zone = '+00:00', SESSION sql_mode = ''",
        """CREATE TABLE t (
            id INT PRIMARY KEY,
            i INT, ub BIGINT UNSIGNED, d DECIMAL(20,6), f FLOAT, db DOUBLE,
            dt_ DATE, tm TIME, tm6 TIME(6), dtm DATETIME(6), ts TIMESTAMP NULL,
            vc VARCHAR(50), tx TEXT, bl BLOB, vb VARBINARY(16), bn BINARY(4),
            ch CHAR(5), l1 VARCHAR(10) CHARACTER SET latin1,
            js JSON, en ENUM('one','two','three'), st SET('c','a','b'),
            bt BIT(8), b1 BIT(1), yr YEAR
        ) DEFAULT CHARSET=utf8mb4""",
    )
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
    start = source.initial_position()
    _sql(
        mysql_conn,
        """INSERT INTO t VALUES (
            1, -5, 18446744073709551615, '-12345678901234.123456', 3.14, 2.718281828459045,
            '2024-02-29', '-838:59:59', '12:34:56.500001', '2024-01-02 03:04:05.123456',
            '2024-01-02 03:04:05',
            'héllo 🌍', REPEAT('x', 3000), X'00FFFE80', X'8081', X'6100',
            'ab', X'81E9',
            '{"a": {"b": [1, "x", null, true, 1.5]}, "k": "é"}', 'two', 'a,c',
            b'10100101', b'1', 2024)""",
        "INSERT INTO t (id) VALUES (2)",
        """INSERT INTO t (id, dt_, dtm, ts, st, yr, js, vc, bl)
           VALUES (3, '0000-00-00', '0000-00-00 00:00:00', '0000-00-00 00:00:00', '', 0,
                   '[]', '', '')""",
        "UPDATE t SET i = 6, st = 'b', js = '{\"n\": 1}' WHERE id = 1",
    )
    end = _end(mariadb)
    with _Streamer(source, start) as streamer:
        changes = [c for tx in _transactions(streamer.through(end)) for c in tx.changes]
    full = changes[0].after
    assert full == {
        "id": 1,
        "i": -5,
        "ub": 18446744073709551615,
        "d": Decimal("-12345678901234.123456"),
        "f": 3.14,
        "db": 2.718281828459045,
        "dt_": dt.date(2024, 2, 29),
        "tm": -dt.timedelta(hours=838, minutes=59, seconds=59),
        "tm6": dt.timedelta(hours=12, minutes=34, seconds=56, microseconds=500001),
        "dtm": dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "vc": "héllo 🌍",
        "tx": "x" * 3000,
        "bl": b"\x00\xff\xfe\x80",
        "vb": b"\x80\x81",
        "bn": b"a\x00\x00\x00",
        "ch": "ab",
        "l1": "\x81é",
        "js": {"a": {"b": [1, "x", None, True, 1.5]}, "k": "é"},
        "en": "two",
        "st": ["a", "c"],
        "bt": 0b10100101,
        "b1": 1,
        "yr": 2024,
    }
    assert isinstance(full["d"], Decimal) and isinstance(full["f"], float)
    assert isinstance(full["bl"], bytes) and isinstance(full["vc"], str)
    assert changes[1].after == {"id": 2, **{k: None for k in full if k != "id"}}
    zeros = changes[2].after
    assert zeros is not None
    assert (zeros["dt_"], zeros["dtm"], zeros["ts"], zeros["yr"]) == (None, None, None, None)
    assert (zeros["st"], zeros["js"], zeros["vc"], zeros["bl"]) == ([], [], "", b"")
    update = changes[3]
    assert update.op is Op.UPDATE and update.before == full
    assert update.after == {**full, "i": 6, "st": ["b"], "js": {"n": 1}}


def test_uuid_and_inet6_arrive_as_their_select_text(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    # Both types are BINARY(16) to the binlog; the cache must hold what SELECT (and verify) show.
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY, u UUID, ip INET6)")
    t = TableRef(mysql_db, "t")
    source = MySQLSource(_options(mariadb, [t]))
    start = source.initial_position()
    with mysql_conn.cursor() as cur:
        cur.execute("SELECT UUID()")
        row = cur.fetchone()
    assert row is not None
    uuids = [
        str(row[0]),  # version 1, which MariaDB may store byte-swapped
        str(uuid.uuid4()),
        "00000000-0000-0000-0000-000000000001",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "12345678-9abc-1def-8123-456789abcdef",
        "12345678-9abc-1def-c123-456789abcdef",
        "12345678-9abc-7def-8123-456789abcdef",
        "00000000-0000-0000-0000-000000000000",
    ]
    addresses = [
        "2001:db8::1",
        "::ffff:1.2.3.4",  # IPv4-mapped
        "::1.2.3.4",  # IPv4-compatible
        "::",
        "::1",
        "2001:db8:0:1:1:1:1:1",  # a single zero group, which MariaDB still compresses
        "fe80::1:0:0:2",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ]
    with mysql_conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO t VALUES (%s, %s, %s)",
            [(i, u, ip) for i, (u, ip) in enumerate(zip(uuids, addresses, strict=True))],
        )
        cur.execute("INSERT INTO t VALUES (99, NULL, NULL)")
        cur.execute("UPDATE t SET ip = '::ffff:10.0.0.1' WHERE id = 0")
        cur.execute("SELECT id, u, ip FROM t ORDER BY id")
        selected = {r[0]: {"id": r[0], "u": r[1], "ip": r[2]} for r in cur.fetchall()}
    end = _end(mariadb)
    with _Streamer(source, start) as streamer:
        changes = [c for tx in _transactions(streamer.through(end)) for c in tx.changes]
    inserted = {c.after["id"]: c.after for c in changes if c.op is Op.INSERT and c.after}
    assert inserted == {**selected, 0: {**selected[0], "ip": "2001:db8::1"}}
    assert inserted[99] == {"id": 99, "u": None, "ip": None}
    update = changes[-1]
    assert update.op is Op.UPDATE
    assert (update.before, update.after) == (inserted[0], selected[0])
    assert selected[0]["ip"] == "::ffff:10.0.0.1"
    reader = MySQLRowReader(_options(mariadb, [t]))
    try:
        assert reader.scan(t, None, 100) == list(selected.values())
    finally:
        reader.close()


def test_ddl_between_changes_keeps_columns_right(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(5))")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
    start = source.initial_position()
    _sql(
        mysql_conn,
        "INSERT INTO t VALUES (1, 'x')",
        "ALTER TABLE t ADD COLUMN b VARBINARY(4) AFTER id",
        "INSERT INTO t VALUES (2, X'FF', 'y')",
        "TRUNCATE TABLE t",
        "INSERT INTO t VALUES (3, X'01', 'z')",
    )
    end = _end(mariadb)
    with _Streamer(source, start) as streamer:
        txs = _transactions(streamer.through(end))
    changes = [c for tx in txs for c in tx.changes]
    t = TableRef(mysql_db, "t")
    assert [(c.op, c.after) for c in changes] == [
        (Op.INSERT, {"id": 1, "a": "x"}),
        (Op.INSERT, {"id": 2, "b": b"\xff", "a": "y"}),
        (Op.TRUNCATE, None),
        (Op.INSERT, {"id": 3, "b": b"\x01", "a": "z"}),
    ]
    assert changes[2] == RowChange(Op.TRUNCATE, t, None, None, changes[2].version)


def test_without_row_metadata_names_come_from_information_schema(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> None:
    _sql(
        mysql_conn,
        "CREATE TABLE t (id INT UNSIGNED PRIMARY KEY, en ENUM('x','y'), st SET('p','q'), "
        "bl BLOB, l1 VARCHAR(5) CHARACTER SET latin1, js JSON)",
    )
    mariadb.admin_sql("SET GLOBAL binlog_row_metadata = MINIMAL")
    try:
        source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
        start = source.initial_position()
        writer = mariadb.connect(mysql_db)  # a new session picks up the global setting
        try:
            _sql(writer, "INSERT INTO t VALUES (4294967295, 'y', 'q,p', X'FF00', X'E9', '[1]')")
        finally:
            writer.close()
        end = _end(mariadb)
        with structlog.testing.capture_logs() as logs, _Streamer(source, start) as streamer:
            txs = _transactions(streamer.through(end))
        check = {c.name: c for c in source.checks()}["binlog_row_metadata=FULL"]
    finally:
        mariadb.admin_sql("SET GLOBAL binlog_row_metadata = FULL")
    assert [c.after for tx in txs for c in tx.changes] == [
        {"id": 4294967295, "en": "y", "st": ["p", "q"], "bl": b"\xff\x00", "l1": "é", "js": [1]}
    ]
    warnings = [e for e in logs if e["event"] == "column_names_from_information_schema"]
    assert len(warnings) == 1
    assert "binlog_row_metadata=FULL" in warnings[0]["risk"]
    assert check.ok and check.warning


@pytest.mark.skipif(
    os.environ.get("CACHE_WORKER_TEST_MYSQL_DSN") is not None,
    reason="restarts the server, which only a locally started one allows",
)
def test_reconnects_after_server_restart_without_loss_or_duplicates(
    mariadb: MariaDBServer, mysql_db: str
) -> None:
    mariadb.admin_sql(f"CREATE TABLE `{mysql_db}`.t (id INT PRIMARY KEY)")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
    start = source.initial_position()
    with structlog.testing.capture_logs() as logs, _Streamer(source, start) as streamer:
        for i in range(1, 4):
            mariadb.admin_sql(f"INSERT INTO `{mysql_db}`.t VALUES ({i})")
        before = _transactions(streamer.through(_end(mariadb)))
        mariadb.restart()
        for i in range(4, 7):
            mariadb.admin_sql(f"INSERT INTO `{mysql_db}`.t VALUES ({i})")
        after = _transactions(streamer.through(_end(mariadb), timeout=60))
    got = [c.after["id"] for tx in before + after for c in tx.changes if c.after]
    assert got == [1, 2, 3, 4, 5, 6]
    reconnects = [e for e in logs if e["event"] == "source_reconnect"]
    assert reconnects and reconnects[0]["attempt"] == 1
    assert all(mariadb.password not in str(e) for e in logs)


def test_close_from_another_thread_unblocks_stream(mariadb: MariaDBServer, mysql_db: str) -> None:
    mariadb.admin_sql(f"CREATE TABLE `{mysql_db}`.t (id INT PRIMARY KEY)")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")], heartbeat_s=30))
    streamer = _Streamer(source, source.initial_position())
    time.sleep(0.5)  # let it block in the socket read: no heartbeat for 30 s
    streamer.close()


def test_checks_pass_on_a_good_server(mariadb: MariaDBServer, mysql_db: str) -> None:
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")]))
    try:
        results = source.checks()
    finally:
        source.close()
    assert [r.name for r in results] == [
        "mysql reachable",
        "binlog enabled",
        "binlog_format=ROW",
        "binlog_row_image=FULL",
        "binlog_row_metadata=FULL",
        "privileges",
        "gtid",
    ]
    assert all(r.ok and not r.warning for r in results), results
    assert f"{mariadb.host}:{mariadb.port}" in results[0].detail
    preflight(_options(mariadb, [TableRef(mysql_db, "t")]))


def test_checks_fail_on_statement_binlog_format(mysql_db: str) -> None:
    server = start_local_mariadb(["--binlog-format=STATEMENT"])
    try:
        options = _options(server, [TableRef(mysql_db, "t")])
        results = {r.name: r for r in MySQLSource(options).checks()}
        assert results[CHECK_REACHABLE].ok
        assert not results[CHECK_FORMAT].ok
        assert "STATEMENT" in results[CHECK_FORMAT].detail
        with pytest.raises(SourceMisconfigured, match="binlog_format"):
            preflight(options)
    finally:
        server.close()


def test_select_only_user_lacks_replication_privileges(
    mariadb: MariaDBServer, mysql_db: str
) -> None:
    user, password = f"ro_{uuid.uuid4().hex[:8]}", "Pw-" + uuid.uuid4().hex
    mariadb.admin_sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
    try:
        mariadb.admin_sql(f"GRANT SELECT ON `{mysql_db}`.* TO '{user}'@'%'")
        mariadb.admin_sql(f"CREATE TABLE `{mysql_db}`.t (id INT PRIMARY KEY)")
        options = _options(mariadb, [TableRef(mysql_db, "t")], user=user, password=password)
        source = MySQLSource(options)
        results = {r.name: r for r in source.checks()}
        privileges = results[CHECK_PRIVILEGES]
        assert not privileges.ok
        assert "REPLICATION SLAVE" in privileges.detail
        assert "REPLICATION CLIENT" in privileges.detail
        assert f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'%'" in (
            privileges.detail
        )
        assert "SELECT on" not in privileges.detail
        with pytest.raises(SourceMisconfigured, match="REPLICATION SLAVE") as raised:
            preflight(options)
        assert password not in str(raised.value)

        # Streaming anyway fails as misconfigured, not as an outage to retry forever.
        with _Streamer(source, _end(mariadb)) as streamer:
            error = streamer.failure()
        assert isinstance(error, SourceMisconfigured), error
        assert password not in str(error)

        wrong = MySQLSource(
            _options(mariadb, [TableRef(mysql_db, "t")], user=user, password="not-" + password)
        )
        reach = wrong.checks()[0]
        assert not reach.ok and "refused the login" in reach.detail
        assert password not in reach.detail
    finally:
        mariadb.admin_sql(f"DROP USER '{user}'@'%'")


@pytest.mark.parametrize("resume", ["file", "gtid"])
def test_purged_binlog_raises_position_lost(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any], resume: str
) -> None:
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY)")
    tables = [TableRef(mysql_db, "t")]
    source = MySQLSource(_options(mariadb, tables, resume=resume))
    _sql(mysql_conn, "INSERT INTO t VALUES (1)")
    checkpoint = source.initial_position()
    _sql(mysql_conn, "INSERT INTO t VALUES (2)")
    assert source.position_available(checkpoint).ok
    mariadb.admin_sql("FLUSH BINARY LOGS")
    current = str(mariadb.admin_sql("SHOW MASTER STATUS")[0][0])
    _purge_to(mariadb, current)
    availability = source.position_available(checkpoint)
    assert not availability.ok and "reset-checkpoint" in availability.detail
    with _Streamer(source, checkpoint) as streamer:
        error = streamer.failure()
    assert isinstance(error, PositionLost), error
    assert "cache-worker reset-checkpoint" in str(error)


def test_connection_lost_mid_transaction_rereads_it_whole(
    mariadb: MariaDBServer,
    mysql_db: str,
    mysql_conn: pymysql.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import connectors.mysql as module

    readers: list[Any] = []

    class FlakyReader(BinLogStreamReader):  # type: ignore[misc]
        """Counts the connections the source makes."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            readers.append(self)

    read_data = PacketEvents.read_data
    xids_seen = 0

    def flaky_read_data(self: PacketEvents) -> bytes:
        """The first connection drops right before the big transaction's commit event."""
        nonlocal xids_seen
        data = read_data(self)
        if len(readers) == 1 and len(data) > 5 and data[0] == 0 and data[5] == 16:  # XID
            xids_seen += 1
            if xids_seen == 2:
                raise pymysql.err.OperationalError(2013, "Lost connection (injected)")
        return data

    monkeypatch.setattr(PacketEvents, "read_data", flaky_read_data)
    monkeypatch.setattr(module, "BinLogStreamReader", FlakyReader)
    _sql(mysql_conn, "CREATE TABLE t (id INT PRIMARY KEY)")
    source = MySQLSource(_options(mariadb, [TableRef(mysql_db, "t")], chunk_rows=5))
    start = source.initial_position()
    _sql(
        mysql_conn,
        "INSERT INTO t VALUES (1)",
        "BEGIN",
        "INSERT INTO t VALUES (10), (11), (12), (13)",
        "INSERT INTO t VALUES (14), (15), (16), (17)",
        "INSERT INTO t VALUES (18), (19), (20), (21)",
        "COMMIT",
        "INSERT INTO t VALUES (2)",
    )
    end = _end(mariadb)
    with structlog.testing.capture_logs() as logs, _Streamer(source, start) as streamer:
        txs = _transactions(streamer.through(end))
    assert len(readers) == 2
    assert [e["event"] for e in logs].count("source_reconnect") == 1
    # The chunks read before the drop are delivered again; nothing is lost, the transaction
    # after the big one arrives once, and only complete transactions carry a position.
    sizes = [(len(tx.changes), tx.position is not None) for tx in txs]
    assert sizes == [
        (1, True),
        (5, False),
        (5, False),
        (5, False),
        (5, False),
        (2, True),
        (1, True),
    ]
    ids = [c.after["id"] for tx in txs for c in tx.changes if c.after]
    big = list(range(10, 22))
    assert ids == [1, *big[:10], *big, 2]
    assert txs[-1].position == end


def test_stream_retries_while_the_server_is_down_until_closed(mysql_db: str) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = MySQLOptions(
        host="127.0.0.1",
        port=port,
        user="cw",
        password="secret-Pw-123",
        server_id=next(_server_ids),
        tables=(TableRef(mysql_db, "t"),),
        connect_timeout_s=1,
        reconnect_max_backoff_s=0.3,
    )
    source = MySQLSource(options)
    with structlog.testing.capture_logs() as logs:
        streamer = _Streamer(source, make_position("binlog.000001", 4, None))
        deadline = time.monotonic() + 10
        while sum(e["event"] == "source_reconnect" for e in logs) < 3:
            assert time.monotonic() < deadline, logs
            time.sleep(0.05)
        streamer.close()
    reconnects = [e for e in logs if e["event"] == "source_reconnect"]
    assert [e["attempt"] for e in reconnects[:3]] == [1, 2, 3]
    assert all(e["error_class"] == "OperationalError" for e in reconnects)
    assert all(e["backoff_s"] <= 0.3 for e in reconnects)
    assert "secret-Pw-123" not in repr(logs)
    down = {r.name: r for r in source.checks()}
    assert not down[CHECK_REACHABLE].ok and all(not r.ok for r in down.values())


def test_connections_share_one_preferred_tls_context(mariadb: MariaDBServer) -> None:
    # No TLS options: pymysql prefers TLS and builds a context per connection from the CA
    # store; ours build it once. Each connection must still work, with or without server TLS.
    settings = {
        "host": mariadb.host,
        "port": mariadb.port,
        "user": mariadb.user,
        "password": mariadb.password,
        "autocommit": True,
    }
    first, second = open_connection(**settings), open_connection(**settings)
    try:
        for conn in (first, second):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        assert getattr(first, "ctx") is getattr(second, "ctx")  # noqa: B009
    finally:
        first.close()
        second.close()
