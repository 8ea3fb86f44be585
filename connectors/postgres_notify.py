"""The ``postgres-notify`` ``Source`` (Postgres 13+, no replication privilege): triggers copy
each changed row into an outbox table, a NOTIFY wakes the worker, and the worker consumes
the outbox in id order. It owns the outbox schema and capture triggers (``setup``/``teardown`` and
their SQL, and the upgrade of what older versions installed), consuming under row locks and
deleting only what the run loop acknowledged, the advisory locks that make one worker the consumer
and let writers skip NOTIFY while it is awake, turning ``row_to_json`` images back into the values
the logical source produces, reconnecting with backoff, and the checks behind ``cache-worker
check`` and ``run``. The outbox, not the checkpoint, is the durable state: rows written while no
worker runs wait there, and a worker that dies before its batch is acknowledged leaves the rows
for the next consumer (a duplicate is harmless, a loss is not), so ``start`` = ``end`` and
``beginning`` both mean "what is in the outbox now". LISTEN and the session-level consumer lock
need a direct connection or session pooling: behind a pgbouncer *transaction* pool NOTIFYs are
lost and nobody in particular holds the consumer lock, yet rows are still found every
``poll_interval_s`` and the transaction-level lock each batch takes still keeps two workers from
consuming at once; only "one active, the others standby" is lost.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from json.scanner import make_scanner
from typing import Any, TypeVar, cast

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg import sql

from connectors.postgres_common import (
    CHECK_REACHABLE,
    TABLE_BY_NAME,
    ColumnInfo,
    PostgresOptions,
    TextDecoder,
    base_checks,
    close_quietly,
    connect,
    error_text,
    qualified,
    table_columns,
    table_oid,
    translate_error,
)
from worker.errors import (
    CacheWorkerError,
    SchemaError,
    SourceError,
    SourceMisconfigured,
)
from worker.events import Heartbeat, Op, Position, RowChange, SourceItem, TableRef, Transaction
from worker.interfaces import CheckResult

log = structlog.get_logger("cache_worker.source.postgres_notify")
_T = TypeVar("_T")

KIND = "postgres-notify"
SETUP_HINT = "run `cache-worker setup --config <file>`"

CHECK_OUTBOX = "outbox schema"
CHECK_TRIGGERS = "triggers"
CHECK_BACKLOG = "outbox backlog"
CHECK_PRIVILEGES = "outbox privileges"

OUTBOX_TABLE = "outbox"
_FUNCTION_PREFIX = "capture_"
_OPS = {"insert": Op.INSERT, "update": Op.UPDATE, "delete": Op.DELETE, "truncate": Op.TRUNCATE}
# Transition table names inside the capture functions; not visible outside a trigger call.
_OLD_TABLE = "cache_worker_old"
_NEW_TABLE = "cache_worker_new"
# Trigger names by operation; "row" is the INSERT OR UPDATE OR DELETE row trigger of older
# versions, still dropped by setup (and accepted by the checks until then).
_TRIGGER_OPS = ("insert", "update", "delete", "truncate", "row")
# The statement-level triggers the first release installed for a table with a primary key.
_CAPTURE_OPS = ("insert", "update", "delete", "truncate")
_IMAGE_COLUMNS = ("old", "new")

# Waits are sliced so a close() that could not interrupt the socket still ends them soon.
_WAIT_SLICE_S = 0.5
_STANDBY_RETRY_S = 1.0
# How long close() lets an acknowledged batch finish its DELETE and COMMIT.
_CLOSE_GRACE_S = 2.0
# Read-ahead (see _chain): unacknowledged batches handed over at most, and how long one
# transaction reads on (its deletes stay uncommitted and late lower ids wait that long).
_AHEAD = 2
_CHAIN_READS = 100
_CHAIN_S = 1.0
BACKLOG_WARN_AGE_S = 60.0
BACKLOG_WARN_FACTOR = 10
_MAX_IDENTIFIER = 63

_JSON_OIDS = frozenset({114, 3802})
_TEXT_OIDS = frozenset({25, 1043, 1042, 19})
_INT_OIDS = frozenset({20, 21, 23})
_BOOL_OID = 16
# Numbers with a fraction stay exact (numeric columns); one decoder, not one per json.loads call.
_JSON = json.JSONDecoder(parse_float=Decimal)
# The decoder's C scanner without decode()'s whitespace handling, which row_to_json's compact
# text never needs: half the cost of decoding an image, the consumer's largest per-row cost.
# (typeshed types the argument as the scanner class itself; a decoder is what it takes.)
_SCAN: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, _JSON))


def _decode_image(text: str) -> Any:
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        return _JSON.decode(text)  # surrounding whitespace, or the error message for bad JSON
    return value


# ------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------


def _ident(text: str) -> str:
    """``text`` if it fits Postgres' 63-byte identifiers, else a prefix plus a hash of the rest."""
    if len(text.encode("utf-8")) <= _MAX_IDENTIFIER:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    prefix = text.encode("utf-8")[: _MAX_IDENTIFIER - 9].decode("utf-8", "ignore")
    return f"{prefix}_{digest}"


def trigger_name(schema_name: str, op: str) -> str:
    """The name of one capture trigger: ``<schema_name>_<op>`` (op: insert ... truncate, row).

    The outbox schema name is in it so two workers with different schemas can capture the same
    table without replacing each other's triggers.
    """
    return _ident(f"{schema_name}_{op}")


def function_name(table: TableRef) -> str:
    """The capture function of ``table`` (in the outbox schema); the hash keeps ``a_b.c`` and
    ``a.b_c`` apart."""
    digest = hashlib.sha1(f"{table.schema}\x00{table.name}".encode()).hexdigest()[:8]
    return _ident(f"{_FUNCTION_PREFIX}{table.schema[:20]}_{table.name[:24]}_{digest}")


def lock_key(schema_name: str) -> int:
    """The session advisory lock key that makes one worker per outbox the consumer."""
    digest = hashlib.blake2b(f"cache-worker:outbox:{schema_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def batch_lock_key(schema_name: str) -> int:
    """The transaction advisory lock key every batch takes (see the module docstring)."""
    digest = hashlib.blake2b(f"cache-worker:batch:{schema_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def sleep_lock_key(schema_name: str) -> int:
    """The advisory lock the consumer holds while it sleeps; see ``capture_function_sql``."""
    digest = hashlib.blake2b(f"cache-worker:sleep:{schema_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def make_position(version: int, outbox_id: int) -> Position:
    """A checkpointable position after the outbox row ``outbox_id``."""
    return Position(version, {"id": outbox_id})


def describe_position(position: Position) -> str:
    """Short human text such as ``outbox id 1234``."""
    return f"outbox id {position.coords.get('id', '?')}"


# ------------------------------------------------------------------------------------------
# The SQL of setup and teardown
# ------------------------------------------------------------------------------------------


def _outbox(options: PostgresOptions) -> sql.Composable:
    return sql.Identifier(options.schema_name, OUTBOX_TABLE)


def outbox_sql(options: PostgresOptions) -> list[sql.Composed]:
    """The schema and outbox table, idempotently."""
    schema = sql.Identifier(options.schema_name)
    outbox = _outbox(options)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (\n"
            "  id bigserial PRIMARY KEY,\n"
            "  txid xid8 NOT NULL DEFAULT pg_current_xact_id(),\n"
            "  op text NOT NULL,\n"
            "  table_schema text NOT NULL,\n"
            "  table_name text NOT NULL,\n"
            "  old json,\n"
            "  new json,\n"
            "  created_at timestamptz NOT NULL DEFAULT clock_timestamp()\n"
            ")"
        ).format(outbox),
        # A queue table: rows are inserted and deleted all day, and the consumer's index scan
        # from the lowest id walks over dead entries until vacuum removes them, so vacuum it
        # after a fixed number of dead rows instead of a fraction of its (small) size.
        sql.SQL(
            "ALTER TABLE {} SET (autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_vacuum_threshold = 5000)"
        ).format(outbox),
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            outbox,
            sql.Literal(
                "cache-worker postgres-notify outbox: row changes waiting for the worker; "
                "remove with `cache-worker teardown`"
            ),
        ),
    ]


def outbox_upgrade_sql(
    conn: psycopg.Connection[Any], options: PostgresOptions
) -> list[sql.Composed]:
    """What turns an existing outbox of an older version into the current one (none if current).

    Older versions stored the row images as ``jsonb``; ``json`` is what ``row_to_json`` makes
    without a conversion, and reading it back as text costs the server nothing. The rewrite
    locks the outbox for its duration, which is short unless a large backlog waits in it.
    """
    rows = conn.execute(
        "SELECT a.attname FROM pg_catalog.pg_attribute a "
        "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped "
        "AND a.atttypid = 'pg_catalog.jsonb'::pg_catalog.regtype ORDER BY a.attnum",
        (options.schema_name, OUTBOX_TABLE),
    ).fetchall()
    columns = [str(r[0]) for r in rows if r[0] in _IMAGE_COLUMNS]
    if not columns:
        return []
    changes = sql.SQL(", ").join(
        sql.SQL("ALTER COLUMN {0} TYPE json USING {0}::json").format(sql.Identifier(c))
        for c in columns
    )
    return [sql.SQL("ALTER TABLE {} {}").format(_outbox(options), changes)]


def _dollar_quote(body: str) -> str:
    tag = "cache_worker"
    while f"${tag}$" in body:
        tag += "_"
    return f"${tag}${body}${tag}$"


def capture_function_sql(options: PostgresOptions, table: TableRef) -> sql.Composed:
    """``CREATE OR REPLACE FUNCTION`` of the table's capture function.

    One function serves all of the table's triggers (see ``trigger_sql``); each changed row
    becomes one outbox row with ``row_to_json`` images. UPDATE is a row-level trigger: one
    plpgsql call and one small ``INSERT ... VALUES`` per row. A statement-level UPDATE trigger
    with transition tables costs a single-row UPDATE, what most applications run, about twice
    as much: the transition tuplestores and an ``INSERT ... SELECT`` over a hash full join of old
    and new rows, needed to pair them by key. INSERT and DELETE need no pairing, so their
    statement-level triggers read one transition table each: about as cheap as a row trigger
    for one row, and a bulk statement costs one call and one insert instead of one per row.
    (A partitioned table has row-level triggers for all three, see ``trigger_sql``.) An UPDATE
    that changed the primary key arrives as one row with both images; the consumer turns it
    into a delete and an insert. An empty statement writes nothing and does not notify.

    It runs as its owner (SECURITY DEFINER), so the application needs no privilege on the
    outbox. Such a function must not resolve any name through the caller's search_path, or the
    caller could slip it a function or operator of its own; the usual ``SET search_path`` clause
    does that, but swapping the setting in and out on every call costs a single-row write about
    a tenth of its throughput. So every name in the body is schema-qualified instead (the
    outbox, each function and operator; it names no type), which leaves nothing to resolve: the
    transition tables are found before any relation of the search_path.

    NOTIFY is costly at commit: Postgres serialises the commits of all notifying transactions
    of the cluster behind one lock (and their WAL flushes with it). So a writer notifies only
    when the consumer sleeps, which it signals by holding ``sleep_lock_key`` exclusively. A
    writer that gets the lock shared knows the consumer is awake and skips the NOTIFY; holding
    that shared lock until its commit makes a consumer that wants to sleep wait for the commit,
    and the consumer looks at the outbox once more after it got the lock, so no change is left
    waiting for the poll. Under load the consumer is rarely asleep and writers rarely notify.
    Later rows of the same transaction find the lock in their backend's own lock table.
    """

    def insert(images: str) -> sql.Composable:
        columns = sql.SQL("op, table_schema, table_name{}").format(sql.SQL(images))
        return sql.SQL("INSERT INTO {} ({})\n    ").format(_outbox(options), columns)

    body = sql.SQL(
        "\nBEGIN\n"
        "  IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' THEN\n"
        "    {both}VALUES (pg_catalog.lower(TG_OP), {s}, {t},\n"
        "            pg_catalog.row_to_json(OLD), pg_catalog.row_to_json(NEW));\n"
        "  ELSIF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN\n"
        "    {new_only}SELECT 'insert', {s}, {t}, pg_catalog.row_to_json(n.*) FROM {new} AS n;\n"
        "  ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN\n"
        "    {old_only}SELECT 'delete', {s}, {t}, pg_catalog.row_to_json(o.*) FROM {old} AS o;\n"
        "  ELSE  -- TRUNCATE (anything unforeseen, too: evicting the whole table is safe)\n"
        "    {none}VALUES ('truncate', {s}, {t});\n"
        "  END IF;\n"
        "  IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared({key}) THEN\n"
        "    PERFORM pg_catalog.pg_notify({channel}, '');\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END\n"
    ).format(
        both=insert(", old, new"),
        new_only=insert(", new"),
        old_only=insert(", old"),
        none=insert(""),
        s=sql.Literal(table.schema),
        t=sql.Literal(table.name),
        old=sql.Identifier(_OLD_TABLE),
        new=sql.Identifier(_NEW_TABLE),
        key=sql.Literal(sleep_lock_key(options.schema_name)),
        channel=sql.Literal(options.channel),
    )
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger\n"
        "LANGUAGE plpgsql SECURITY DEFINER\n"
        "AS {body}"
    ).format(
        fn=sql.Identifier(options.schema_name, function_name(table)),
        body=_BodyText(body),
    )


class _BodyText(sql.Composable):
    """A function body rendered at ``as_string`` time and dollar-quoted with a free tag."""

    def __init__(self, body: sql.Composable) -> None:
        super().__init__(body)
        self._body = body

    def as_bytes(self, context: Any = None) -> bytes:
        conn = getattr(context, "connection", None)
        encoding = conn.info.encoding if conn is not None else "utf-8"
        return _dollar_quote(self._body.as_string(context)).encode(encoding)


def trigger_specs(partitioned: bool) -> list[tuple[str, str, str]]:
    """The capture triggers of a table: (name op, event, level), transition tables aside.

    A regular table: statement-level INSERT and DELETE, row-level UPDATE (see
    ``capture_function_sql``), statement-level TRUNCATE. A partitioned table gets one row-level
    trigger for all three instead: an UPDATE that moves a row to another partition fires only
    the partitions' row-level DELETE and INSERT triggers, no UPDATE row trigger and no DELETE or
    INSERT statement trigger, so the mixed set would miss it.
    """
    if partitioned:
        return [("row", "INSERT OR UPDATE OR DELETE", "ROW"), ("truncate", "TRUNCATE", "STATEMENT")]
    return [
        ("insert", "INSERT", "STATEMENT"),
        ("update", "UPDATE", "ROW"),
        ("delete", "DELETE", "STATEMENT"),
        ("truncate", "TRUNCATE", "STATEMENT"),
    ]


def trigger_sql(
    options: PostgresOptions, table: TableRef, partitioned: bool = False
) -> list[sql.Composed]:
    """Drop every capture trigger this schema may have left on ``table``, create the right ones
    (``trigger_specs``).

    Dropping and creating in the one setup transaction leaves no moment without capture; the
    drop also removes what older versions created (a statement-level UPDATE trigger, a row
    trigger for all three operations).
    """
    target = qualified(table)
    fn = sql.Identifier(options.schema_name, function_name(table))
    names = {op: sql.Identifier(trigger_name(options.schema_name, op)) for op in _TRIGGER_OPS}
    statements: list[sql.Composed] = [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(names[op], target) for op in _TRIGGER_OPS
    ]
    referencing = {
        "insert": f" REFERENCING NEW TABLE AS {_NEW_TABLE}",
        "delete": f" REFERENCING OLD TABLE AS {_OLD_TABLE}",
    }
    create = "CREATE TRIGGER {name} AFTER {event} ON {table}{referencing} FOR EACH {level} "
    create += "EXECUTE FUNCTION {fn}()"
    for op, event, level in trigger_specs(partitioned):
        statements.append(
            sql.SQL(create).format(
                name=names[op],
                event=sql.SQL(event),
                table=target,
                referencing=sql.SQL(referencing.get(op, "") if level == "STATEMENT" else ""),
                level=sql.SQL(level),
                fn=fn,
            )
        )
    return statements


# ------------------------------------------------------------------------------------------
# Catalog reads
# ------------------------------------------------------------------------------------------


def primary_key(conn: psycopg.Connection[Any], table: TableRef) -> tuple[str, ...] | None:
    """The primary key columns in key order, ``()`` without one, None if the table is missing."""
    oid = table_oid(conn, table)
    if oid is None:
        return None
    rows = conn.execute(
        "SELECT a.attname FROM pg_catalog.pg_index i "
        "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
        (oid,),
    ).fetchall()
    return tuple(str(r[0]) for r in rows)


def table_kind(conn: psycopg.Connection[Any], table: TableRef) -> tuple[bool, bool] | None:
    """(partitioned, has inheritance children) of a table, None if it is missing."""
    row = conn.execute(
        "SELECT c.relkind = 'p', c.relkind = 'r' AND c.relhassubclass " + TABLE_BY_NAME,
        (table.schema, table.name),
    ).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]))


@dataclass(frozen=True, slots=True)
class InstalledTrigger:
    """A trigger whose function lives in the outbox schema."""

    table: TableRef
    name: str
    function: str
    enabled: bool
    row_level: bool = False


def installed_triggers(conn: psycopg.Connection[Any], schema_name: str) -> list[InstalledTrigger]:
    """Every trigger, on any table, that calls a function of the outbox schema."""
    rows = conn.execute(
        "SELECT tn.nspname, c.relname, t.tgname, p.proname, t.tgenabled, "
        "(t.tgtype::int & 1) = 1 "  # TRIGGER_TYPE_ROW
        "FROM pg_catalog.pg_trigger t "
        "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid "
        "JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace "
        "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_catalog.pg_namespace tn ON tn.oid = c.relnamespace "
        "WHERE pn.nspname = %s AND NOT t.tgisinternal "
        "ORDER BY tn.nspname, c.relname, t.tgname",
        (schema_name,),
    ).fetchall()
    # 'O' fires in normal sessions, 'A' always; 'D' is disabled and 'R' fires only on replicas.
    return [
        InstalledTrigger(TableRef(str(s), str(r)), str(t), str(p), str(e) in ("O", "A"), bool(w))
        for s, r, t, p, e, w in rows
    ]


def _installed_functions(conn: psycopg.Connection[Any], schema_name: str) -> list[str]:
    rows = conn.execute(
        "SELECT p.proname FROM pg_catalog.pg_proc p "
        "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.proname LIKE %s ORDER BY p.proname",
        (schema_name, _FUNCTION_PREFIX.replace("_", "\\_") + "%"),
    ).fetchall()
    return [str(r[0]) for r in rows]


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------


def _plain_json(value: Any) -> Any:
    """A JSON value parsed with Decimal floats -> what ``json.loads`` would have returned.

    ``parse_float`` only sees literals with a fraction or exponent, so every Decimal was a float;
    an integral one (``1.0``) stays a float, as in the column's own text.
    """
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _converter(decoder: TextDecoder, column: ColumnInfo) -> Callable[[Any], Any]:
    """How one column's ``row_to_json`` value becomes the value the logical source would give.

    What ``row_to_json`` cannot give back: real/double values are as exact as the writing
    session's ``extra_float_digits`` printed them (the default prints them exactly); a
    composite-type column arrives as a dict instead of its text form. (Images that older versions
    stored with ``to_jsonb`` also give json columns jsonb's key order, without duplicate keys.)
    """
    oid = column.type_oid
    if oid in _JSON_OIDS:
        return _plain_json
    decode = decoder.decode_json_value
    if oid in _TEXT_OIDS:
        return lambda v: v if type(v) is str else decode(oid, v)
    if oid in _INT_OIDS:
        return lambda v: v if type(v) is int else decode(oid, v)
    if oid == _BOOL_OID:
        return lambda v: v if type(v) is bool else decode(oid, v)
    return lambda v: decode(oid, v)


# Column types whose JSON value already is the Python value the logical source gives.
_IDENTITY_OIDS = _TEXT_OIDS | _INT_OIDS | {_BOOL_OID}


@dataclass(slots=True)
class _TablePlan:
    """Per-table decoding: column names in table order with their converters, the columns
    whose JSON value needs converting, and the primary key (empty without one)."""

    columns: list[tuple[str, Callable[[Any], Any]]]
    names: frozenset[str]
    key: tuple[str, ...] = ()
    order: tuple[str, ...] = ()
    converted: list[tuple[str, Callable[[Any], Any]]] = field(default_factory=list)
    # The columns rows carry when the rules read only some (None: all of them).
    kept: tuple[str, ...] | None = None


# ------------------------------------------------------------------------------------------
# The source
# ------------------------------------------------------------------------------------------


def _id_array(ids: list[int]) -> str:
    """Outbox ids as one array literal: psycopg's list dumper handles each element in Python,
    a few percent of the consumer's time at a thousand ids per batch."""
    return "{" + ",".join(map(str, ids)) + "}"


def wait_for_notify(conn: psycopg.Connection[Any], timeout_s: float) -> bool:
    """Whether a notification came within ``timeout_s``, counting one libpq already parsed.

    psycopg (3.3, both implementations) hands on the notifications libpq parsed *before* it
    parses what a pipeline read, so one that came in with a pipeline's last results stays
    parsed inside libpq, while ``notifies()`` waits for new bytes on the socket and never asks
    libpq: the wakeup was lost until the poll. A NOTIFY that a writer sends as the consumer
    takes its sleep lock arrives just so, before the pipeline's ReadyForQuery.
    """
    pgconn = conn.pgconn
    parsed = False
    while pgconn.notifies() is not None:
        parsed = True
    if parsed:
        return True
    for _ in conn.notifies(timeout=timeout_s, stop_after=1):
        return True
    return False


def _shutdown(conn: psycopg.Connection[Any]) -> None:
    # Only the socket is touched: psycopg connections are not meant to be closed from another
    # thread, while shutdown() makes the stream thread's blocked read fail at once.
    with contextlib.suppress(Exception):
        if conn.closed:
            return
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class _Session:
    """One connection's worth of consuming state; discarded on reconnect.

    ``conn`` holds the advisory lock, LISTENs and holds the open batch transaction; ``meta``
    (autocommit) serves catalog reads and the decoder's type lookups, so a failing lookup can
    never abort the batch transaction.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        meta: psycopg.Connection[Any],
        columns: Mapping[TableRef, frozenset[str]] | None = None,
    ) -> None:
        self.conn = conn
        self.meta = meta
        # The only columns the rules read, by table: rows carry just these (see ``row``).
        self.needed = dict(columns or {})
        # Whether ``conn`` holds the sleep lock: writers notify only while it does.
        self.asleep = False
        self.decoder = TextDecoder(meta)
        self.plans: dict[TableRef, _TablePlan | None] = {}
        self.refreshed: set[TableRef] = set()

    def abort(self) -> None:
        _shutdown(self.conn)
        _shutdown(self.meta)

    def close(self) -> None:
        close_quietly(self.conn)
        close_quietly(self.meta)

    def plan(self, table: TableRef, refresh: bool = False) -> _TablePlan | None:
        if not refresh and table in self.plans:
            return self.plans[table]
        columns = table_columns(self.meta, table)
        plan = None
        if columns is not None:
            converters = [(c.name, _converter(self.decoder, c)) for c in columns]
            names = frozenset(c.name for c in columns)
            key = primary_key(self.meta, table) or ()
            needed = self.needed.get(table)
            kept: tuple[str, ...] | None = None
            if needed is not None and needed <= names:
                # The primary key stays too: ``rekeyed`` compares it. A rule column the table
                # lacks leaves every column in, so the rules still say what is missing.
                kept = tuple(c.name for c in columns if c.name in needed or c.name in key)
            plan = _TablePlan(
                converters,
                names,
                key,
                tuple(c.name for c in columns),
                [
                    pair
                    for pair, c in zip(converters, columns, strict=True)
                    if c.type_oid not in _IDENTITY_OIDS and (kept is None or c.name in kept)
                ],
                kept,
            )
        self.plans[table] = plan
        return plan

    def rekeyed(self, table: TableRef, before: dict[str, Any], after: dict[str, Any]) -> bool:
        """Whether an UPDATE changed the row's primary key (False without a known key)."""
        plan = self.plans[table] if table in self.plans else self.plan(table)
        return plan is not None and any(before.get(k) != after.get(k) for k in plan.key)

    def row(self, table: TableRef, text: str | None) -> dict[str, Any] | None:
        """An outbox image (JSON text) as a row dict in the table's column order."""
        if text is None:
            return None
        raw: dict[str, Any] = _decode_image(text)
        plan = self.plans[table] if table in self.plans else self.plan(table)
        if plan is not None and tuple(raw) == plan.order:
            # The common case, and the hot path: row_to_json wrote the columns we know in table
            # order, so the parsed dict is the row once the few typed values are converted (of
            # the columns the rules read, when they read only some).
            if plan.kept is not None:
                raw = {name: raw[name] for name in plan.kept}
            for name, convert in plan.converted:
                value = raw[name]
                if value is not None:
                    raw[name] = convert(value)
            return raw
        if plan is not None and not plan.names.issuperset(raw) and table not in self.refreshed:
            # A column we do not know: the table changed since we looked (ALTER TABLE ADD).
            # Refreshed at most once per table and batch, since rows written before a DROP
            # COLUMN keep naming the dropped column until they are consumed.
            self.refreshed.add(table)
            plan = self.plan(table, refresh=True)
        if plan is None:
            return {k: _plain_json(v) for k, v in raw.items()}
        row: dict[str, Any] = {}
        for name, convert in plan.columns:
            if name in raw:
                value = raw[name]
                row[name] = None if value is None else convert(value)
        if len(row) != len(raw):
            for name, value in raw.items():
                if name not in row:
                    row[name] = _plain_json(value)
        return row


@dataclass(slots=True)
class _StreamState:
    """What survives reconnects within one ``stream()`` call."""

    # The highest position version handed out; versions only grow (see _transactions).
    high: int
    standby_logged: bool = False


class PostgresNotifySource:
    """Implements ``worker.interfaces.Source`` by consuming the trigger-fed outbox table."""

    kind = KIND

    def __init__(self, options: PostgresOptions) -> None:
        self.options = options
        self._tables = frozenset(options.tables)
        self._table_refs: dict[tuple[str, str], TableRef] = {
            (t.schema, t.name): t for t in options.tables
        }
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sessions: list[_Session] = []
        self._ctl: psycopg.Connection[Any] | None = None
        self._ctl_lock = threading.Lock()
        self._ack = threading.Condition()
        self._acked: Position | None = None
        # The last position of the batch the stream thread holds locked, until it committed.
        self._pending: Position | None = None
        self._last_check_error: CacheWorkerError | None = None
        self._lock_key = lock_key(options.schema_name)
        self._batch_lock_key = batch_lock_key(options.schema_name)
        self._sleep_lock_key = sleep_lock_key(options.schema_name)
        outbox = _outbox(options)
        select = (
            "SELECT id, txid::text, op, table_schema, table_name, old::text, new::text, "
            "extract(epoch FROM created_at)::float8 FROM {} {}ORDER BY id LIMIT %s "
            "FOR UPDATE SKIP LOCKED"
        )
        self._select = sql.SQL(select).format(outbox, sql.SQL(""))
        # The next batch of a chain (see _chain): the rows after the last one read.
        self._select_after = sql.SQL(select).format(outbox, sql.SQL("WHERE id > %s "))
        self._delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s::bigint[])").format(outbox)
        self._pending_rows = sql.SQL("SELECT EXISTS (SELECT FROM {})").format(outbox)

    # -- connections ------------------------------------------------------------------------

    def _translate(self, exc: BaseException) -> CacheWorkerError:
        if isinstance(exc, pg_errors.UndefinedTable | pg_errors.InvalidSchemaName):
            return SourceMisconfigured(
                f"the outbox {self.options.schema_name}.{OUTBOX_TABLE} is missing on "
                f"{self.options.target}: {error_text(exc, self.options)}; {SETUP_HINT}"
            )
        return translate_error(exc, self.options)

    def _control(self, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``fn`` on the control connection (checks, columns, backlog); errors translated."""
        with self._ctl_lock:
            try:
                if self._ctl is None or self._ctl.closed:
                    self._ctl = connect(self.options)
                return fn(self._ctl)
            except CacheWorkerError:
                raise
            except Exception as exc:
                if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                    close_quietly(self._ctl)
                    self._ctl = None
                raise self._translate(exc) from exc

    # -- setup and teardown ----------------------------------------------------------------

    def setup(self, dry_run: bool = False) -> list[str]:
        """Create the outbox, the capture functions and triggers; returns the SQL (idempotent).

        Also drops this schema's triggers and functions on tables the rules no longer name, so
        the captured set is exactly the rule tables. With ``dry_run`` nothing is changed: only
        the catalog is read (primary keys, existing triggers) to produce the SQL.
        """
        return self._run_ddl(self._setup_statements, dry_run, "setup")

    def teardown(self, dry_run: bool = False) -> list[str]:
        """Drop every trigger calling this schema's functions, then the schema with the outbox.

        Rows still in the outbox are lost with it: their changes never reach the cache.
        """
        return self._run_ddl(self._teardown_statements, dry_run, "teardown")

    def _run_ddl(
        self,
        plan: Callable[[psycopg.Connection[Any]], list[sql.Composed]],
        dry_run: bool,
        what: str,
    ) -> list[str]:
        conn = connect(self.options)
        try:
            return self._ddl(conn, plan, dry_run, what)
        except CacheWorkerError:
            raise
        except Exception as exc:
            # Not _translate: a missing table here is a rule table, not the outbox.
            raise translate_error(exc, self.options) from exc
        finally:
            close_quietly(conn)

    def _ddl(
        self,
        conn: psycopg.Connection[Any],
        plan: Callable[[psycopg.Connection[Any]], list[sql.Composed]],
        dry_run: bool,
        what: str,
    ) -> list[str]:
        statements = plan(conn)
        texts = [s.as_string(conn) for s in statements]
        if not dry_run:
            # One transaction: a failure leaves the previous state, and replacing a trigger
            # leaves no moment without one.
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)
            log.info(
                f"outbox_{what}",
                target=self.options.target,
                schema=self.options.schema_name,
                tables=[str(t) for t in self.options.tables],
                statements=len(texts),
            )
        return texts

    def _setup_statements(self, conn: psycopg.Connection[Any]) -> list[sql.Composed]:
        opts = self.options
        statements = outbox_sql(opts)
        statements.extend(outbox_upgrade_sql(conn, opts))
        missing: list[str] = []
        wanted_functions: set[str] = set()
        for table in opts.tables:
            kind = table_kind(conn, table)
            if kind is None:
                missing.append(str(table))
                continue
            partitioned, inherited = kind
            if inherited:
                log.warning(
                    "outbox_inheritance_children",
                    table=str(table),
                    reason="the rows of its inheritance children are not captured when an UPDATE "
                    "of this table changes them (row triggers do not fire for child rows), nor "
                    "when a statement names a child table",
                )
            wanted_functions.add(function_name(table))
            statements.append(capture_function_sql(opts, table))
            statements.extend(trigger_sql(opts, table, partitioned))
        if missing:
            raise SchemaError(
                f"cannot capture changes of missing table(s) {', '.join(missing)} on {opts.target}"
            )
        for trigger in installed_triggers(conn, opts.schema_name):
            if trigger.table not in self._tables:
                statements.append(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(trigger.name), qualified(trigger.table)
                    )
                )
        for name in _installed_functions(conn, opts.schema_name):
            if name not in wanted_functions:
                statements.append(
                    sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                        sql.Identifier(opts.schema_name, name)
                    )
                )
        return statements

    def _teardown_statements(self, conn: psycopg.Connection[Any]) -> list[sql.Composed]:
        statements: list[sql.Composed] = [
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(trigger.name), qualified(trigger.table)
            )
            for trigger in installed_triggers(conn, self.options.schema_name)
        ]
        statements.append(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(self.options.schema_name)
            )
        )
        return statements

    # -- Source protocol -------------------------------------------------------------------

    def initial_position(self) -> Position:
        """Version 0: ``start`` does not matter, the outbox holds exactly what is unconsumed."""
        return make_position(0, 0)

    def ack(self, position: Position) -> None:
        """Record that the run loop applied everything up to ``position``; never blocks.

        The stream thread, waiting for this, deletes the acknowledged batch and commits on its
        own connection.
        """
        with self._ack:
            if self._acked is None or self._acked.version < position.version:
                self._acked = position
                self._ack.notify_all()

    def columns(self, table: TableRef) -> list[str] | None:
        """Column names in table order, or None when the table does not exist."""
        found = self._control(lambda conn: table_columns(conn, table))
        return [c.name for c in found] if found is not None else None

    def describe_position(self, position: Position) -> str:
        return describe_position(position)

    def progress_fields(self) -> dict[str, object]:
        """Fields for the run loop's ``progress`` event: rows waiting in the outbox and age.

        The run loop asks between batches, so this must cost little: ``count(*)`` scans the
        whole outbox, tens of milliseconds on a backlog or right after one (dead rows), a stall
        that showed as a lag spike at every progress event. The id range of the waiting rows
        answers from the primary key alone; it counts ids of rolled-back writes too, so it is
        an upper bound (``check`` gives the exact count).
        """

        def query(conn: psycopg.Connection[Any]) -> tuple[int, float | None]:
            outbox = _outbox(self.options)
            row = conn.execute(
                sql.SQL(
                    "SELECT max(id) - min(id) + 1, extract(epoch FROM clock_timestamp() - "
                    "(SELECT created_at FROM {} ORDER BY id LIMIT 1))::float8 FROM {}"
                ).format(outbox, outbox)
            ).fetchone()
            assert row is not None
            return int(row[0] or 0), (float(row[1]) if row[1] is not None else None)

        rows, oldest = self._control(query)
        return {"outbox_backlog": rows, "outbox_oldest_s": oldest}

    def outbox_backlog(self) -> tuple[int, float | None]:
        """Rows waiting in the outbox and the age in seconds of the oldest (None when empty)."""

        def query(conn: psycopg.Connection[Any]) -> tuple[int, float | None]:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at))"
                    "::float8 FROM {}"
                ).format(_outbox(self.options))
            ).fetchone()
            assert row is not None
            return int(row[0]), (float(row[1]) if row[1] is not None else None)

        return self._control(query)

    def close(self) -> None:
        """Stop streaming; safe from any thread, and makes a blocked ``stream()`` return.

        The unacknowledged batch is not deleted: closing the connection rolls its transaction
        back, so the rows stay for the next consumer.
        """
        self._closing.set()
        with self._ack:
            self._ack.notify_all()
            # A graceful stop acks its last batch right before closing: let the stream thread
            # delete and commit it, or the next start would read it again.
            deadline = time.monotonic() + _CLOSE_GRACE_S
            while self._pending is not None and self._covered(self._pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ack.wait(remaining)
        with self._lock:
            for session in self._sessions:
                session.abort()
        with self._ctl_lock:
            close_quietly(self._ctl)
            self._ctl = None

    # -- checks ----------------------------------------------------------------------------

    def checks(self) -> list[CheckResult]:
        """Reachability, outbox, triggers per rule table, backlog and privileges; never raises."""
        self._last_check_error = None
        results = base_checks(self.options)
        names = [CHECK_OUTBOX, *self._trigger_check_names(), CHECK_BACKLOG, CHECK_PRIVILEGES]
        try:
            self._control(lambda conn: None)
        except CacheWorkerError as exc:
            self._last_check_error = exc
            if results and results[0].name == CHECK_REACHABLE and results[0].ok:
                results[0] = CheckResult(CHECK_REACHABLE, False, str(exc))
            return results + [
                CheckResult(name, False, "not checked: the server is unreachable") for name in names
            ]
        outbox = self._check(CHECK_OUTBOX, self._check_outbox)
        results.extend(outbox)
        for table in self.options.tables:
            name = f"{CHECK_TRIGGERS} {table}"
            results.extend(self._check(name, functools.partial(self._check_triggers, table=table)))
        if outbox[0].ok:
            results.extend(self._check(CHECK_BACKLOG, self._check_backlog))
            results.extend(self._check(CHECK_PRIVILEGES, self._check_privileges))
        else:
            results.append(CheckResult(CHECK_BACKLOG, False, "not checked: no outbox"))
            results.append(CheckResult(CHECK_PRIVILEGES, False, "not checked: no outbox"))
        return results

    def _trigger_check_names(self) -> list[str]:
        return [f"{CHECK_TRIGGERS} {t}" for t in self.options.tables]

    def _check(
        self, name: str, fn: Callable[[psycopg.Connection[Any]], CheckResult]
    ) -> list[CheckResult]:
        try:
            return [self._control(fn)]
        except CacheWorkerError as exc:
            return [CheckResult(name, False, f"could not check: {exc}")]

    def _outbox_oid(self, conn: psycopg.Connection[Any]) -> tuple[bool, int | None]:
        """Whether the schema exists, and the outbox's OID; from the catalog, because name
        lookups (``to_regclass``, ``::regclass``) fail without USAGE on the schema."""
        row = conn.execute(
            "SELECT n.oid IS NOT NULL, c.oid FROM (SELECT 1) AS one "
            "LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = %s "
            "LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = %s "
            "AND c.relkind IN ('r', 'p')",
            (self.options.schema_name, OUTBOX_TABLE),
        ).fetchone()
        assert row is not None
        return bool(row[0]), (int(row[1]) if row[1] is not None else None)

    def _check_outbox(self, conn: psycopg.Connection[Any]) -> CheckResult:
        schema = self.options.schema_name
        schema_exists, oid = self._outbox_oid(conn)
        if not schema_exists:
            return CheckResult(CHECK_OUTBOX, False, f"schema {schema} does not exist; {SETUP_HINT}")
        if oid is None:
            return CheckResult(
                CHECK_OUTBOX, False, f"table {schema}.{OUTBOX_TABLE} does not exist; {SETUP_HINT}"
            )
        return CheckResult(CHECK_OUTBOX, True, f"{schema}.{OUTBOX_TABLE} exists")

    def _check_triggers(self, conn: psycopg.Connection[Any], table: TableRef) -> CheckResult:
        name = f"{CHECK_TRIGGERS} {table}"
        kind = table_kind(conn, table)
        if kind is None:
            return CheckResult(name, False, f"table {table} does not exist")
        schema = self.options.schema_name
        ours = {
            t.name: t
            for t in installed_triggers(conn, schema)
            if t.table == table and t.function == function_name(table)
        }
        partitioned = kind[0]
        specs = trigger_specs(partitioned)
        current = [trigger_name(schema, op) for op, _event, _level in specs]
        row_level = {trigger_name(schema, op) for op, _event, level in specs if level == "ROW"}
        older = [trigger_name(schema, op) for op in _CAPTURE_OPS]
        if not partitioned:
            older = [trigger_name(schema, op) for op in ("row", "truncate")]
        # Either set captures correctly. What older versions of setup installed (the same
        # names with a statement-level UPDATE trigger, or one row trigger for all three
        # operations) costs the application more per write.
        for wanted in (current, older):
            if all(w in ours for w in wanted):
                disabled = [w for w in wanted if not ours[w].enabled]
                if disabled:
                    return CheckResult(
                        name,
                        False,
                        f"trigger(s) {', '.join(disabled)} are disabled; ALTER TABLE ... "
                        f"ENABLE TRIGGER or {SETUP_HINT}",
                    )
                if wanted is older or any(ours[w].row_level != (w in row_level) for w in wanted):
                    return CheckResult(
                        name,
                        True,
                        "capture triggers of an older setup present; they capture correctly "
                        f"but cost more per write: {SETUP_HINT}",
                        warning=True,
                    )
                return CheckResult(name, True, "capture triggers present")
        present = sorted(ours)
        return CheckResult(
            name,
            False,
            f"capture triggers missing (present: {', '.join(present) or 'none'}); changes of "
            f"{table} are not captured; {SETUP_HINT}",
        )

    def _check_backlog(self, conn: psycopg.Connection[Any]) -> CheckResult:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at))::float8 "
                "FROM {}"
            ).format(_outbox(self.options))
        ).fetchone()
        assert row is not None
        count, age = int(row[0]), (float(row[1]) if row[1] is not None else None)
        detail = f"{count} row(s) waiting"
        if age is not None:
            detail += f", oldest {age:.1f}s old"
        limit = BACKLOG_WARN_FACTOR * self.options.outbox_batch
        warn = (age is not None and age > BACKLOG_WARN_AGE_S) or count > limit
        if warn:
            detail += (
                f" (more than {BACKLOG_WARN_AGE_S:.0f}s or {limit} rows: no worker is consuming, "
                "or it cannot keep up)"
            )
        return CheckResult(CHECK_BACKLOG, True, detail, warning=warn)

    def _check_privileges(self, conn: psycopg.Connection[Any]) -> CheckResult:
        schema = self.options.schema_name
        outbox = sql.Identifier(schema, OUTBOX_TABLE).as_string(conn)
        _exists, oid = self._outbox_oid(conn)
        row = conn.execute(
            "SELECT quote_ident(current_user), has_schema_privilege(n.oid, 'USAGE'), "
            "has_table_privilege(%s::oid, 'SELECT'), has_table_privilege(%s::oid, 'UPDATE'), "
            "has_table_privilege(%s::oid, 'DELETE') "
            "FROM pg_catalog.pg_namespace n WHERE n.nspname = %s",
            (oid, oid, oid, schema),
        ).fetchone()
        assert row is not None
        user = str(row[0])
        privileges = ("SELECT", "UPDATE", "DELETE")
        missing = [p for p, ok in zip(privileges, row[2:], strict=True) if not ok]
        fixes = []
        if not row[1]:
            fixes.append(f"GRANT USAGE ON SCHEMA {schema} TO {user};")
        if missing:
            # SELECT ... FOR UPDATE needs UPDATE besides SELECT; consuming deletes.
            fixes.append(f"GRANT {', '.join(missing)} ON {outbox} TO {user};")
        if fixes:
            return CheckResult(
                CHECK_PRIVILEGES, False, f"{user} lacks privileges; fix: {' '.join(fixes)}"
            )
        return CheckResult(CHECK_PRIVILEGES, True, f"{user} may SELECT, UPDATE, DELETE {outbox}")

    # -- streaming -------------------------------------------------------------------------

    def stream(self, start: Position) -> Iterator[SourceItem]:
        """Yield the outbox's transactions (and idle heartbeats) until ``close()``; reconnects."""
        if "id" not in start.coords:
            log.warning(
                "checkpoint_not_an_outbox_position",
                position=start.to_dict(),
                action="ignored: the outbox holds what is unconsumed",
            )
        state = _StreamState(high=start.version)
        attempt = 0
        while not self._closing.is_set():
            session: _Session | None = None
            try:
                session = self._open_session()
                if not self._become_consumer(session, state):
                    return
                for item in self._consume(session, state):
                    attempt = 0
                    yield item
                return
            except Exception as exc:
                if self._closing.is_set():
                    return
                error = self._translate(exc)
                if not error.retryable:
                    if error is exc:
                        raise
                    raise error from exc
                attempt += 1
                ceiling = min(self.options.reconnect_max_backoff_s, 0.2 * 2 ** min(attempt, 20))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                log.warning(
                    "source_reconnect",
                    attempt=attempt,
                    error_class=type(exc).__name__,
                    error=str(error),
                    backoff_s=round(delay, 3),
                )
                if self._closing.wait(delay):
                    return
            finally:
                if session is not None:
                    with self._lock:
                        if session in self._sessions:
                            self._sessions.remove(session)
                    session.close()

    def _open_session(self) -> _Session:
        conn = connect(self.options)
        try:
            meta = connect(self.options)
        except BaseException:
            close_quietly(conn)
            raise
        session = _Session(conn, meta, self.options.columns)
        with self._lock:
            self._sessions.append(session)
        if self._closing.is_set():
            session.abort()
        # The batch transaction idles while the run loop applies it to Redis, which may take
        # as long as a Redis outage lasts; a server-wide timeout would only cause a re-read.
        conn.execute("SET idle_in_transaction_session_timeout = 0")
        return session

    def _become_consumer(self, session: _Session, state: _StreamState) -> bool:
        """Wait for the outbox's session advisory lock; False when closed while waiting."""
        opts = self.options
        while not self._closing.is_set():
            row = session.conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,))
            got = row.fetchone()
            if got is not None and got[0]:
                log.info(
                    "outbox_consumer",
                    target=opts.target,
                    schema=opts.schema_name,
                    channel=opts.channel,
                    took_over=state.standby_logged,
                )
                state.standby_logged = False
                return True
            if not state.standby_logged:
                state.standby_logged = True
                log.info(
                    "outbox_standby",
                    target=opts.target,
                    schema=opts.schema_name,
                    reason="another worker consumes this outbox; taking over when it stops",
                )
            if self._closing.wait(min(opts.poll_interval_s, _STANDBY_RETRY_S)):
                return False
        return False

    def _consume(self, session: _Session, state: _StreamState) -> Iterator[SourceItem]:
        """Batches in a loop: lock, read, hand over, wait for the ack, delete, commit.

        The statements of each step go to the server as one pipeline (one round trip, not one
        per statement), and the delete and commit of an acknowledged batch travel with the
        reads of the next one. Round trips are what a woken consumer spends its time on before
        a change reaches Redis, and what the run loop waits for between batches.
        """
        conn = session.conn
        opts = self.options
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(opts.channel)))
        done: list[int] | None = None  # an acknowledged batch, deleted with the next read
        while True:
            # Notifications that arrived while the last batch was handled are covered by the
            # SELECT below; draining them first saves an empty round after it.
            for _ in conn.notifies(timeout=0):
                pass
            closing = self._closing.is_set()
            if closing and done is None:
                return
            unlock = session.asleep and not closing
            try:
                with conn.pipeline():
                    if done is not None:
                        conn.execute(self._delete, (_id_array(done),))
                        conn.execute("COMMIT")
                    if not closing:
                        if unlock:
                            # Awake: writers may skip their NOTIFY again. (Should the outbox
                            # be empty after all, _sleep takes the lock again.)
                            conn.execute("SELECT pg_advisory_unlock(%s)", (self._sleep_lock_key,))
                        conn.execute("BEGIN")
                        locking = conn.execute(
                            "SELECT pg_try_advisory_xact_lock(%s)", (self._batch_lock_key,)
                        )
                        reading = conn.execute(self._select, (opts.outbox_batch,))
            finally:
                if done is not None:
                    done = None
                    with self._ack:
                        self._pending = None
                        self._ack.notify_all()
            if closing:
                return
            if unlock:
                session.asleep = False
            locked = locking.fetchone()
            if locked is None or not locked[0]:
                # Only possible when the session lock is not ours alone (a transaction pool).
                conn.execute("ROLLBACK")
                self._sleep(session, commit=False)
                continue
            rows = reading.fetchall()
            if not rows:
                yield Heartbeat(None, caught_up=True)
                self._sleep(session, commit=True)
                continue
            done = yield from self._chain(session, state, rows)
            if done is None:
                return

    def _chain(
        self, session: _Session, state: _StreamState, rows: list[tuple[Any, ...]]
    ) -> Generator[SourceItem, None, list[int] | None]:
        """Hand over a batch and, while the outbox has more, the batches after it (read ahead);
        return the ids to delete and commit once the last is acked (None: closed meanwhile).

        The source used to idle while the run loop applied a batch (a fifth of a drain's wall
        time), and the run loop while the source read the next. A full batch says more is
        waiting, so the next one is read at once, in the same transaction (its row locks and
        batch lock hold), at most ``_AHEAD`` unacknowledged batches in flight. Batches acked
        meanwhile are deleted with the next read and committed when the chain ends: a crash
        mid-chain replays them, which is harmless; losing one would not be. A chain reads ids
        above the last one read, so a writer that committed rows with lower ids after the chain
        began waits for the next chain, which starts from the lowest id: hence the bound on a
        chain's length (also how long its deletes stay uncommitted).
        """
        conn = session.conn
        opts = self.options
        began = time.monotonic()
        in_flight: deque[tuple[list[int], Position | None]] = deque()
        deletable: list[int] = []  # acked (or irrelevant) ids, deleted with the next read
        reads = 0
        while True:
            reads += 1
            session.refreshed.clear()
            items = self._transactions(session, rows, state)
            yield from items
            in_flight.append(([row[0] for row in rows], items[-1].position if items else None))
            more = (
                len(rows) >= opts.outbox_batch
                and reads < _CHAIN_READS
                and time.monotonic() - began < _CHAIN_S
            )
            if not more or self._closing.is_set():
                break
            # The run loop need not wait for more: the next read takes a round trip.
            yield Heartbeat(None, flush=True)
            self._take_acked(in_flight, deletable)
            while len(in_flight) >= _AHEAD:
                # _take_acked left a batch at the head only if it waits for an ack.
                target = in_flight[0][1]
                assert target is not None
                if not self._wait_for_ack(target, last=False):
                    return self._acked_ids(in_flight, deletable)
                self._take_acked(in_flight, deletable)
            with conn.pipeline():
                if deletable:
                    conn.execute(self._delete, (_id_array(deletable),))
                    deletable = []
                reading = conn.execute(self._select_after, (rows[-1][0], opts.outbox_batch))
            rows = reading.fetchall()
            if not rows:
                break
        last = next((p for _, p in reversed(in_flight) if p is not None), None)
        if last is not None:
            # The next batch is read only once this one is acked (then deleted): the run
            # loop must not hold it back waiting for more.
            yield Heartbeat(None, flush=True)
            if not self._wait_for_ack(last):
                return self._acked_ids(in_flight, deletable)
        done = deletable + [i for ids, _ in in_flight for i in ids]
        log.debug(
            "outbox_batch_consumed",
            rows=len(done),
            reads=reads,
            first_id=done[0] if done else None,
            last_id=done[-1] if done else None,
        )
        return done

    def _take_acked(
        self, in_flight: deque[tuple[list[int], Position | None]], into: list[int]
    ) -> None:
        """Move the ids of the leading batches that are acked (or hold nothing to ack) to
        ``into``."""
        while in_flight and (in_flight[0][1] is None or self._covered(in_flight[0][1])):
            into.extend(in_flight.popleft()[0])

    def _acked_ids(
        self, in_flight: deque[tuple[list[int], Position | None]], deletable: list[int]
    ) -> list[int] | None:
        """On close mid-chain: the ids of the batches acked so far (None if there are none)."""
        done = list(deletable)
        self._take_acked(in_flight, done)
        return done or None

    def _sleep(self, session: _Session, commit: bool) -> None:
        """Idle until a NOTIFY, ``poll_interval_s`` (the safety net) or close().

        First takes the sleep lock (see ``capture_function_sql``), waiting for writers that
        skipped their NOTIFY to commit, then looks at the outbox once more: their rows are
        visible now. The wait for the lock is sliced, so a long open writer transaction only
        delays sleeping; writers notify meanwhile (they queue behind our lock request).
        ``commit``: the empty batch's transaction is still open (it ends in the same round trip).
        """
        conn = session.conn
        deadline = time.monotonic() + self.options.poll_interval_s
        while not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait = min(remaining, _WAIT_SLICE_S)
            if not session.asleep:
                found = self._take_sleep_lock(conn, wait, commit)
                commit = False
                if found is not None:
                    session.asleep = True
                    if found:
                        return
                    continue
                wait = 0.0
            if wait_for_notify(conn, wait):
                return
        if commit:
            conn.execute("COMMIT")

    def _take_sleep_lock(
        self, conn: psycopg.Connection[Any], wait_s: float, commit: bool
    ) -> bool | None:
        """Take the sleep lock within ``wait_s``, then look at the outbox: whether rows wait
        there (None: the lock was not free in time). ``commit`` ends the open transaction first.

        Nothing here is a prepared statement: when the lock times out, the server skips the
        rest of the pipeline, a statement psycopg meant to prepare there included, and its
        prepared-statement cache would then name one the server never made.
        """
        try:
            with conn.pipeline():
                if commit:
                    conn.execute("COMMIT", prepare=False)
                conn.execute("BEGIN", prepare=False)
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (f"{max(1, int(wait_s * 1000))}ms",),
                    prepare=False,
                )
                # Session-level: it outlives this transaction, which only scopes lock_timeout.
                conn.execute("SELECT pg_advisory_lock(%s)", (self._sleep_lock_key,), prepare=False)
                conn.execute("COMMIT", prepare=False)
                found = conn.execute(self._pending_rows, prepare=False)
        except (pg_errors.LockNotAvailable, pg_errors.QueryCanceled):
            # QueryCanceled: a statement_timeout shorter than our lock wait ended it first.
            conn.execute("ROLLBACK")
            return None
        row = found.fetchone()
        return bool(row is not None and row[0])

    def _covered(self, target: Position) -> bool:
        return self._acked is not None and self._acked.version >= target.version

    def _wait_for_ack(self, target: Position, last: bool = True) -> bool:
        """Block until the run loop acked ``target`` (True) or the source closes (False).

        ``last``: ``target`` ends what the stream thread holds, so ``close()`` gives it time to
        delete and commit once acked (see ``close``); a chain's earlier batches are not waited
        for on close (a replay of them is harmless).
        """
        with self._ack:
            if last:
                self._pending = target
            while not self._covered(target):
                if self._closing.is_set():
                    self._pending = None
                    self._ack.notify_all()
                    return False
                self._ack.wait(_WAIT_SLICE_S)
        return True

    def _transactions(
        self, session: _Session, rows: list[tuple[Any, ...]], state: _StreamState
    ) -> list[Transaction]:
        """One ``Transaction`` per database transaction (txid) in the batch.

        Rows of concurrent transactions interleave in id order but touch different rows (a row
        lock serialises writers of one row, so a later change of a row always has a higher id);
        groups are ordered by their last id, the closest we get to commit order. A transaction
        larger than the batch arrives as several Transactions, each acknowledged on its own:
        harmless here because the outbox, not the position, is what resumes.

        Position versions must grow strictly or the run loop never acks them (it acks only a
        position newer than its checkpoint): a late-committing transaction can carry lower ids
        than rows consumed before it, and a batch re-read after a crash carries ids at or below
        the saved checkpoint. Versions are therefore ``max(last id, previous version + 1)``;
        ``coords["id"]`` keeps the real id, and ``RowChange.version`` stays the row's outbox id
        so cache writes are versioned by the database's order, not by consumption order.
        """
        groups: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            groups.setdefault(row[1], []).append(row)
        ordered = sorted(groups.values(), key=lambda g: int(g[-1][0]))
        refs = self._table_refs
        result: list[Transaction] = []
        for group in ordered:
            changes: list[RowChange] = []
            for outbox_id, _txid, op_text, schema, name, old, new, _created in group:
                table = refs.get((schema, name))
                if table is None:
                    # Captured by triggers this worker's rules do not need (another worker's
                    # rules, or a table removed from the rules before the next setup).
                    continue
                op = _OPS.get(op_text)
                if op is None:
                    raise SourceError(f"outbox row {outbox_id} has an unknown op {op_text!r}")
                before = session.row(table, old) if op is not Op.INSERT else None
                after = session.row(table, new) if op in (Op.INSERT, Op.UPDATE) else None
                row_version = int(outbox_id)
                if (
                    op is Op.UPDATE
                    and before is not None
                    and after is not None
                    and session.rekeyed(table, before, after)
                ):
                    # Another primary key is another row to a cache: the old one is gone.
                    changes.append(RowChange(Op.DELETE, table, before, None, row_version))
                    changes.append(RowChange(Op.INSERT, table, None, after, row_version))
                    continue
                changes.append(RowChange(op, table, before, after, row_version))
            if not changes:
                continue
            last_id = int(group[-1][0])
            version = max(last_id, state.high + 1)
            state.high = version
            result.append(
                Transaction(changes, make_position(version, last_id), committed_at=group[-1][7])
            )
        return result


def preflight(options: PostgresOptions) -> None:
    """Raise ``SourceMisconfigured`` (or ``SourceUnavailable``) unless consuming can work.

    Used at ``run`` start: without the outbox schema or a rule table's triggers nothing would be
    captured, without privileges nothing consumed; the message says to run ``cache-worker
    setup``. A large backlog is only a warning.
    """
    source = PostgresNotifySource(options)
    try:
        results = source.checks()
        error = source._last_check_error
    finally:
        source.close()
    if error is not None:
        raise error
    failed = [r for r in results if not r.ok]
    if failed:
        raise SourceMisconfigured(
            "the postgres-notify source cannot consume: "
            + "; ".join(f"{r.name}: {r.detail}" for r in failed)
        )


__all__: Sequence[str] = [
    "CHECK_BACKLOG",
    "CHECK_OUTBOX",
    "CHECK_PRIVILEGES",
    "CHECK_TRIGGERS",
    "KIND",
    "SETUP_HINT",
    "InstalledTrigger",
    "PostgresNotifySource",
    "batch_lock_key",
    "capture_function_sql",
    "describe_position",
    "function_name",
    "installed_triggers",
    "lock_key",
    "make_position",
    "outbox_sql",
    "outbox_upgrade_sql",
    "preflight",
    "primary_key",
    "sleep_lock_key",
    "table_kind",
    "trigger_name",
    "trigger_specs",
    "trigger_sql",
    "wait_for_notify",
]
