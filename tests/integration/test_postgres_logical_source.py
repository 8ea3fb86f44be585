"""Integration tests of ``connectors.postgres_logical.PostgresLogicalSource`` against real Postgres.

Every test gets its own database (``pg_db``) and its own slot name, and drives ``stream()`` on a
background thread through ``_Streamer``, which plays the run loop's part: it acks positions as
items arrive unless a test acks by hand, and ``close()`` from the test thread must stop it within
seconds. The session server runs with ``synchronous_commit=off``, so a commit can be acknowledged
before logical decoding sees it; the tests wait on what they expect rather than on the clock.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql
from psycopg.types.json import Json

from connectors.memory import MemoryCheckpointStore, MemorySink
from connectors.postgres_common import PostgresOptions
from connectors.postgres_logical import (
    CHECK_PUBLICATION,
    CHECK_SLOT,
    PostgresLogicalSource,
    format_lsn,
    make_position,
    parse_lsn,
    preflight,
)
from tests.services import PostgresServer
from worker.errors import (
    PositionLost,
    SchemaError,
    SourceMisconfigured,
    SourceUnavailable,
)
from worker.events import (
    UNCHANGED,
    Heartbeat,
    Op,
    Position,
    RowChange,
    SourceItem,
    TableRef,
    Transaction,
)
from worker.rules import KeyTemplate, Rule, RuleSet
from worker.runner import Runner, RunOptions

ITEMS = TableRef("public", "items")
OTHER = TableRef("public", "other")

PgDb = tuple[str, psycopg.Connection[Any]]


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def pg_db(postgres: PostgresServer) -> Iterator[PgDb]:
    """A fresh database and an autocommit connection to it; slots in it are dropped after."""
    if postgres.is_local:
        postgres.start()
    name = f"t_{uuid.uuid4().hex[:12]}"
    with postgres.connect() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn = postgres.connect(name)
    try:
        yield name, conn
    finally:
        conn.close()
        if postgres.is_local:
            postgres.start()
        with postgres.connect() as admin:
            # A database with a replication slot cannot be dropped; a slot in use cannot either.
            admin.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            deadline = time.monotonic() + 10
            while True:
                try:
                    admin.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE database = %s",
                        (name,),
                    )
                    break
                except psycopg.errors.ObjectInUse:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _options(
    postgres: PostgresServer, db: str, tables: tuple[TableRef, ...] = (ITEMS,), **overrides: Any
) -> PostgresOptions:
    settings: dict[str, Any] = {
        # The password goes separately, as the settings hand it over (it wins over the DSN's).
        "dsn": f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{db}",
        "password": postgres.password,
        "tables": tables,
        "name": "test",
        "slot": f"cw_{uuid.uuid4().hex[:10]}",
        "publication": "cw_pub",
        "poll_interval_s": 0.05,
        "heartbeat_s": 0.2,
        "reconnect_max_backoff_s": 0.5,
        "connect_timeout_s": 3.0,
        **overrides,
    }
    return PostgresOptions(**settings)


def _items_table(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, qty int)")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY, v text)")


def _ready(options: PostgresOptions) -> PostgresLogicalSource:
    source = PostgresLogicalSource(options)
    source.setup()
    return source


def _slot(conn: psycopg.Connection[Any], slot: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return {"confirmed": parse_lsn(row[0]), "active_pid": row[1]}


def _confirmed(conn: psycopg.Connection[Any], slot: str) -> int:
    info = _slot(conn, slot)
    assert info is not None, f"slot {slot} is gone"
    return int(info["confirmed"])


def _written_lsn(conn: psycopg.Connection[Any]) -> int:
    """The end of WAL inserted so far (with synchronous_commit off, maybe not flushed yet)."""
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _Streamer:
    """Runs ``source.stream(start)`` on a thread; acks each position like the run loop would."""

    def __init__(self, source: PostgresLogicalSource, start: Position, auto_ack: bool = True):
        self.source = source
        self.auto_ack = auto_ack
        self.position_beats = 0  # heartbeats that moved the position
        self.items: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()

    def _run(self, start: Position) -> None:
        try:
            for item in self.source.stream(start):
                self.items.put(item)
                if isinstance(item, Heartbeat) and item.position is not None:
                    self.position_beats += 1
                if self.auto_ack and item.position is not None:
                    self.source.ack(item.position)
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

    def transactions(self, count: int, timeout: float = 20.0) -> list[Transaction]:
        """The next ``count`` whole transactions (chunks merged into their last chunk's list)."""
        found: list[Transaction] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            item = self.next(deadline)
            if isinstance(item, Transaction) and item.position is not None:
                found.append(item)
        return found

    def changes_until(
        self, done: Callable[[list[RowChange]], bool], timeout: float = 30.0
    ) -> list[RowChange]:
        changes: list[RowChange] = []
        deadline = time.monotonic() + timeout
        while not done(changes):
            item = self.next(deadline)
            if isinstance(item, Transaction):
                changes.extend(item.changes)
        return changes

    def caught_up(self, timeout: float = 20.0) -> list[SourceItem]:
        return self.until(lambda i: isinstance(i, Heartbeat) and i.caught_up, timeout)

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


def _txs(items: list[SourceItem]) -> list[Transaction]:
    return [i for i in items if isinstance(i, Transaction)]


def _rows(tx: Transaction) -> list[tuple[Op, Any, Any]]:
    return [(c.op, c.before, c.after) for c in tx.changes]


# -- setup and teardown --------------------------------------------------------------------


def test_setup_dry_run_creates_nothing_and_setup_is_idempotent(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    source = PostgresLogicalSource(options)
    try:
        planned = source.setup(dry_run=True)
        assert planned == [
            'CREATE PUBLICATION "cw_pub" FOR TABLE "public"."items"',
            f"SELECT pg_catalog.pg_create_logical_replication_slot('{options.slot}', 'pgoutput')",
        ]
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        assert _slot(conn, options.slot) is None

        assert source.setup() == planned
        assert source.setup() == []
        assert source.setup(dry_run=True) == []
        published = conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'cw_pub'"
        ).fetchall()
        assert published == [("public", "items")]
        assert _slot(conn, options.slot) is not None
    finally:
        source.close()

    # A new rule table: the publication is altered, the slot kept.
    wider = PostgresLogicalSource(_options(postgres, db, (ITEMS, OTHER), slot=options.slot))
    try:
        assert wider.setup() == [
            'ALTER PUBLICATION "cw_pub" SET TABLE "public"."items", "public"."other"'
        ]
        assert wider.setup() == []
    finally:
        wider.close()


def test_setup_refuses_a_table_without_replica_identity(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    conn.execute("CREATE TABLE items (id int, name text)")
    source = PostgresLogicalSource(_options(postgres, db))
    try:
        with pytest.raises(SourceMisconfigured, match="REPLICA IDENTITY FULL"):
            source.setup()
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        with pytest.raises(SchemaError, match="does not exist"):
            PostgresLogicalSource(_options(postgres, db, (TableRef("public", "nope"),))).setup()
    finally:
        source.close()


def test_teardown_removes_slot_and_publication(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    source = _ready(options)
    try:
        assert source.teardown(dry_run=True) == [
            f"SELECT pg_catalog.pg_drop_replication_slot('{options.slot}')",
            'DROP PUBLICATION IF EXISTS "cw_pub"',
        ]
        assert _slot(conn, options.slot) is not None
        assert len(source.teardown()) == 2
        assert _slot(conn, options.slot) is None
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        assert source.teardown() == []
    finally:
        source.close()


# -- changes -------------------------------------------------------------------------------


def test_changes_grouped_per_transaction_in_commit_order(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    began = time.time()
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    with conn.transaction():
        conn.execute("INSERT INTO items VALUES (2, 'b', 2)")
        conn.execute("UPDATE items SET qty = 10 WHERE id = 1")
        conn.execute("INSERT INTO other VALUES (1, 'x')")
        conn.execute("DELETE FROM items WHERE id = 2")
    conn.execute("INSERT INTO other VALUES (2, 'y')")  # not a rule table: never yielded
    conn.execute("UPDATE items SET id = 5 WHERE id = 1")
    with _Streamer(source, start) as streamer:
        first, second, third = streamer.transactions(3)
        assert _rows(first) == [(Op.INSERT, None, {"id": 1, "name": "a", "qty": 1})]
        assert _rows(second) == [
            (Op.INSERT, None, {"id": 2, "name": "b", "qty": 2}),
            # DEFAULT identity: no old row when the key did not change...
            (Op.UPDATE, None, {"id": 1, "name": "a", "qty": 10}),
            # ...and only the key of a deleted row.
            (Op.DELETE, {"id": 2}, None),
        ]
        assert _rows(third) == [(Op.UPDATE, {"id": 1}, {"id": 5, "name": "a", "qty": 10})]
        streamer.caught_up()
    positions = [tx.position for tx in (first, second, third)]
    assert all(p is not None for p in positions)
    versions = [p.version for p in positions if p is not None]
    assert start.version < versions[0] < versions[1] < versions[2]
    for tx in (first, second, third):
        assert tx.position is not None
        assert tx.position.coords == {"lsn": format_lsn(tx.position.version)}
        assert all(c.version < tx.position.version for c in tx.changes)
        assert len({c.version for c in tx.changes}) == 1
        assert tx.committed_at is not None and began - 5 < tx.committed_at < time.time() + 5
    assert first.changes[0].version < second.changes[0].version < third.changes[0].version
    assert all(c.table == ITEMS for tx in (first, second, third) for c in tx.changes)


def test_full_replica_identity_sends_whole_old_rows(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    conn.execute("INSERT INTO items VALUES (1, 'a', NULL)")
    conn.execute("UPDATE items SET name = 'b' WHERE id = 1")
    conn.execute("DELETE FROM items WHERE id = 1")
    with _Streamer(source, start) as streamer:
        _, update, delete = streamer.transactions(3)
    assert _rows(update) == [
        (Op.UPDATE, {"id": 1, "name": "a", "qty": None}, {"id": 1, "name": "b", "qty": None})
    ]
    assert _rows(delete) == [(Op.DELETE, {"id": 1, "name": "b", "qty": None}, None)]


def test_slot_advances_only_on_ack(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    source = _ready(options)
    start = source.initial_position()
    # Without acks the source peeks once; both commits must be flushed to be in that peek.
    conn.execute("SET synchronous_commit = on")
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    conn.execute("INSERT INTO items VALUES (2, 'b', 2)")

    with _Streamer(source, start, auto_ack=False) as streamer:
        unacked = streamer.transactions(2)
    slot = _slot(conn, options.slot)
    assert slot is not None and slot["confirmed"] == start.version

    # A restart without an ack sees the same transactions again, at the same positions.
    again = PostgresLogicalSource(options)
    with _Streamer(again, start, auto_ack=False) as streamer:
        replayed = streamer.transactions(2)
        assert [t.position for t in replayed] == [t.position for t in unacked]
        assert [_rows(t) for t in replayed] == [_rows(t) for t in unacked]
        last = replayed[-1].position
        assert last is not None
        again.ack(last)
        _wait_for("the slot to advance", lambda: _confirmed(conn, options.slot) == last.version)

    # After the ack, a restart from the acked checkpoint sees only what came later.
    conn.execute("INSERT INTO items VALUES (3, 'c', 3)")
    later = PostgresLogicalSource(options)
    with _Streamer(later, last) as streamer:
        [tx] = streamer.transactions(1)
        assert _rows(tx) == [(Op.INSERT, None, {"id": 3, "name": "c", "qty": 3})]
    assert tx.position is not None

    # The slot is past the original start now: resuming from there would silently skip.
    stale = PostgresLogicalSource(options)
    with _Streamer(stale, start) as streamer:
        error = streamer.failure()
    assert isinstance(error, PositionLost)
    assert "reset-checkpoint" in str(error)
    assert not stale.position_available(start).ok
    assert later.position_available(tx.position).ok


def test_peeks_go_on_before_the_run_loop_acks(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    source = _ready(options)
    start = source.initial_position()
    conn.execute("SET synchronous_commit = on")
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    with _Streamer(source, start, auto_ack=False) as streamer:
        [first] = streamer.transactions(1)
        # Nothing is acknowledged: later commits still arrive, each once, and the slot stays.
        conn.execute("INSERT INTO items VALUES (2, 'b', 2)")
        conn.execute("INSERT INTO items VALUES (3, 'c', 3)")
        second, third = streamer.transactions(2)
        assert _rows(second) == [(Op.INSERT, None, {"id": 2, "name": "b", "qty": 2})]
        assert _rows(third) == [(Op.INSERT, None, {"id": 3, "name": "c", "qty": 3})]
        # Two more quiet rounds re-read all three from the slot: none is yielded again.
        assert _txs(streamer.caught_up()) == []
        assert _txs(streamer.caught_up()) == []
        assert _confirmed(conn, options.slot) == start.version
        assert third.position is not None
        source.ack(third.position)
        _wait_for(
            "the slot to follow the ack",
            lambda: _confirmed(conn, options.slot) == third.position.version,  # type: ignore[union-attr]
        )
        conn.execute("INSERT INTO items VALUES (4, 'd', 4)")
        [fourth] = streamer.transactions(1)
    assert [t.position.version for t in (first, second, third, fourth) if t.position] == sorted(
        {t.position.version for t in (first, second, third, fourth) if t.position}
    )
    assert _rows(fourth) == [(Op.INSERT, None, {"id": 4, "name": "d", "qty": 4})]


def test_a_run_loop_behind_holds_the_stream_back_and_loses_nothing(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    # Small peeks, so a few transactions are already "far ahead" of a run loop that never acks.
    options = _options(postgres, db, max_changes=6)
    source = _ready(options)
    start = source.initial_position()
    count = 60
    conn.execute("SET synchronous_commit = on")
    for i in range(count):
        conn.execute("INSERT INTO items VALUES (%s, 'x', %s)", (i, i))
    seen: list[int] = []
    last: Position | None = None
    with _Streamer(source, start, auto_ack=False) as streamer:
        while len(seen) < count:
            # Acks lag behind: every fifth transaction, or when nothing more comes because the
            # stream waits for them (the run loop acks everything it applied, eventually).
            try:
                [tx] = streamer.transactions(1, timeout=1.0)
            except AssertionError:
                assert last is not None, "nothing arrived at all"
                source.ack(last)
                continue
            seen += [c.after["id"] for c in tx.changes if c.after]
            last = tx.position
            assert last is not None
            if len(seen) % 5 == 0:
                source.ack(last)
        assert last is not None
        source.ack(last)
        assert _txs(streamer.caught_up()) == []
    assert seen == list(range(count))


def test_restart_point_nudge_logs_running_transactions_and_leaves_no_slot(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    except psycopg.Error as exc:
        pytest.skip(f"pg_walinspect is not available: {exc}")
    _items_table(conn)
    options = _options(postgres, db)
    source = _ready(options)
    session = source._open_session(source.initial_position().version, True)
    try:

        def running_xacts_records(since: int) -> int:
            row = conn.execute(
                "SELECT count(*) FROM pg_get_wal_records_info_till_end_of_wal(%s::pg_lsn) "
                "WHERE record_type = 'RUNNING_XACTS'",
                (format_lsn(since),),
            ).fetchone()
            return int(row[0]) if row else 0

        before = _written_lsn(conn)
        # A transaction running meanwhile makes the temporary slot wait, up to the timeout.
        with postgres.connect(db) as other, other.transaction():
            other.execute("INSERT INTO other VALUES (1, 'open')")
            source._nudge(session, before + 10**9)
        assert running_xacts_records(before) >= 1
        assert session.nudge_at > 0
        # It never lingers: only the source's own slot is left.
        slots = conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()
        assert slots == [(options.slot,)]

        # A failure other than the timeout stops nudging, with a warning, and nothing else.
        session.nudge_slot = "not a valid slot name!"
        session.nudge_at = 0.0
        with structlog.testing.capture_logs() as logs:
            source._nudge(session, before + 2 * 10**9)
            source._nudge(session, before + 3 * 10**9)
        assert [e["event"] for e in logs] == ["restart_point_nudge_disabled"]
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (1,)
    finally:
        source._end_session(session)
        source.close()


def test_checkpoint_ahead_of_slot_skips_what_it_covers(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    source = _ready(options)
    start = source.initial_position()
    # Flushed commits: without acks the source peeks once, and a peek only sees flushed WAL
    # (the test server commits asynchronously), so both transactions must be in that one peek.
    conn.execute("SET synchronous_commit = on")
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    conn.execute("INSERT INTO items VALUES (2, 'b', 2)")
    with _Streamer(source, start, auto_ack=False) as streamer:
        first, _ = streamer.transactions(2)
    assert first.position is not None

    # As after a crash between saving the checkpoint and advancing the slot.
    resumed = PostgresLogicalSource(options)
    with _Streamer(resumed, first.position) as streamer:
        items = streamer.caught_up()
        assert [_rows(t) for t in _txs(items)] == [
            [(Op.INSERT, None, {"id": 2, "name": "b", "qty": 2})]
        ]
    slot = _slot(conn, options.slot)
    assert slot is not None and slot["confirmed"] > first.position.version


def test_schema_change_mid_stream_takes_the_new_columns(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    with _Streamer(source, start) as streamer:
        [before] = streamer.transactions(1)
        conn.execute("ALTER TABLE items ADD COLUMN extra text DEFAULT 'd'")
        conn.execute("ALTER TABLE items DROP COLUMN qty")
        conn.execute("INSERT INTO items VALUES (2, 'b', 'e')")
        [after] = streamer.transactions(1)
    assert before.changes[0].after == {"id": 1, "name": "a", "qty": 1}
    assert after.changes[0].after == {"id": 2, "name": "b", "extra": "e"}
    assert source.columns(ITEMS) == ["id", "name", "extra"]


def test_large_transaction_is_chunked(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    conn.execute("INSERT INTO items SELECT g, 'x', g FROM generate_series(1, 12001) g")
    conn.execute("UPDATE items SET qty = qty + 1")
    with _Streamer(source, start) as streamer:
        items = streamer.until(lambda i: isinstance(i, Transaction) and i.position is not None)
        chunks = _txs(items)
        assert [len(c.changes) for c in chunks] == [5000, 5000, 2001]
        assert [c.position is None for c in chunks] == [True, True, False]
        assert len({c.version for t in chunks for c in t.changes}) == 1
        assert sorted(c.after["id"] for t in chunks for c in t.changes if c.after) == list(
            range(1, 12002)
        )
        items = streamer.until(lambda i: isinstance(i, Transaction) and i.position is not None)
        assert [len(c.changes) for c in _txs(items)] == [5000, 5000, 2001]
        assert all(c.op is Op.UPDATE for t in _txs(items) for c in t.changes)


def test_truncate(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    conn.execute("TRUNCATE items, other")
    with _Streamer(source, start) as streamer:
        _, truncate = streamer.transactions(2)
    [change] = truncate.changes
    assert (change.op, change.table, change.before, change.after) == (
        Op.TRUNCATE,
        ITEMS,
        None,
        None,
    )


def test_unchanged_toast_is_marked_never_invented(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, note text, big text)")
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    # Random hex does not compress below the TOAST threshold, so it is stored out of line.
    conn.execute(
        "INSERT INTO items SELECT 1, 'n0', string_agg(md5(random()::text), '') "
        "FROM generate_series(1, 1000)"
    )
    row = conn.execute("SELECT big FROM items").fetchone()
    assert row is not None
    big = row[0]
    conn.execute("UPDATE items SET note = 'n1'")
    with _Streamer(source, start) as streamer:
        insert, update = streamer.transactions(2)
        assert insert.changes[0].after == {"id": 1, "note": "n0", "big": big}
        [change] = update.changes
        assert change.partial is True
        assert change.before is None
        assert change.after == {"id": 1, "note": "n1", "big": UNCHANGED}

        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        conn.execute("UPDATE items SET note = 'n2'")
        [full] = streamer.transactions(1)
    [change] = full.changes
    # The old image of FULL identity carries the value, so rules can fill the new one from it.
    assert change.before == {"id": 1, "note": "n1", "big": big}
    assert change.after == {"id": 1, "note": "n2", "big": UNCHANGED}
    assert change.partial is True


def test_type_matrix(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    conn.execute("CREATE TYPE mood AS ENUM ('happy', 'sad')")
    conn.execute(
        """CREATE TABLE items (
            id int PRIMARY KEY, big bigint, num numeric(30,10), r real, d double precision,
            b boolean, t text, vc varchar(20), raw bytea, j json, jb jsonb, day date,
            clock time, ts timestamp, tstz timestamptz, u uuid, ints int[], texts text[],
            m mood, moods mood[], small smallint, ch char(3))"""
    )
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    values: dict[str, Any] = {
        "id": 1,
        "big": 9_007_199_254_740_993,
        "num": Decimal("12345678901234567890.0123456789"),
        "r": 0.1,
        "d": 0.1,
        "b": True,
        "t": "h\u00e9llo \u2603 'q' \"dq\"",
        "vc": "short",
        "raw": b"\x00\xff\x10\\x",
        "j": {"a": 1, "b": [1.5, "x", None]},
        "jb": {"nested": {"k": [1, 2]}, "f": 2.25, "s": "v"},
        "day": dt.date(2024, 2, 29),
        "clock": dt.time(23, 59, 58, 123456),
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5, 678901),
        "tstz": dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=5))),
        "u": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "ints": [1, None, 3],
        "texts": ["a", "b c", None, "{}", '"'],
        "m": "happy",
        "moods": ["sad", "happy"],
        "small": -32768,
        "ch": "ab",
    }
    columns = list(values)
    placeholders = []
    for name in columns:
        cast = {"j": "::json", "jb": "::jsonb", "m": "::mood", "moods": "::mood[]"}.get(name, "")
        placeholders.append(f"%s{cast}")
    params = [Json(v) if k in ("j", "jb") else v for k, v in values.items()]
    conn.execute(
        f"INSERT INTO items ({', '.join(columns)}) VALUES ({', '.join(placeholders)})", params
    )
    conn.execute("INSERT INTO items (id, num, r, d) VALUES (2, 'NaN', 'Infinity', '-Infinity')")
    with _Streamer(source, start) as streamer:
        first, second = streamer.transactions(2)
    after = first.changes[0].after
    assert after is not None
    expected = dict(values, r=0.1, ch="ab ")
    assert after == expected
    assert after["tstz"].tzinfo == dt.UTC
    assert after["tstz"] == values["tstz"]
    assert isinstance(after["num"], Decimal)
    assert isinstance(after["u"], uuid.UUID)
    assert isinstance(after["raw"], bytes)

    nulls = second.changes[0].after
    assert nulls is not None
    assert nulls["num"].is_nan()
    assert nulls["r"] == float("inf")
    assert nulls["d"] == float("-inf")
    assert all(nulls[c] is None for c in columns if c not in ("id", "num", "r", "d"))


# -- quiet databases and failures ----------------------------------------------------------


def test_idle_heartbeat_advances_slot_while_other_tables_are_written(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db, heartbeat_s=0.2)
    source = _ready(options)
    start = source.initial_position()
    for i in range(50):
        conn.execute("INSERT INTO other VALUES (%s, repeat('x', 1000))", (i,))
    written = _written_lsn(conn)
    assert written > start.version
    with _Streamer(source, start) as streamer:
        items = streamer.until(
            lambda i: (
                isinstance(i, Heartbeat)
                and i.position is not None
                and i.position.version >= written
            )
        )
        assert _txs(items) == []
        assert all(isinstance(i, Heartbeat) for i in items)
        _wait_for(
            "the slot to pass the unrelated writes",
            lambda: _confirmed(conn, options.slot) >= written,
        )
        retained = source.retained_wal_bytes()
        assert retained is not None and retained >= 0


def test_heartbeats_never_skip_a_concurrent_commit(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    # Advance on every empty peek, as often as possible, while commits keep landing.
    options = _options(postgres, db, heartbeat_s=0.0, poll_interval_s=0.005)
    source = _ready(options)
    start = source.initial_position()
    count = 400
    stop = threading.Event()

    def write() -> None:
        with postgres.connect(db) as writer:
            # Flushed at once, so the stream's view of the WAL moves commit by commit and quiet
            # peeks (and position heartbeats) fall between the commits.
            writer.execute("SET synchronous_commit = on")
            for i in range(count):
                writer.execute("INSERT INTO items VALUES (%s, 'w', 0)", (i,))
                writer.execute("INSERT INTO other VALUES (%s, 'noise')", (i,))
                time.sleep(0.002 if i % 10 else 0.02)
                if stop.is_set():
                    return

    writer = threading.Thread(target=write, daemon=True)
    with _Streamer(source, start) as streamer:
        writer.start()
        try:
            changes = streamer.changes_until(lambda seen: len(seen) >= count, timeout=60)
        finally:
            stop.set()
            writer.join(10)
    assert sorted(c.after["id"] for c in changes if c.after) == list(range(count))
    # The slot really was moved by idle heartbeats in between the commits.
    assert streamer.position_beats > 0


def test_dropped_slot_raises_position_lost(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    source = _ready(options)
    start = source.initial_position()
    conn.execute("INSERT INTO items VALUES (1, 'a', 1)")
    with _Streamer(source, start) as streamer:
        streamer.transactions(1)
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (options.slot,))
                break
            except psycopg.errors.ObjectInUse:
                # Between peeks the slot is free; during one it is held.
                assert time.monotonic() < deadline
                time.sleep(0.01)
        error = streamer.failure()
    assert isinstance(error, PositionLost)
    assert "cache-worker setup" in str(error)
    assert "rewarm" in str(error)

    # And at start.
    fresh = PostgresLogicalSource(options)
    with _Streamer(fresh, start) as streamer:
        assert isinstance(streamer.failure(), PositionLost)
    assert not fresh.position_available(start).ok


def test_server_restart_mid_stream_reconnects_and_loses_nothing(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    if not postgres.is_local:
        pytest.skip("needs a Postgres this test can restart")
    db, conn = pg_db
    _items_table(conn)
    source = _ready(_options(postgres, db))
    start = source.initial_position()
    for i in range(20):
        conn.execute("INSERT INTO items VALUES (%s, 'before', 0)", (i,))
    with structlog.testing.capture_logs() as logs, _Streamer(source, start) as streamer:
        seen = streamer.changes_until(lambda c: len(c) >= 10)
        postgres.restart()
        with postgres.connect(db) as again:
            for i in range(20, 40):
                again.execute("INSERT INTO items VALUES (%s, 'after', 0)", (i,))
        seen += streamer.changes_until(
            lambda c: {x.after["id"] for x in seen + c if x.after} >= set(range(40)), timeout=60
        )
    ids = [c.after["id"] for c in seen if c.after]
    assert set(ids) == set(range(40))
    reconnects = [e for e in logs if e["event"] == "source_reconnect"]
    assert reconnects
    assert all(postgres.password not in str(e) for e in logs)


def test_close_from_another_thread_stops_an_idle_stream(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    source = _ready(_options(postgres, db, poll_interval_s=5.0, heartbeat_s=60.0))
    streamer = _Streamer(source, source.initial_position())
    streamer.caught_up()
    streamer.close()  # asserts the thread ended within seconds


# -- checks and preflight ------------------------------------------------------------------


def test_checks_report_replica_identity_needs(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    conn.execute("CREATE TABLE fulls (id int PRIMARY KEY, email text)")
    conn.execute("ALTER TABLE fulls REPLICA IDENTITY FULL")
    fulls = TableRef("public", "fulls")
    source = _ready(_options(postgres, db, (ITEMS, fulls)))
    try:
        plain = {r.name: r for r in source.checks()}
        assert all(r.ok for r in plain.values()), plain
        assert "retains" in plain[CHECK_SLOT].detail
        assert "primary key id" in plain["replica identity public.items"].detail

        needs = {ITEMS: {"id", "name"}, fulls: {"email"}}
        results = {r.name: r for r in source.checks(key_columns=needs)}
        items_check = results["replica identity public.items"]
        assert not items_check.ok
        assert 'ALTER TABLE "public"."items" REPLICA IDENTITY FULL' in items_check.detail
        assert "name" in items_check.detail
        assert results["replica identity public.fulls"].ok

        only_keys = {r.name: r for r in source.checks(key_columns={ITEMS: {"id"}})}
        assert only_keys["replica identity public.items"].ok
    finally:
        source.close()


def test_preflight(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    with pytest.raises(SourceMisconfigured, match="cache-worker setup"):
        preflight(options)
    source = _ready(options)
    source.close()
    preflight(options)

    # A publication that lost a table is reported with the fix.
    conn.execute("ALTER PUBLICATION cw_pub SET TABLE other")
    with pytest.raises(SourceMisconfigured, match=CHECK_PUBLICATION):
        preflight(options)

    secret = "wrong-Secret-42"
    with pytest.raises(SourceMisconfigured) as refused:
        preflight(_options(postgres, db, password=secret))
    assert secret not in str(refused.value)

    with pytest.raises(SourceUnavailable):
        preflight(_options(postgres, db, dsn=f"postgresql://{postgres.user}@127.0.0.1:1/{db}"))


def test_password_in_options_wins_over_the_dsn(postgres: PostgresServer, pg_db: PgDb) -> None:
    db, conn = pg_db
    _items_table(conn)
    dsn = f"postgresql://{postgres.user}:not-it@{postgres.host}:{postgres.port}/{db}"
    source = PostgresLogicalSource(_options(postgres, db, dsn=dsn))
    try:
        assert source.columns(ITEMS) == ["id", "name", "qty"]
        assert source.columns(TableRef("public", "nope")) is None
        reachable = source.checks()[0]
        assert reachable.ok
        assert "not-it" not in reachable.detail
    finally:
        source.close()


# -- with the run loop ---------------------------------------------------------------------


def test_runner_until_idle_applies_everything_and_checkpoints(
    postgres: PostgresServer, pg_db: PgDb
) -> None:
    db, conn = pg_db
    _items_table(conn)
    options = _options(postgres, db)
    _ready(options).close()
    for i in range(30):
        conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (i, f"n{i}", i))
    conn.execute("DELETE FROM items WHERE id < 5")

    rules = RuleSet([Rule("items", ITEMS, (KeyTemplate.parse("item:{id}"),))])
    sink = MemorySink()
    checkpoints = MemoryCheckpointStore()
    # Without a checkpoint the run starts at the slot, which predates the writes above.
    source = PostgresLogicalSource(options)
    runner = Runner(
        source,
        sink,
        checkpoints,
        rules,
        RunOptions(until_idle=True),
        describe_position=source.describe_position,
        preflight=lambda checkpoint: preflight(options, resuming=checkpoint is not None),
    )
    runner.run()
    assert sorted(sink.values) == sorted(f"item:{i}" for i in range(5, 30))
    saved = checkpoints.position
    assert saved is not None
    slot = _slot(conn, options.slot)
    assert slot is not None and slot["confirmed"] <= saved.version
    assert source.position_available(saved).ok

    # A second burst from the checkpoint has nothing to do, and brings the slot along.
    conn.execute("UPDATE items SET qty = -1 WHERE id = 29")
    sink2 = MemorySink()
    source2 = PostgresLogicalSource(options)
    Runner(source2, sink2, checkpoints, rules, RunOptions(until_idle=True)).run()
    assert list(sink2.values) == ["item:29"]
    assert '"qty":-1' in str(sink2.values["item:29"]).replace(" ", "")
    assert checkpoints.position is not None and checkpoints.position.version > saved.version
    assert make_position(checkpoints.position.version) == checkpoints.position
