"""Integration tests of ``connectors.postgres_notify`` against a real Postgres 15.

Every test gets its own database (``pg_db``), so outboxes, triggers and advisory locks of
different tests never meet. ``stream()`` runs on a background thread through ``_Streamer`` and is
stopped with ``close()`` from the test thread, so a hang is a failed deadline rather than a stuck
run. Application writes go through a superuser connection; the source connects with the DSN.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import select
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql
from psycopg.types.json import Json, Jsonb

from connectors.memory import MemoryCheckpointStore, MemorySink
from connectors.postgres_common import PostgresOptions, TextDecoder, connect, table_columns
from connectors.postgres_notify import (
    CHECK_BACKLOG,
    CHECK_OUTBOX,
    CHECK_PRIVILEGES,
    PostgresNotifySource,
    function_name,
    preflight,
    sleep_lock_key,
    trigger_name,
    wait_for_notify,
)
from tests.services import PostgresServer
from worker.errors import SchemaError, SourceMisconfigured
from worker.events import Heartbeat, Op, Position, RowChange, SourceItem, TableRef, Transaction
from worker.rules import KeyTemplate, Rule, RuleSet
from worker.runner import Runner, RunOptions

SCHEMA = "cache_worker"
T = TableRef("app", "t")
NOPK = TableRef("app", "nopk")
TYPES = TableRef("app", "types")
OTHER = TableRef("app", "other")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pg_db(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database ``t_<uuid>`` on the session server, dropped (forcefully) afterwards."""
    if postgres.is_local:
        postgres.start()
    name = f"t_{uuid.uuid4().hex}"
    with postgres.connect() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        if postgres.is_local:
            postgres.start()
        with postgres.connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def db(postgres: PostgresServer, pg_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit superuser connection to the test database with the usual tables."""
    conn = postgres.connect(pg_db)
    conn.execute(
        "CREATE SCHEMA app;"
        "CREATE TABLE app.t (id int PRIMARY KEY, v int, s text);"
        "CREATE TABLE app.nopk (a int, b text);"
        "CREATE TABLE app.other (id int PRIMARY KEY, v int)"
    )
    try:
        yield conn
    finally:
        conn.close()


def _options(
    postgres: PostgresServer, dbname: str, tables: tuple[TableRef, ...] = (T, NOPK), **kw: Any
) -> PostgresOptions:
    settings: dict[str, Any] = {
        "dsn": postgres.dsn(dbname),
        "password": None,
        "tables": tables,
        "name": "test",
        "poll_interval_s": 0.2,
        "reconnect_max_backoff_s": 0.5,
        "connect_timeout_s": 2.0,
        **kw,
    }
    return PostgresOptions(**settings)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _Streamer:
    """Runs ``source.stream(start)`` on a thread and hands items to the test with deadlines."""

    def __init__(self, source: PostgresNotifySource, start: Position | None = None) -> None:
        self.source = source
        self.items: queue.Queue[Any] = queue.Queue()
        begin = start if start is not None else source.initial_position()
        self.thread = threading.Thread(target=self._run, args=(begin,), daemon=True)
        self.thread.start()

    def _run(self, start: Position) -> None:
        try:
            for item in self.source.stream(start):
                self.items.put(item)
        except BaseException as exc:
            self.items.put(_Failed(exc))
        finally:
            self.items.put(_END)

    def next(self, timeout: float = 20.0) -> SourceItem:
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("timed out waiting for the source") from None
        if isinstance(item, _Failed):
            raise item.error
        if item is _END:
            raise AssertionError("the stream ended unexpectedly")
        assert isinstance(item, Transaction | Heartbeat)
        return item

    def transaction(self, timeout: float = 20.0) -> Transaction:
        """The next Transaction, skipping heartbeats."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(0.01, deadline - time.monotonic()))
            if isinstance(item, Transaction):
                return item

    def heartbeat(self, timeout: float = 20.0) -> Heartbeat:
        """The next heartbeat, skipping the "awaiting ack" one that follows every batch."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(0.01, deadline - time.monotonic()))
            assert isinstance(item, Heartbeat), item
            if not item.flush:
                return item

    def changes(self, count: int, ack: bool = True, timeout: float = 30.0) -> list[RowChange]:
        """Exactly ``count`` changes, acknowledging every transaction as it arrives."""
        deadline = time.monotonic() + timeout
        seen: list[RowChange] = []
        while len(seen) < count:
            tx = self.transaction(max(0.01, deadline - time.monotonic()))
            seen.extend(tx.changes)
            if ack:
                assert tx.position is not None
                self.source.ack(tx.position)
        assert len(seen) == count, f"expected {count} changes, got {len(seen)}"
        return seen

    def quiet(self, seconds: float) -> None:
        """Assert that no Transaction arrives for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                item = self.items.get(timeout=remaining)
            except queue.Empty:
                return
            assert not isinstance(item, Transaction), f"unexpected {item}"
            assert not isinstance(item, _Failed), item.error

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


def _source(postgres: PostgresServer, dbname: str, **kw: Any) -> PostgresNotifySource:
    return PostgresNotifySource(_options(postgres, dbname, **kw))


def _setup(postgres: PostgresServer, dbname: str, **kw: Any) -> PostgresNotifySource:
    source = _source(postgres, dbname, **kw)
    source.setup()
    return source


def _outbox_count(conn: psycopg.Connection[Any], schema: str = SCHEMA) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "outbox"))
    ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _wait_asleep(db: psycopg.Connection[Any]) -> None:
    """Until the consumer holds its sleep lock: from then on, writers with rows notify."""
    key = sleep_lock_key(SCHEMA) & 0xFFFFFFFFFFFFFFFF  # pg_locks splits it into two oids
    held = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND mode = 'ExclusiveLock' AND database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database()) AND classid = %s::oid AND objid = %s::oid"
        " AND objsubid = 1"
    )
    args = (key >> 32, key & 0xFFFFFFFF)

    def asleep() -> bool:
        row = db.execute(held, args).fetchone()
        return row is not None and row[0] == 1

    _wait_until(asleep, "the consumer asleep")


def _triggers(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    rows = conn.execute(
        "SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE NOT t.tgisinternal ORDER BY 1, 2, 3"
    ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def _catalog(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What setup may create: schemas, triggers and functions outside the system schemas."""
    schemas = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname = %s", (SCHEMA,)
    ).fetchall()
    functions = conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s ORDER BY 1",
        (SCHEMA,),
    ).fetchall()
    return {
        "schemas": [r[0] for r in schemas],
        "triggers": _triggers(conn),
        "functions": [r[0] for r in functions],
    }


def _same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality that also compares types (1 and 1.0, str and UUID differ).

    Column order must match; key order inside JSON values need not (a json column's keys come
    back in jsonb order, see ``_converter`` in connectors.postgres_notify).
    """
    assert type(a) is type(b), f"{path}: {a!r} ({type(a).__name__}) != {b!r} ({type(b).__name__})"
    if isinstance(a, dict):
        if not path:
            assert list(a) == list(b), f"columns {list(a)} != {list(b)}"
        assert sorted(a) == sorted(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
        if isinstance(a, dt.datetime):
            assert a.tzinfo == b.tzinfo, f"{path}: {a!r} != {b!r}"


def _ops(changes: list[RowChange]) -> list[tuple[Op, Any, Any]]:
    return [(c.op, c.before, c.after) for c in changes]


# --------------------------------------------------------------------------------------------
# setup / teardown
# --------------------------------------------------------------------------------------------


def test_setup_dry_run_executes_nothing_and_setup_is_idempotent(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _source(postgres, pg_db)
    before = _catalog(db)
    planned = source.setup(dry_run=True)
    assert _catalog(db) == before, "dry-run changed the catalog"
    assert planned[0] == f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'
    assert any("FOR EACH ROW" in s and '"app"."t"' in s for s in planned)
    assert any("FOR EACH ROW" in s and '"app"."nopk"' in s for s in planned)

    first = source.setup()
    after_first = _catalog(db)
    second = source.setup()
    assert first == second == planned
    assert _catalog(db) == after_first
    assert after_first["schemas"] == [SCHEMA]
    assert sorted(after_first["functions"]) == sorted([function_name(T), function_name(NOPK)])
    assert after_first["triggers"] == [
        (table, name, trigger_name(SCHEMA, op))
        for table, name in (("app", "nopk"), ("app", "t"))
        for op in ("delete", "insert", "truncate", "update")
    ]
    # Setting up twice must not duplicate captured changes.
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
    assert _outbox_count(db) == 1


def test_setup_of_a_missing_table_is_a_schema_error(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _source(postgres, pg_db, tables=(T, TableRef("app", "missing")))
    with pytest.raises(SchemaError, match=r"app\.missing"):
        source.setup()
    assert _catalog(db)["schemas"] == []


def test_setup_drops_triggers_of_tables_no_longer_in_the_rules(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db, tables=(T, OTHER))
    _setup(postgres, pg_db, tables=(T,))
    catalog = _catalog(db)
    assert not [t for t in catalog["triggers"] if t[1] == "other"]
    assert catalog["functions"] == [function_name(T)]


# What the first released setup installed for app.t: a jsonb outbox and statement-level triggers
# with transition tables (the function abridged to the UPDATE and DELETE paths this test uses).
_V1_SETUP = f"""
CREATE SCHEMA cache_worker;
CREATE TABLE cache_worker.outbox (
  id bigserial PRIMARY KEY,
  txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  op text NOT NULL,
  table_schema text NOT NULL,
  table_name text NOT NULL,
  old jsonb,
  new jsonb,
  created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION cache_worker.{function_name(T)}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    INSERT INTO cache_worker.outbox (op, table_schema, table_name, old, new)
    SELECT CASE WHEN n.id IS NULL THEN 'delete' WHEN o.id IS NULL THEN 'insert' ELSE 'update'
           END, 'app', 't', to_jsonb(o.*), to_jsonb(n.*)
    FROM cache_worker_old AS o FULL JOIN cache_worker_new AS n ON o.id = n.id
    ORDER BY CASE WHEN n.id IS NULL THEN 0 WHEN o.id IS NULL THEN 2 ELSE 1 END;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO cache_worker.outbox (op, table_schema, table_name, old)
    SELECT 'delete', 'app', 't', to_jsonb(o.*) FROM cache_worker_old AS o;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER cache_worker_update AFTER UPDATE ON app.t
  REFERENCING OLD TABLE AS cache_worker_old NEW TABLE AS cache_worker_new
  FOR EACH STATEMENT EXECUTE FUNCTION cache_worker.{function_name(T)}();
CREATE TRIGGER cache_worker_delete AFTER DELETE ON app.t
  REFERENCING OLD TABLE AS cache_worker_old
  FOR EACH STATEMENT EXECUTE FUNCTION cache_worker.{function_name(T)}();
CREATE TRIGGER cache_worker_insert AFTER INSERT ON app.t
  REFERENCING NEW TABLE AS cache_worker_new
  FOR EACH STATEMENT EXECUTE FUNCTION cache_worker.{function_name(T)}();
CREATE TRIGGER cache_worker_truncate AFTER TRUNCATE ON app.t
  FOR EACH STATEMENT EXECUTE FUNCTION cache_worker.{function_name(T)}();
"""


def test_setup_upgrades_statement_triggers_and_a_jsonb_outbox_keeping_its_rows(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a'), (2, 2, 'b')")
    db.execute(_V1_SETUP)
    db.execute("UPDATE app.t SET s = 'a2' WHERE id = 1")  # written by the old trigger, as jsonb
    source = _source(postgres, pg_db, tables=(T,))
    old = {r.name: r for r in source.checks()}[f"triggers {T}"]
    assert old.ok and old.warning and "cache-worker setup" in old.detail
    planned = source.setup(dry_run=True)
    assert any(p.startswith('ALTER TABLE "cache_worker"."outbox" ALTER COLUMN') for p in planned)
    assert source.setup() == planned
    catalog = _catalog(db)
    assert catalog["triggers"] == [
        ("app", "t", trigger_name(SCHEMA, op)) for op in ("delete", "insert", "truncate", "update")
    ]
    # Same names as before, but UPDATE is captured row by row now.
    levels = db.execute(
        "SELECT tgname, (tgtype::int & 1) = 1 FROM pg_trigger "
        "WHERE tgrelid = 'app.t'::regclass AND NOT tgisinternal ORDER BY tgname"
    ).fetchall()
    assert [(str(n).rsplit("_", 1)[1], r) for n, r in levels] == [
        ("delete", False),
        ("insert", False),
        ("truncate", False),
        ("update", True),
    ]
    assert catalog["functions"] == [function_name(T)]
    # CREATE OR REPLACE also dropped the old function's SET search_path.
    config = db.execute(
        "SELECT proconfig FROM pg_proc WHERE proname = %s", (function_name(T),)
    ).fetchone()
    assert config == (None,)
    types = db.execute(
        "SELECT attname, atttypid::regtype::text FROM pg_attribute "
        "WHERE attrelid = 'cache_worker.outbox'::regclass AND attname IN ('old', 'new') "
        "ORDER BY attname"
    ).fetchall()
    assert types == [("new", "json"), ("old", "json")]
    # Upgraded once: setup again has nothing left to convert.
    again = source.setup()
    assert not any("ALTER COLUMN" in p for p in again)
    new = {r.name: r for r in source.checks()}[f"triggers {T}"]
    assert new.ok and not new.warning, new

    db.execute("DELETE FROM app.t WHERE id = 2")  # written by the new trigger
    with _Streamer(source) as streamer:
        changes = streamer.changes(2)
        streamer.heartbeat()
    assert _ops(changes) == [
        (Op.UPDATE, {"id": 1, "v": 1, "s": "a"}, {"id": 1, "v": 1, "s": "a2"}),
        (Op.DELETE, {"id": 2, "v": 2, "s": "b"}, None),
    ]
    assert changes[0].version < changes[1].version
    assert _outbox_count(db) == 0


def test_teardown_removes_triggers_functions_and_schema(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db, tables=(T, NOPK, OTHER))
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
    # Fewer tables than were set up: teardown finds the rest in the catalog.
    source = _source(postgres, pg_db, tables=(T,))
    installed = _catalog(db)
    planned = source.teardown(dry_run=True)
    assert _catalog(db) == installed
    assert planned[-1] == f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'
    assert source.teardown() == planned
    assert _catalog(db) == {"schemas": [], "triggers": [], "functions": []}
    db.execute("INSERT INTO app.t VALUES (2, 2, 'b')")  # the application keeps working
    assert source.teardown() == [f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE']


# --------------------------------------------------------------------------------------------
# changes and values
# --------------------------------------------------------------------------------------------

TYPES_DDL = """
CREATE TYPE app.mood AS ENUM ('happy', 'sad');
CREATE TABLE app.types (
  id int PRIMARY KEY, i int, bi bigint, n numeric(30,10), r real, d double precision,
  b bool, t text, vc varchar(20), by bytea, j json, jb jsonb, da date, ti time,
  ts timestamp, tz timestamptz, u uuid, ia int[], ta text[], m app.mood
)
"""
TYPE_COLUMNS = "id, i, bi, n, r, d, b, t, vc, by, j, jb, da, ti, ts, tz, u, ia, ta, m"


def _type_values(row_id: int) -> dict[str, Any]:
    return {
        "id": row_id,
        "i": -2147483648,
        "bi": 9223372036854775807,
        "n": Decimal("12345678901234567890.1234567890"),
        "r": 0.1,
        "d": 0.1,
        "b": True,
        "t": "tëxt with 'quotes' and \"doubles\"",
        "vc": "varchar",
        "by": b"\x00\xff\\x",
        "j": {"f": 1.0, "a": [1, 2.5, None], "s": "x"},
        "jb": {"k": 1.25, "big": 12345678901234567890, "neg": -0.5},
        "da": dt.date(2024, 2, 29),
        "ti": dt.time(3, 4, 5, 123456),
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5, 678901),
        "tz": dt.datetime(2024, 1, 2, 5, 4, 5, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "ia": [1, None, 3],
        "ta": ["a b", None, 'q"uote', "{}"],
        "m": "sad",
    }


def _expected(values: dict[str, Any]) -> dict[str, Any]:
    """What the source must deliver for ``values``: floats as Postgres stores them, UTC."""
    expected = dict(values)
    if expected.get("tz") is not None:
        expected["tz"] = expected["tz"].astimezone(dt.UTC)
    return expected


def _insert_types(conn: psycopg.Connection[Any], values: dict[str, Any]) -> None:
    params = dict(values)
    if params.get("j") is not None:
        params["j"] = Json(params["j"])
    if params.get("jb") is not None:
        params["jb"] = Jsonb(params["jb"])
    placeholders = ", ".join(
        f"%({c})s::app.mood" if c == "m" else f"%({c})s::real" if c == "r" else f"%({c})s"
        for c in params
    )
    conn.execute(f"INSERT INTO app.types ({', '.join(params)}) VALUES ({placeholders})", params)


def _logical_row(options: PostgresOptions, row_id: int) -> dict[str, Any]:
    """The row as the logical source would decode it: each column's text form, TextDecoder."""
    conn = connect(options)
    try:
        columns = table_columns(conn, TYPES)
        assert columns is not None
        decoder = TextDecoder(conn)
        select = sql.SQL("SELECT {} FROM app.types WHERE id = %s").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in columns)
        )
        row = conn.execute(select, (row_id,)).fetchone()
        assert row is not None
        return {c.name: decoder.decode(c.type_oid, v) for c, v in zip(columns, row, strict=True)}
    finally:
        conn.close()


def test_type_matrix_insert_update_delete(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    db.execute(TYPES_DDL)
    # The application's session time zone must not matter.
    db.execute("SET TimeZone = 'America/New_York'")
    source = _setup(postgres, pg_db, tables=(TYPES,))
    values = _type_values(1)
    nulls = {c.strip(): None for c in TYPE_COLUMNS.split(",")} | {"id": 2}
    _insert_types(db, values)
    _insert_types(db, nulls)
    db.execute("UPDATE app.types SET n = 0.5, m = 'happy', ia = '{}' WHERE id = 1")
    db.execute("DELETE FROM app.types WHERE id = 1")

    with _Streamer(source) as streamer:
        inserted, inserted_nulls, updated, deleted = streamer.changes(4)

    expected = _expected(values)
    assert (inserted.op, inserted.before) == (Op.INSERT, None)
    assert inserted.after is not None
    _same(inserted.after, expected)
    assert list(inserted.after) == [c.strip() for c in TYPE_COLUMNS.split(",")]
    _same(inserted_nulls.after, nulls)

    assert updated.op is Op.UPDATE
    _same(updated.before, expected)
    changed = expected | {"n": Decimal("0.5000000000"), "m": "happy", "ia": []}
    _same(updated.after, changed)
    assert deleted.op is Op.DELETE and deleted.after is None
    _same(deleted.before, changed)
    assert inserted.version < inserted_nulls.version < updated.version < deleted.version

    # Exactly what the logical source decodes from the text forms of the same row.
    _insert_types(db, _type_values(3))
    with _Streamer(_source(postgres, pg_db, tables=(TYPES,))) as streamer:
        (again,) = streamer.changes(1)
    _same(again.after, _logical_row(source.options, 3))


def test_rows_carry_the_columns_the_rules_read_and_the_primary_key(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    db.execute(TYPES_DDL)
    keep = frozenset({"n", "ts", "m"})
    source = _setup(postgres, pg_db, tables=(TYPES,), columns={TYPES: keep})
    values = _type_values(1)
    _insert_types(db, values)
    db.execute("UPDATE app.types SET n = 0.5, t = 'unread' WHERE id = 1")
    with _Streamer(source) as streamer:
        inserted, updated = streamer.changes(2)
    expected = _expected(values)
    cut = {c: expected[c] for c in ("id", "n", "ts", "m")}
    _same(inserted.after, cut)
    _same(updated.before, cut)
    _same(updated.after, cut | {"n": Decimal("0.5000000000")})

    # A rule column the table lacks: every column, so the rules report the missing one.
    _insert_types(db, _type_values(2))
    lacking = _source(postgres, pg_db, tables=(TYPES,), columns={TYPES: keep | {"gone"}})
    with _Streamer(lacking) as streamer:
        (again,) = streamer.changes(1)
    _same(again.after, _expected(_type_values(2)))


def test_multi_statement_transaction_is_one_transaction_in_order(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a'), (2, 2, 'b')")
    source = _setup(postgres, pg_db)
    with db.transaction():
        db.execute("INSERT INTO app.t VALUES (3, 3, 'c')")
        db.execute("UPDATE app.t SET v = 10 WHERE id = 1")
        db.execute("DELETE FROM app.t WHERE id = 2")
        db.execute("INSERT INTO app.nopk VALUES (1, 'x')")
    db.execute("UPDATE app.t SET s = 'z' WHERE id = 3")

    with _Streamer(source) as streamer:
        first = streamer.transaction()
        second = streamer.transaction()
        assert first.position is not None and second.position is not None
        source.ack(second.position)
        streamer.heartbeat()
    assert _ops(first.changes) == [
        (Op.INSERT, None, {"id": 3, "v": 3, "s": "c"}),
        (Op.UPDATE, {"id": 1, "v": 1, "s": "a"}, {"id": 1, "v": 10, "s": "a"}),
        (Op.DELETE, {"id": 2, "v": 2, "s": "b"}, None),
        (Op.INSERT, None, {"a": 1, "b": "x"}),
    ]
    assert [c.table for c in first.changes] == [T, T, T, NOPK]
    assert _ops(second.changes) == [
        (Op.UPDATE, {"id": 3, "v": 3, "s": "c"}, {"id": 3, "v": 3, "s": "z"})
    ]
    assert first.position < second.position
    assert first.position.coords["id"] == first.changes[-1].version
    assert first.committed_at is not None and abs(first.committed_at - time.time()) < 60


def test_interleaved_transactions_are_grouped_by_transaction(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db)
    other = postgres.connect(pg_db)
    try:
        db.execute("BEGIN")
        other.execute("BEGIN")
        db.execute("INSERT INTO app.t VALUES (1, 1, 'first')")
        other.execute("INSERT INTO app.t VALUES (2, 2, 'second')")
        db.execute("INSERT INTO app.t VALUES (3, 3, 'first')")
        other.execute("COMMIT")
        db.execute("COMMIT")
    finally:
        other.close()
    with _Streamer(source) as streamer:
        a = streamer.transaction()
        b = streamer.transaction()
        assert b.position is not None
        source.ack(b.position)
    assert [c.after["id"] for c in a.changes if c.after] == [2]
    assert [c.after["id"] for c in b.changes if c.after] == [1, 3]
    assert a.position is not None and a.position < b.position


def test_primary_key_change_is_delete_plus_insert(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    # DEFERRABLE (checked at statement end) so one statement can shift keys onto each other.
    db.execute("ALTER TABLE app.t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (id) DEFERRABLE")
    db.execute("INSERT INTO app.t SELECT g, g, 'r' || g FROM generate_series(1, 3) g")
    source = _setup(postgres, pg_db)
    db.execute("UPDATE app.t SET id = 100 WHERE id = 1")
    # One statement: old rows 2, 3 and new rows 3, 4 (ids shifted, values moved along).
    db.execute("UPDATE app.t SET id = id + 1, v = v * 10 WHERE id IN (2, 3)")
    with _Streamer(source) as streamer:
        moved = streamer.changes(2)
        shifted = streamer.changes(4)
    assert _ops(moved) == [
        (Op.DELETE, {"id": 1, "v": 1, "s": "r1"}, None),
        (Op.INSERT, None, {"id": 100, "v": 1, "s": "r1"}),
    ]
    assert moved[0].version == moved[1].version
    # Each physical row in turn: its old key deleted, its new key inserted. Applied in order
    # this never leaves a stale value: a key vacated and taken again within the statement (3)
    # ends either with its final row or evicted, depending on which row moved first.
    pairs = [tuple(_ops(shifted[i : i + 2])) for i in (0, 2)]
    assert sorted(pairs, key=str) == sorted(
        [
            (
                (Op.DELETE, {"id": 2, "v": 2, "s": "r2"}, None),
                (Op.INSERT, None, {"id": 3, "v": 20, "s": "r2"}),
            ),
            (
                (Op.DELETE, {"id": 3, "v": 3, "s": "r3"}, None),
                (Op.INSERT, None, {"id": 4, "v": 30, "s": "r3"}),
            ),
        ],
        key=str,
    )
    final = {row[0]: row for row in db.execute("SELECT id, v, s FROM app.t").fetchall()}
    cache: dict[int, Any] = {}
    for change in moved + shifted:
        if change.op is Op.DELETE and change.before is not None:
            cache.pop(change.before["id"], None)
        elif change.after is not None:
            cache[change.after["id"]] = change.after
    for key, row in cache.items():
        assert (row["id"], row["v"], row["s"]) == final[key], f"stale value for key {key}"


def test_table_without_primary_key_is_captured(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db)
    db.execute("INSERT INTO app.nopk VALUES (1, 'a'), (2, 'b')")
    db.execute("UPDATE app.nopk SET b = b || '!'")
    db.execute("DELETE FROM app.nopk WHERE a = 1")
    db.execute("TRUNCATE app.nopk, app.t")
    with _Streamer(source) as streamer:
        changes = streamer.changes(7)
    assert _ops(changes[:5]) == [
        (Op.INSERT, None, {"a": 1, "b": "a"}),
        (Op.INSERT, None, {"a": 2, "b": "b"}),
        (Op.UPDATE, {"a": 1, "b": "a"}, {"a": 1, "b": "a!"}),
        (Op.UPDATE, {"a": 2, "b": "b"}, {"a": 2, "b": "b!"}),
        (Op.DELETE, {"a": 1, "b": "a!"}, None),
    ]
    assert sorted((c.op.value, str(c.table)) for c in changes[5:]) == [
        ("truncate", "app.nopk"),
        ("truncate", "app.t"),
    ]


def test_bulk_update_is_captured_row_by_row_in_one_transaction_and_consumed_fully(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    db.execute("INSERT INTO app.t SELECT g, g, 's' FROM generate_series(1, 10000) g")
    source = _setup(postgres, pg_db, outbox_batch=1000)
    fn = f"{SCHEMA}.{function_name(T)}"
    listener = postgres.connect(pg_db)
    try:
        listener.execute(f"LISTEN {SCHEMA}")
        began = time.monotonic()
        with db.transaction():
            db.execute("SET LOCAL track_functions = 'pl'")
            db.execute("UPDATE app.t SET v = v + 1")
            row = db.execute(
                "SELECT pg_stat_get_xact_function_calls(%s::regproc)", (fn,)
            ).fetchone()
        updated = time.monotonic() - began
        # Nobody holds the sleep lock: every row gets it shared (the first from the lock
        # manager, the rest from the backend's own lock table) and none notifies.
        assert list(listener.notifies(timeout=0.5)) == []
    finally:
        listener.close()
    assert row is not None and row[0] == 10000, "not one trigger call per row"
    counted = db.execute(
        f"SELECT count(*), count(DISTINCT txid), min(op), max(op) FROM {SCHEMA}.outbox"
    ).fetchone()
    assert counted == (10000, 1, "update", "update")

    began = time.monotonic()
    with _Streamer(source) as streamer:
        changes = streamer.changes(10000, timeout=120)
        elapsed = time.monotonic() - began
        streamer.heartbeat()
    assert [c.after["id"] for c in changes if c.after] == list(range(1, 10001))
    assert all(c.op is Op.UPDATE and c.before and c.after for c in changes)
    assert all(c.after["v"] == c.before["v"] + 1 for c in changes if c.after and c.before)
    assert _outbox_count(db) == 0
    print(
        f"\nupdated 10000 rows with capture in {updated:.2f}s; "
        f"consumed them in {elapsed:.2f}s ({10000 / elapsed:.0f} rows/s)"
    )


def _calls(db: psycopg.Connection[Any], statement: str) -> int:
    """How many times the capture function of app.t ran for ``statement``."""
    query = "SELECT coalesce(pg_stat_get_xact_function_calls(%s::regproc), 0)"
    fn = (f"{SCHEMA}.{function_name(T)}",)
    with db.transaction():
        # Counts not yet flushed from earlier transactions show here too: take the difference.
        db.execute("SET LOCAL track_functions = 'pl'")
        before = db.execute(query, fn).fetchone()
        db.execute(statement)
        after = db.execute(query, fn).fetchone()
    assert before is not None and after is not None
    return int(after[0]) - int(before[0])


def test_bulk_insert_and_delete_are_one_trigger_call_each_and_empty_ones_write_nothing(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db, outbox_batch=1000)
    assert (
        _calls(db, "INSERT INTO app.t SELECT g, g, 's' || g FROM generate_series(1, 5000) g") == 1
    )
    assert _calls(db, "DELETE FROM app.t WHERE id % 2 = 0") == 1
    listener = postgres.connect(pg_db)
    try:
        listener.execute(f"LISTEN {SCHEMA}")
        assert _calls(db, "DELETE FROM app.t WHERE id < 0") == 1
        assert _calls(db, "INSERT INTO app.t SELECT 1, 1, 'x' WHERE false") == 1
        with _Streamer(source) as streamer:
            changes = streamer.changes(7500)
            streamer.heartbeat()
            _wait_asleep(db)  # a statement with rows would notify now
            for _ in listener.notifies(timeout=0):
                pass
            assert _calls(db, "DELETE FROM app.t WHERE id < 0") == 1
            assert list(listener.notifies(timeout=0.5)) == [], "an empty statement notified"
            streamer.quiet(0.3)
    finally:
        listener.close()
    inserted, deleted = changes[:5000], changes[5000:]
    assert [(c.op, c.after["id"] if c.after else None) for c in inserted] == [
        (Op.INSERT, i) for i in range(1, 5001)
    ]
    assert [(c.op, c.before["id"] if c.before else None) for c in deleted] == [
        (Op.DELETE, i) for i in range(2, 5001, 2)
    ]
    assert deleted[0].before == {"id": 2, "v": 2, "s": "s2"}
    assert len({c.version for c in changes}) == 7500
    assert _outbox_count(db) == 0


def test_partitioned_table_captures_rows_moving_between_partitions(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    """An UPDATE that moves a row to another partition fires neither UPDATE row triggers nor
    INSERT/DELETE statement triggers, only the partitions' DELETE and INSERT row triggers:
    a partitioned table is captured row by row for all three operations."""
    part = TableRef("app", "part")
    db.execute(
        "CREATE TABLE app.part (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY LIST (k);"
        "CREATE TABLE app.part1 PARTITION OF app.part FOR VALUES IN (1);"
        "CREATE TABLE app.part2 PARTITION OF app.part FOR VALUES IN (2)"
    )
    source = _setup(postgres, pg_db, tables=(part,))
    assert [t for t in _triggers(db) if t[1] == "part"] == [
        ("app", "part", trigger_name(SCHEMA, "row")),
        ("app", "part", trigger_name(SCHEMA, "truncate")),
    ]
    checks = {r.name: r for r in source.checks()}
    assert checks[f"triggers {part}"].ok and not checks[f"triggers {part}"].warning
    db.execute("INSERT INTO app.part VALUES (1, 1, 'a'), (2, 1, 'b')")
    db.execute("UPDATE app.part SET v = 'b2' WHERE id = 2")
    db.execute("UPDATE app.part SET k = 2 WHERE id = 1")
    db.execute("DELETE FROM app.part WHERE id = 2")
    with _Streamer(source) as streamer:
        changes = streamer.changes(6)
    assert _ops(changes) == [
        (Op.INSERT, None, {"id": 1, "k": 1, "v": "a"}),
        (Op.INSERT, None, {"id": 2, "k": 1, "v": "b"}),
        (Op.UPDATE, {"id": 2, "k": 1, "v": "b"}, {"id": 2, "k": 1, "v": "b2"}),
        (Op.DELETE, {"id": 1, "k": 1, "v": "a"}, None),
        (Op.INSERT, None, {"id": 1, "k": 2, "v": "a"}),
        (Op.DELETE, {"id": 2, "k": 1, "v": "b2"}, None),
    ]
    assert {c.table for c in changes} == {part}


def test_new_column_after_ddl_is_decoded_with_its_type(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db)
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
    with _Streamer(source) as streamer:
        streamer.changes(1)
        db.execute("ALTER TABLE app.t ADD COLUMN price numeric(10,2)")
        db.execute("INSERT INTO app.t VALUES (2, 2, 'b', 1.50)")
        (change,) = streamer.changes(1)
    _same(change.after, {"id": 2, "v": 2, "s": "b", "price": Decimal("1.50")})


def test_rows_of_tables_outside_the_rules_are_skipped_and_deleted(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db, tables=(T, OTHER))
    source = _source(postgres, pg_db, tables=(T,))
    db.execute("INSERT INTO app.other VALUES (1, 1)")
    with _Streamer(source) as streamer:
        # A batch of only irrelevant rows needs no acknowledgement.
        streamer.heartbeat()
        _wait_until(lambda: _outbox_count(db) == 0, "irrelevant rows deleted")
        with db.transaction():
            db.execute("INSERT INTO app.other VALUES (2, 2)")
            db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
        (change,) = streamer.changes(1)
        assert change.table == T
        _wait_until(lambda: _outbox_count(db) == 0, "mixed batch deleted")


# --------------------------------------------------------------------------------------------
# durability, acknowledgement, locking
# --------------------------------------------------------------------------------------------


def test_rows_written_while_no_worker_runs_are_consumed_when_it_starts(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db)
    for i in range(1, 51):
        db.execute("INSERT INTO app.t VALUES (%s, %s, 'offline')", (i, i))
    assert _outbox_count(db) == 50
    with _Streamer(source) as streamer:
        changes = streamer.changes(50)
        streamer.heartbeat()
    assert [c.after["id"] for c in changes if c.after] == list(range(1, 51))
    assert _outbox_count(db) == 0


def test_rows_are_deleted_only_after_ack_and_replayed_after_a_crash(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db)
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
    db.execute("INSERT INTO app.t VALUES (2, 2, 'b')")
    first = _source(postgres, pg_db)
    streamer = _Streamer(first)
    try:
        a = streamer.transaction()
        b = streamer.transaction()
        assert a.position is not None and b.position is not None
        # Acknowledging part of the batch deletes nothing: the batch is deleted as a whole.
        first.ack(a.position)
        streamer.quiet(0.5)
        assert _outbox_count(db) == 2
        # The unacknowledged rows are locked by the consumer's open transaction.
        with db.transaction():
            free = db.execute(f"SELECT id FROM {SCHEMA}.outbox FOR UPDATE SKIP LOCKED").fetchall()
        assert free == []
    finally:
        streamer.close()  # the consumer goes away before the ack: a crash, as far as rows go
    assert _outbox_count(db) == 2

    second = _source(postgres, pg_db)
    with _Streamer(second) as streamer:
        again = streamer.changes(2, ack=False)
        assert [c.version for c in again] == [a.changes[0].version, b.changes[0].version]
        assert _ops(again) == _ops(a.changes + b.changes)
        position = Position(10**12, {"id": again[-1].version})
        second.ack(position)
        _wait_until(lambda: _outbox_count(db) == 0, "acknowledged rows deleted")


def _insert_each(db: psycopg.Connection[Any], ids: range) -> None:
    """One INSERT per transaction (db is autocommit)."""
    for i in ids:
        db.execute("INSERT INTO app.t VALUES (%s, %s, 'x')", (i, i))


def _ids(transactions: list[Transaction]) -> list[int]:
    return [c.after["id"] for t in transactions for c in t.changes if c.after]


def _free_ids(db: psycopg.Connection[Any]) -> list[int]:
    """Outbox rows nobody holds locked, by the id of the row they captured."""
    with db.transaction():
        rows = db.execute(
            f"SELECT (new->>'id')::int FROM {SCHEMA}.outbox ORDER BY id FOR UPDATE SKIP LOCKED"
        ).fetchall()
    return [int(r[0]) for r in rows]


def test_full_batches_are_read_ahead_two_unacked_at_most_and_deleted_when_the_chain_ends(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db)
    _insert_each(db, range(1, 36))
    first = _source(postgres, pg_db, outbox_batch=10)
    streamer = _Streamer(first)
    try:
        # The second batch arrives without an ack of the first, the third waits for one.
        got = [streamer.transaction() for _ in range(20)]
        assert _ids(got) == list(range(1, 21))
        streamer.quiet(0.5)
        assert _free_ids(db) == list(range(21, 36))
        first.ack(got[9].position)  # type: ignore[arg-type]
        more = [streamer.transaction() for _ in range(10)]
        assert _ids(more) == list(range(21, 31))
        # The acked batch is deleted in the chain's transaction, not committed yet.
        assert _outbox_count(db) == 35
        assert _free_ids(db) == list(range(31, 36))
    finally:
        streamer.close()  # gone mid-chain: everything comes again, the acked batch included
    assert _outbox_count(db) == 35

    second = _source(postgres, pg_db, outbox_batch=10)
    with _Streamer(second) as streamer:
        replay = streamer.changes(35)  # acking each as it comes
        assert [c.after["id"] for c in replay if c.after] == list(range(1, 36))
        _wait_until(lambda: _outbox_count(db) == 0, "the chain's rows deleted")
        streamer.heartbeat()


def test_rows_committed_behind_a_chain_are_read_by_the_next_one(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db, outbox_batch=10)
    late = postgres.connect(pg_db)
    try:
        late.execute("BEGIN")
        late.execute("INSERT INTO app.t VALUES (100, 100, 'late')")  # the lowest outbox id
        _insert_each(db, range(1, 26))
        with _Streamer(source) as streamer:
            got = [streamer.transaction() for _ in range(20)]  # two batches, nothing acked
            late.execute("COMMIT")  # while the chain reads ahead, above its ids
            for tx in got:
                assert tx.position is not None
                source.ack(tx.position)
            rest = streamer.changes(5)
            assert _ids(got) + [c.after["id"] for c in rest if c.after] == list(range(1, 26))
            # The chain ended with a short batch; the next starts from the lowest id.
            assert [c.after for c in streamer.changes(1)] == [{"id": 100, "v": 100, "s": "late"}]
            _wait_until(lambda: _outbox_count(db) == 0, "every row deleted")
    finally:
        late.close()


def test_killed_consumer_connection_is_reconnected_and_batch_replayed(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db)
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
    with structlog.testing.capture_logs() as logs, _Streamer(source) as streamer:
        tx = streamer.transaction()
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = 'cache-worker:test'"
        )
        # The run loop acks late (after the connection died): nothing is deleted, the new
        # connection reads the batch again and the ack of the replay deletes it.
        assert tx.position is not None
        source.ack(tx.position)
        replay = streamer.transaction()
        assert replay.changes == tx.changes
        assert replay.position is not None and replay.position > tx.position
        source.ack(replay.position)
        _wait_until(lambda: _outbox_count(db) == 0, "replayed batch deleted")
    assert any(e["event"] == "source_reconnect" for e in logs)


def test_only_one_source_consumes_and_the_other_takes_over(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db)
    first = _source(postgres, pg_db)
    second = _source(postgres, pg_db)
    with structlog.testing.capture_logs() as logs:
        one = _Streamer(first)
        one.heartbeat()  # consuming (it holds the lock) before the second starts
        two = _Streamer(second)
        try:
            _wait_until(lambda: any(e["event"] == "outbox_standby" for e in logs), "outbox_standby")
            db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
            assert _ops(one.changes(1)) == [(Op.INSERT, None, {"id": 1, "v": 1, "s": "a"})]
            db.execute("INSERT INTO app.t VALUES (2, 2, 'b')")
            pending = one.transaction()  # received but never acknowledged
            two.quiet(1.5)
            one.close()
            # The second takes over, re-reads the unacknowledged row, then continues.
            taken = two.changes(1)
            assert _ops(taken) == _ops(pending.changes)
            db.execute("INSERT INTO app.t VALUES (3, 3, 'c')")
            assert [c.after["id"] for c in two.changes(1) if c.after] == [3]
        finally:
            two.close()
            if one.thread.is_alive():
                one.close()
    assert sum(1 for e in logs if e["event"] == "outbox_standby") == 1
    assert any(e["event"] == "outbox_consumer" and e["took_over"] for e in logs)


def test_close_ends_a_stream_waiting_for_ack_or_idle(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db, poll_interval_s=30.0)
    with _Streamer(source) as idle:
        idle.heartbeat()
    db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
    source = _source(postgres, pg_db, poll_interval_s=30.0)
    with _Streamer(source) as waiting:
        waiting.transaction()
    assert _outbox_count(db) == 1


# --------------------------------------------------------------------------------------------
# waking up: NOTIFY and polling
# --------------------------------------------------------------------------------------------


def test_notify_wakes_the_consumer_without_waiting_for_the_poll(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db, poll_interval_s=30.0)
    latencies: list[float] = []
    with _Streamer(source) as streamer:
        streamer.heartbeat()
        for i in range(1, 21):
            began = time.monotonic()
            db.execute("INSERT INTO app.t VALUES (%s, 0, 'n')", (i,))
            tx = streamer.transaction(timeout=10.0)  # well below the 30 s poll interval
            latencies.append(time.monotonic() - began)
            assert tx.position is not None
            source.ack(tx.position)
            streamer.heartbeat(timeout=10.0)  # idle again before the next insert
    print(
        f"\nNOTIFY latency commit->yield over {len(latencies)} inserts: "
        f"median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )


def test_writers_skip_notify_while_the_consumer_is_awake_without_losing_wakeups(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db, poll_interval_s=30.0)
    listener = postgres.connect(pg_db)
    writer = postgres.connect(pg_db)
    try:
        listener.execute(f"LISTEN {SCHEMA}")
        with _Streamer(source) as streamer:
            streamer.heartbeat()
            _wait_asleep(db)
            db.execute("INSERT INTO app.t VALUES (1, 1, 'wakes')")
            first = streamer.transaction(timeout=10.0)
            assert len(list(listener.notifies(timeout=2.0, stop_after=1))) == 1
            # The consumer is awake (waiting for the ack): this writer skips its NOTIFY and
            # keeps its transaction open while the consumer tries to go to sleep.
            writer.execute("BEGIN")
            writer.execute("INSERT INTO app.t VALUES (2, 2, 'silent')")
            assert first.position is not None
            source.ack(first.position)
            streamer.heartbeat(timeout=10.0)
            time.sleep(1.2)  # the consumer's sleep-lock wait times out at least once
            writer.execute("COMMIT")
            began = time.monotonic()
            second = streamer.transaction(timeout=10.0)  # far below the 30 s poll
            latency = time.monotonic() - began
            assert [c.after for c in second.changes] == [{"id": 2, "v": 2, "s": "silent"}]
            assert list(listener.notifies(timeout=0.5)) == [], "the busy-time writer notified"
            print(f"\nwake-up after a skipped NOTIFY: {latency * 1000:.1f} ms")
    finally:
        listener.close()
        writer.close()


def test_poll_interval_finds_rows_without_notify(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db, channel="cw_notified")
    # The consumer listens on another channel, so only its poll can find the rows.
    source = _source(postgres, pg_db, channel="cw_elsewhere", poll_interval_s=0.3)
    with _Streamer(source) as streamer:
        streamer.heartbeat()
        db.execute("INSERT INTO app.t VALUES (1, 1, 'polled')")
        assert [c.after for c in streamer.changes(1, timeout=5.0)] == [
            {"id": 1, "v": 1, "s": "polled"}
        ]


def _parse_without_handing_on(
    conn: psycopg.Connection[Any], sender: psycopg.Connection[Any]
) -> None:
    """Leave a NOTIFY parsed inside libpq but not handed on to psycopg, with nothing more on the
    socket: the state a pipeline's last read can leave behind (see ``wait_for_notify``)."""
    sender.execute(sql.SQL("NOTIFY {}").format(sql.Identifier(SCHEMA)))
    readable, _, _ = select.select([conn.fileno()], [], [], 10.0)
    assert readable, "the NOTIFY never reached the listening connection"
    conn.pgconn.consume_input()
    conn.pgconn.is_busy()  # parses what consume_input read, the NotificationResponse included
    assert select.select([conn.fileno()], [], [], 0.0)[0] == [], "more came than the NOTIFY"


def test_a_notification_libpq_already_parsed_still_wakes(
    postgres: PostgresServer, pg_db: str
) -> None:
    listener = postgres.connect(pg_db)
    sender = postgres.connect(pg_db)
    try:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(SCHEMA)))
        _parse_without_handing_on(listener, sender)
        # Waiting on the socket alone would time out here: nothing more arrives.
        assert wait_for_notify(listener, 10.0)
        assert not wait_for_notify(listener, 0.2), "the same notification woke twice"
        sender.execute(sql.SQL("NOTIFY {}").format(sql.Identifier(SCHEMA)))
        assert wait_for_notify(listener, 10.0)
    finally:
        listener.close()
        sender.close()


def test_server_restart_mid_stream_loses_nothing(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    if not postgres.is_local:
        pytest.skip("needs a Postgres started by tests/services.py to restart it")
    source = _setup(postgres, pg_db)
    for i in range(1, 4):
        db.execute("INSERT INTO app.t VALUES (%s, %s, 'before')", (i, i))
    seen: list[int] = []
    with structlog.testing.capture_logs() as logs, _Streamer(source) as streamer:
        for _ in range(3):
            tx = streamer.transaction()
            seen.extend(c.after["id"] for c in tx.changes if c.after)
        postgres.restart()
        # The run loop acks what it applied; the connection died before the batch's DELETE, so
        # the batch comes again on the new connection.
        assert tx.position is not None
        source.ack(tx.position)
        writer = postgres.connect(pg_db)
        try:
            for i in range(4, 7):
                writer.execute("INSERT INTO app.t VALUES (%s, %s, 'after')", (i, i))
            got = streamer.changes(6, timeout=60)
            streamer.heartbeat()
            assert _outbox_count(writer) == 0
        finally:
            writer.close()
    assert sorted(seen) == [1, 2, 3]
    assert [c.after["id"] for c in got if c.after] == [1, 2, 3, 4, 5, 6]
    assert any(e["event"] == "source_reconnect" for e in logs)


# --------------------------------------------------------------------------------------------
# the run loop, checks, preflight
# --------------------------------------------------------------------------------------------


def _runner(
    source: PostgresNotifySource, store: MemoryCheckpointStore
) -> tuple[Runner, MemorySink]:
    sink = MemorySink()
    rules = RuleSet([Rule("t", T, (KeyTemplate.parse("t:{id}"),), jitter=0.0)])
    options = RunOptions(until_idle=True, batch_max_delay_s=0.001, progress_interval_s=3600)
    runner = Runner(source, sink, store, rules, options, describe_position=source.describe_position)
    return runner, sink


def test_run_loop_consumes_until_idle_even_behind_a_newer_checkpoint(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db)
    db.execute("INSERT INTO app.t SELECT g, g, 'x' FROM generate_series(1, 5) g")
    db.execute("UPDATE app.t SET s = 'y' WHERE id = 5")
    store = MemoryCheckpointStore()
    runner, sink = _runner(_source(postgres, pg_db), store)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the run loop did not finish"
    assert json.loads(str(sink.values["t:5"])) == {"id": 5, "v": 5, "s": "y"}
    assert len(sink.values) == 5
    assert _outbox_count(db) == 0
    assert store.position is not None and store.position.version >= 6

    # A checkpoint far ahead of the outbox ids (a batch replayed after a crash, or ids that
    # committed late): the source's positions must still be newer, or nothing is ever acked.
    db.execute("UPDATE app.t SET s = 'z' WHERE id = 1")
    store = MemoryCheckpointStore(position=Position(10**9, {"id": 10**9}))
    runner, sink = _runner(_source(postgres, pg_db), store)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the run loop did not finish behind a newer checkpoint"
    assert json.loads(str(sink.values["t:1"])) == {"id": 1, "v": 1, "s": "z"}
    assert _outbox_count(db) == 0
    assert store.position is not None and store.position.version > 10**9


def test_checks_and_preflight_fail_without_setup_or_triggers(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _source(postgres, pg_db)
    results = {r.name: r for r in source.checks()}
    assert results["postgres reachable"].ok
    assert not results[CHECK_OUTBOX].ok and "cache-worker setup" in results[CHECK_OUTBOX].detail
    assert not results[f"triggers {T}"].ok
    assert "cache-worker setup" in results[f"triggers {T}"].detail
    with pytest.raises(SourceMisconfigured, match="cache-worker setup"):
        preflight(source.options)

    source.setup()
    results = {r.name: r for r in source.checks()}
    assert all(r.ok and not r.warning for r in results.values()), results
    assert set(results) == {
        "postgres reachable",
        CHECK_OUTBOX,
        f"triggers {T}",
        f"triggers {NOPK}",
        CHECK_BACKLOG,
        CHECK_PRIVILEGES,
    }
    preflight(source.options)

    db.execute(f'DROP TRIGGER "{trigger_name(SCHEMA, "update")}" ON app.t')
    results = {r.name: r for r in source.checks()}
    assert not results[f"triggers {T}"].ok
    assert "cache-worker setup" in results[f"triggers {T}"].detail
    assert results[f"triggers {NOPK}"].ok
    with pytest.raises(SourceMisconfigured, match=r"triggers app\.t"):
        preflight(source.options)

    source.setup()
    db.execute(f'ALTER TABLE app.nopk DISABLE TRIGGER "{trigger_name(SCHEMA, "delete")}"')
    results = {r.name: r for r in source.checks()}
    assert not results[f"triggers {NOPK}"].ok and "disabled" in results[f"triggers {NOPK}"].detail
    source.close()


def test_backlog_is_reported_and_warned(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    source = _setup(postgres, pg_db, outbox_batch=1)
    assert source.outbox_backlog() == (0, None)
    assert source.progress_fields() == {"outbox_backlog": 0, "outbox_oldest_s": None}
    for i in range(11):
        db.execute("INSERT INTO app.t VALUES (%s, 0, 'x')", (i,))
    count, age = source.outbox_backlog()
    assert count == 11 and age is not None and 0 <= age < 60
    # The progress event's cheap figure: the waiting id range (exact without rollbacks).
    fields = source.progress_fields()
    assert fields["outbox_backlog"] == 11
    assert isinstance(fields["outbox_oldest_s"], float) and 0 <= fields["outbox_oldest_s"] < 60
    backlog = {r.name: r for r in source.checks()}[CHECK_BACKLOG]
    assert backlog.ok and backlog.warning and "11 row(s)" in backlog.detail
    source.close()


def test_privileges_check_names_the_grant_and_passwords_stay_out(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    _setup(postgres, pg_db)
    role = f"cw_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), password))
    try:
        base = _options(postgres, pg_db)
        dsn = re.sub(r"//[^@]*@", f"//{role}@", base.dsn)
        options = replace(base, dsn=dsn, password=password)
        results = {r.name: r for r in PostgresNotifySource(options).checks()}
        privileges = results[CHECK_PRIVILEGES]
        assert not privileges.ok
        assert f"GRANT USAGE ON SCHEMA {SCHEMA} TO {role}" in privileges.detail
        assert "GRANT SELECT, UPDATE, DELETE" in privileges.detail

        db.execute(
            sql.SQL(
                "GRANT USAGE ON SCHEMA {s} TO {r}; GRANT SELECT, UPDATE, DELETE ON {o} TO {r}"
            ).format(
                s=sql.Identifier(SCHEMA),
                o=sql.Identifier(SCHEMA, "outbox"),
                r=sql.Identifier(role),
            )
        )
        results = {r.name: r for r in PostgresNotifySource(options).checks()}
        assert results[CHECK_PRIVILEGES].ok, results[CHECK_PRIVILEGES]
        # The unprivileged consumer works: the triggers write as their owner.
        db.execute("INSERT INTO app.t VALUES (1, 1, 'a')")
        with _Streamer(PostgresNotifySource(options)) as streamer:
            assert len(streamer.changes(1)) == 1

        wrong = replace(options, password=password + "-wrong")
        checks = PostgresNotifySource(wrong).checks()
        assert not checks[0].ok
        assert all(password not in r.detail for r in checks)
        with pytest.raises(SourceMisconfigured) as raised:
            preflight(wrong)
        assert password not in str(raised.value)
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_capture_runs_as_its_owner_whatever_search_path_the_writer_sets(
    postgres: PostgresServer, pg_db: str, db: psycopg.Connection[Any]
) -> None:
    """The capture function is SECURITY DEFINER without a pinned search_path: a writer that puts
    a schema of its own first (even before pg_catalog) must not get any of its functions or
    tables used with the owner's rights, nor change what is captured."""
    source = _setup(postgres, pg_db, tables=(T,))
    role = f"cw_{uuid.uuid4().hex[:10]}"
    db.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        db.execute(
            sql.SQL(
                "GRANT USAGE ON SCHEMA app TO {r}; "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON app.t TO {r}; "
                "CREATE SCHEMA evil AUTHORIZATION {r}"
            ).format(r=sql.Identifier(role))
        )
        with db.transaction():
            db.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            trap = "BEGIN RAISE EXCEPTION 'trapped %', {}; END"
            for signature, what in (
                ("lower(text) RETURNS text", "'lower'"),
                ("row_to_json(record) RETURNS json", "'row_to_json'"),
                ("pg_notify(text, text) RETURNS void", "'pg_notify'"),
                ("pg_try_advisory_xact_lock_shared(bigint) RETURNS bool", "'lock'"),
                ("nextval(regclass) RETURNS bigint", "'nextval'"),
            ):
                body = trap.format(what)
                db.execute(f"CREATE FUNCTION evil.{signature} LANGUAGE plpgsql AS $${body}$$")
            # Tables an unqualified INSERT INTO outbox would fill instead of the real one.
            columns = (
                "(id bigserial, txid xid8, op text, table_schema text, table_name text, "
                "old json, new json, created_at timestamptz)"
            )
            db.execute(f"CREATE TABLE evil.outbox {columns}")
            db.execute(f"CREATE TEMP TABLE outbox {columns}")
            # Tables named like the transition tables, and an = that would be found first.
            db.execute("CREATE TABLE evil.cache_worker_new (LIKE app.t)")
            db.execute("CREATE TEMP TABLE cache_worker_old (LIKE app.t)")
            db.execute("INSERT INTO evil.cache_worker_new VALUES (66, 6, 'planted')")
            db.execute("INSERT INTO cache_worker_old VALUES (77, 7, 'planted')")
            db.execute(
                "CREATE FUNCTION evil.eq(text, text) RETURNS bool LANGUAGE plpgsql AS "
                "$$BEGIN RAISE EXCEPTION 'trapped ='; END$$"
            )
            db.execute(
                "CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq)"
            )
            db.execute("SET LOCAL search_path = evil, pg_temp, pg_catalog")
            db.execute("INSERT INTO app.t VALUES (1, 1, 'a'), (2, 2, 'x')")
            db.execute("UPDATE app.t SET s = 'b' WHERE id = 1")
            db.execute("DELETE FROM app.t WHERE id = 2")
            counts = db.execute(
                "SELECT (SELECT count(*) FROM evil.outbox), (SELECT count(*) FROM pg_temp.outbox)"
            ).fetchone()
        assert counts == (0, 0)
        with _Streamer(source) as streamer:
            changes = streamer.changes(4)
        assert _ops(changes) == [
            (Op.INSERT, None, {"id": 1, "v": 1, "s": "a"}),
            (Op.INSERT, None, {"id": 2, "v": 2, "s": "x"}),
            (Op.UPDATE, {"id": 1, "v": 1, "s": "a"}, {"id": 1, "v": 1, "s": "b"}),
            (Op.DELETE, {"id": 2, "v": 2, "s": "x"}, None),
        ]
    finally:
        db.execute("DROP SCHEMA IF EXISTS evil CASCADE")
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
