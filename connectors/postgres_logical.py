"""The ``postgres-logical`` ``Source``: reads a logical replication slot with the built-in
``pgoutput`` plugin through SQL (``pg_logical_slot_peek_binary_changes``) and turns it into
``Transaction``/``Heartbeat`` items. It owns the slot and the publication (``setup``/``teardown``),
decoding pgoutput protocol v1 (``PgOutputDecoder``), positions (LSNs; the slot itself is the
durable cursor and only advances in ``ack``, after Redis has the changes), keeping the slot from
pinning WAL on quiet databases, reconnecting with backoff, and the preflight checks (wal_level,
slot, publication, replica identity, privileges) behind ``cache-worker check`` and ``run``.
"""

from __future__ import annotations

import bisect
import random
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import sql

from connectors.postgres_common import (
    CHECK_REACHABLE,
    PostgresOptions,
    TextDecoder,
    base_checks,
    cancel_quietly,
    close_quietly,
    connect,
    error_text,
    qualified,
    quoted,
    replica_identity,
    replica_identity_checks,
    server_version,
    table_columns,
    translate_error,
)
from worker.errors import (
    CacheWorkerError,
    PositionLost,
    SchemaError,
    SourceError,
    SourceMisconfigured,
    SourceUnavailable,
)
from worker.events import (
    UNCHANGED,
    Heartbeat,
    Op,
    Position,
    Row,
    RowChange,
    SourceItem,
    TableRef,
    Transaction,
)
from worker.interfaces import CheckResult

log = structlog.get_logger("cache_worker.source.postgres_logical")

kind = "postgres-logical"

CHECK_WAL_LEVEL = "wal_level=logical"
CHECK_SLOT = "replication slot"
CHECK_PUBLICATION = "publication"
CHECK_PRIVILEGES = "privileges"
CHECK_POSITION = "slot position"

SETUP_HINT = "run `cache-worker setup --config <file>`"
SLOT_LOST_HINT = (
    "run `cache-worker setup` to recreate the slot and `cache-worker reset-checkpoint`, then "
    "rewarm: changes made while the slot was missing were not seen"
)
BEHIND_HINT = (
    "run `cache-worker reset-checkpoint`, then rewarm: the changes between the checkpoint and "
    "the slot were consumed without this worker"
)

# A transaction with more rows than this is yielded in chunks (only the last has a position).
CHUNK_ROWS = 5000
# Rows per network round trip while streaming a peek's result; chunks need libpq 17, older
# ones stream row by row (slower, same result).
_FETCH_ROWS = 2000 if psycopg.capabilities.has_stream_chunked() else 1
# Advance the slot through irrelevant WAL once this much piled up, even before heartbeat_s: each
# peek re-decodes everything after the slot's position, so a busy unrelated workload must not
# stay behind it for long.
_ADVANCE_AFTER_BYTES = 16 * 1024 * 1024
# How far a backlog may grow the peek window (rows), unless max_changes is set higher.
_GROWN_LIMIT = 200_000
# While changes flow, the slot follows the acks at most this often: an advance decodes from the
# restart point like a peek does, and until it runs a peek merely returns (and the decoder
# skips) the few transactions yielded since the last one.
_ADVANCE_INTERVAL_S = 0.1
# While changes flow, peeks start at most this often (or every poll_interval, if shorter): each
# costs a round trip and a decode from the restart point however little it brings.
_BUSY_CYCLE_S = 0.01
# After a quiet peek the next one comes this soon, then twice as late each time, up to
# poll_interval: a pause between two commits is usually short, an idle database stays idle.
_FIRST_POLL_S = 0.005
# The restart point nudge (``_nudge``): at most this often while following the WAL's head, once
# this much WAL was written since the last one; backing off to the maximum while running
# transactions make it wait longer than the timeout.
_NUDGE_INTERVAL_S = 0.5
_NUDGE_MAX_INTERVAL_S = 4.0
_NUDGE_MIN_BYTES = 64 * 1024
_NUDGE_TIMEOUT_MS = 20
_PG_EPOCH_OFFSET_S = 946_684_800  # 2000-01-01 (Postgres timestamps) minus 1970-01-01

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_BEGIN = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time


# ------------------------------------------------------------------------------------------
# LSNs and positions
# ------------------------------------------------------------------------------------------


def format_lsn(value: int) -> str:
    """``0x16B3748`` -> ``0/16B3748`` (Postgres' own spelling)."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """``0/16B3748`` -> its integer value; ``ValueError`` for anything else."""
    high, sep, low = text.strip().partition("/")
    if not sep or not high or not low:
        raise ValueError(f"{text!r} is not an LSN like 0/16B3748")
    return (int(high, 16) << 32) | int(low, 16)


def make_position(lsn: int) -> Position:
    """A checkpointable position at ``lsn`` (a commit's end, or WAL passed while idle)."""
    return Position(lsn, {"lsn": format_lsn(lsn)})


def describe_position(position: Position) -> str:
    """Short human text such as ``lsn 0/16B3748``."""
    return f"lsn {position.coords.get('lsn') or format_lsn(position.version)}"


def position_lsn(position: Position) -> int:
    """The LSN a checkpoint stands for; ``SourceError`` if it is not a Postgres position."""
    text = position.coords.get("lsn")
    try:
        if not isinstance(text, str):
            raise ValueError("no lsn")
        lsn = parse_lsn(text)
    except ValueError as exc:
        raise SourceError(
            f"the checkpoint {position.to_dict()} is not a Postgres LSN position (written by "
            "another source kind?); run `cache-worker reset-checkpoint` and rewarm"
        ) from exc
    return lsn


# ------------------------------------------------------------------------------------------
# pgoutput protocol v1
# ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Relation:
    """A pgoutput Relation message: what a relation id means until the next one replaces it."""

    relid: int
    table: TableRef
    replica_identity: str
    names: tuple[str, ...]
    type_oids: tuple[int, ...]
    key_flags: tuple[bool, ...]
    wanted: bool
    # (name, loader, type OID) per column, for wanted relations only: the hot loop's input. A
    # column the rules do not read has no loader: its value is stepped over.
    columns: list[tuple[str, Callable[[bytes], Any] | None, int]] = field(default_factory=list)


class ProtocolError(SourceError):
    """A pgoutput message this decoder cannot read (a bug, or an unsupported server option)."""


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode("utf-8"), end + 1


class PgOutputDecoder:
    """Turns pgoutput protocol v1 messages into ``Transaction`` items, one message at a time.

    ``feed`` returns a ``Transaction`` at each Commit that changed a wanted table, a chunk
    (``position=None``) whenever an open transaction exceeds ``chunk_rows``, or ``None``.
    Transactions whose commit record starts before ``skip_before`` are read but not emitted
    (Relation messages in them still count), which is how already delivered transactions are
    skipped when a peek returns them again. ``loader_for`` gives the fast value loader of a type
    OID; ``decode`` is the careful fallback for a value the loader raised on. ``columns`` names,
    per table, the only columns the rows carry (the rules read no others); a table not in it, or
    whose Relation lacks one of them, gets every column.

    Each ``RowChange.version`` is the LSN where the transaction's commit record starts (known at
    Begin, so chunks can carry it); the position of the transaction is the commit's end LSN. Both
    grow in commit order, and a change's version is below its transaction's position, like the
    MySQL source's start-of-transaction versions.
    """

    def __init__(
        self,
        tables: Collection[TableRef],
        loader_for: Callable[[int], Callable[[bytes], Any]],
        decode: Callable[[int, bytes], Any],
        chunk_rows: int = CHUNK_ROWS,
        columns: Mapping[TableRef, frozenset[str]] | None = None,
    ) -> None:
        self.tables = frozenset(tables)
        self._keep = dict(columns or {})
        self._loader_for = loader_for
        self._decode = decode
        self.chunk_rows = max(1, chunk_rows)
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, str] = {}
        self.skip_before = 0
        self.last_commit_end = 0
        # Messages of skipped transactions since the caller last set this to 0.
        self.skipped = 0
        self.in_transaction = False
        self._skipping = False
        self._version = 0
        self._changes: list[RowChange] = []
        self._chunked = False

    def reset(self) -> None:
        """Forget an open transaction (a peek ended or failed in the middle of one)."""
        self.in_transaction = False
        self._skipping = False
        self._changes = []
        self._chunked = False

    def feed(self, data: bytes) -> Transaction | None:
        """Process one message; see the class docstring for what comes back."""
        if not data:
            raise ProtocolError("empty pgoutput message")
        tag = data[0]
        try:
            if tag in (73, 85, 68):  # I, U, D
                return self._row(tag, data)
            if tag == 66:  # B
                self._begin(data)
                return None
            if tag == 67:  # C
                return self._commit(data)
            if tag == 82:  # R
                self._relation(data)
            elif tag == 84:  # T
                return self._truncate(data)
            elif tag == 89:  # Y
                oid = _U32.unpack_from(data, 1)[0]
                namespace, pos = _read_string(data, 5)
                name, _ = _read_string(data, pos)
                self.types[oid] = f"{namespace}.{name}" if namespace else name
            elif tag in (79, 77):  # O (origin), M (logical message): nothing to do
                pass
            else:
                raise ProtocolError(f"unknown pgoutput message type {chr(tag)!r}")
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"malformed pgoutput {chr(tag)!r} message: {type(exc).__name__}: {exc}"
            ) from exc
        return None

    # -- transactions ----------------------------------------------------------------------

    def _begin(self, data: bytes) -> None:
        if self.in_transaction:
            raise ProtocolError("pgoutput Begin inside an open transaction")
        final_lsn, _ts, _xid = _BEGIN.unpack_from(data, 1)
        self.in_transaction = True
        self._skipping = skipping = final_lsn < self.skip_before
        if skipping:
            self.skipped += 1
        self._version = final_lsn
        self._changes = []
        self._chunked = False

    def _commit(self, data: bytes) -> Transaction | None:
        if not self.in_transaction:
            raise ProtocolError("pgoutput Commit without Begin")
        _flags, _commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
        changes, chunked, skipping = self._changes, self._chunked, self._skipping
        self.reset()
        self.last_commit_end = end_lsn
        if skipping:
            self.skipped += 1
            return None
        if not changes and not chunked:
            return None
        committed_at = ts / 1_000_000 + _PG_EPOCH_OFFSET_S
        return Transaction(changes, make_position(end_lsn), committed_at)

    def _add(self, change: RowChange) -> Transaction | None:
        chunk: Transaction | None = None
        if len(self._changes) >= self.chunk_rows:
            chunk = Transaction(self._changes, None, None)
            self._changes = []
            self._chunked = True
        self._changes.append(change)
        return chunk

    # -- relations -------------------------------------------------------------------------

    def _relation(self, data: bytes) -> None:
        relid = _U32.unpack_from(data, 1)[0]
        namespace, pos = _read_string(data, 5)
        name, pos = _read_string(data, pos)
        identity = chr(data[pos])
        ncols = _U16.unpack_from(data, pos + 1)[0]
        pos += 3
        names: list[str] = []
        oids: list[int] = []
        keys: list[bool] = []
        for _ in range(ncols):
            flags = data[pos]
            column, pos = _read_string(data, pos + 1)
            oid = _U32.unpack_from(data, pos)[0]
            pos += 8  # type OID, type modifier
            names.append(column)
            oids.append(oid)
            keys.append(bool(flags & 1))
        # pgoutput sends an empty namespace for pg_catalog only.
        table = TableRef(namespace or "pg_catalog", name)
        relation = Relation(
            relid, table, identity, tuple(names), tuple(oids), tuple(keys), table in self.tables
        )
        if relation.wanted:
            keep = self._keep.get(table)
            if keep is not None and not keep <= set(names):
                # A rule's column the table no longer has: let the rules see it missing.
                keep = None
            relation.columns = [
                (column, self._loader_for(oid) if keep is None or column in keep else None, oid)
                for column, oid in zip(names, oids, strict=True)
            ]
        self.relations[relid] = relation

    def _wanted(self, relid: int) -> Relation | None:
        relation = self.relations.get(relid)
        if relation is None:
            raise ProtocolError(f"pgoutput change for relation {relid} before its Relation message")
        return relation if relation.wanted else None

    # -- rows ------------------------------------------------------------------------------

    def _row(self, tag: int, data: bytes) -> Transaction | None:
        if not self.in_transaction:
            raise ProtocolError("pgoutput row change outside a transaction")
        if self._skipping:
            self.skipped += 1
            return None
        relation = self._wanted(_U32.unpack_from(data, 1)[0])
        if relation is None:
            return None
        kind_ = data[5]
        pos = 6
        before: Row | None = None
        if tag == 73:  # Insert: N
            if kind_ != 78:
                raise ProtocolError(f"pgoutput Insert with tuple kind {chr(kind_)!r}")
            after, pos, partial = self._tuple(data, pos, relation, False)
            return self._add(RowChange(Op.INSERT, relation.table, None, after, self._version))
        if kind_ in (75, 79):  # K (key columns only) or O (whole old row)
            before, pos, _ = self._tuple(data, pos, relation, kind_ == 75)
            if tag == 68:
                return self._add(RowChange(Op.DELETE, relation.table, before, None, self._version))
            kind_ = data[pos]
            pos += 1
        if tag == 68:
            raise ProtocolError("pgoutput Delete without an old tuple")
        if kind_ != 78:
            raise ProtocolError(f"pgoutput Update with tuple kind {chr(kind_)!r}")
        after, pos, partial = self._tuple(data, pos, relation, False)
        return self._add(
            RowChange(Op.UPDATE, relation.table, before, after, self._version, partial)
        )

    def _tuple(
        self, data: bytes, pos: int, relation: Relation, key_only: bool
    ) -> tuple[Row, int, bool]:
        ncols = _U16.unpack_from(data, pos)[0]
        pos += 2
        names = relation.names
        if ncols != len(names):
            raise ProtocolError(
                f"pgoutput tuple of {relation.table} has {ncols} columns, its Relation "
                f"message {len(names)}"
            )
        row: Row = {}
        partial = False
        unpack_len = _U32.unpack_from
        for name, load, oid in relation.columns:
            kind_ = data[pos]
            if kind_ == 116:  # t: text value
                start = pos + 5
                pos = start + unpack_len(data, pos + 1)[0]
                if load is None:
                    continue
                raw = data[start:pos]
                try:
                    row[name] = load(raw)
                except Exception:
                    row[name] = self._decode(oid, raw)
            elif kind_ == 110:  # n: NULL
                pos += 1
                # A key-only old tuple sends every non-key column as NULL; identity columns are
                # NOT NULL, so a NULL there means "not sent" and is left out, not invented.
                if not key_only and load is not None:
                    row[name] = None
            elif kind_ == 117:  # u: unchanged TOASTed value, not sent
                pos += 1
                if load is not None:
                    row[name] = UNCHANGED
                    partial = True
            else:
                raise ProtocolError(
                    f"pgoutput tuple data kind {chr(kind_)!r} in {relation.table} "
                    "(binary mode is not supported)"
                )
        return row, pos, partial

    def _truncate(self, data: bytes) -> Transaction | None:
        if not self.in_transaction:
            raise ProtocolError("pgoutput Truncate outside a transaction")
        nrels = _U32.unpack_from(data, 1)[0]
        if self._skipping:
            return None
        chunk: Transaction | None = None
        for i in range(nrels):
            relation = self._wanted(_U32.unpack_from(data, 6 + 4 * i)[0])
            if relation is not None:
                change = RowChange(Op.TRUNCATE, relation.table, None, None, self._version)
                chunk = self._add(change) or chunk
        return chunk


# ------------------------------------------------------------------------------------------
# SQL
# ------------------------------------------------------------------------------------------

_PEEK_SQL = (
    "SELECT data FROM pg_catalog.pg_logical_slot_peek_binary_changes("
    "%s::name, NULL, %s::int, 'proto_version', '1', 'publication_names', %s::text)"
)
_SLOT_SQL = (
    "SELECT plugin, database, confirmed_flush_lsn::text, wal_status, active_pid, "
    "pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::bigint, "
    "pg_catalog.current_database() "
    "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s AND slot_type = 'logical'"
)


@dataclass(frozen=True, slots=True)
class _SlotInfo:
    plugin: str
    database: str
    confirmed: int | None
    wal_status: str | None
    active_pid: int | None
    retained_bytes: int | None
    current_database: str


def _slot_info(conn: psycopg.Connection[Any], slot: str) -> _SlotInfo | None:
    with conn.cursor() as cur:
        cur.execute(_SLOT_SQL, (slot,))
        row = cur.fetchone()
    if row is None:
        return None
    plugin, database, confirmed, wal_status, pid, retained, current = row
    return _SlotInfo(
        str(plugin),
        str(database),
        parse_lsn(confirmed) if confirmed else None,
        str(wal_status) if wal_status is not None else None,
        int(pid) if pid is not None else None,
        int(retained) if retained is not None else None,
        str(current),
    )


def _can_log_standby_snapshot(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``pg_log_standby_snapshot()`` exists (16+) and this role may run it."""
    if conn.info.server_version < 160000:
        return False
    row = conn.execute(
        "SELECT pg_catalog.has_function_privilege("
        "'pg_catalog.pg_log_standby_snapshot()', 'EXECUTE')"
    ).fetchone()
    return bool(row and row[0])


def _publication_arg(name: str) -> str:
    # pgoutput splits publication_names like an identifier list, so quote it as one.
    return '"' + name.replace('"', '""') + '"'


def human_bytes(value: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _slot_problem(info: _SlotInfo | None, options: PostgresOptions) -> CacheWorkerError | None:
    """Why streaming from this slot cannot work, as the error to raise, or None."""
    slot = options.slot
    if info is None:
        return PositionLost(f"the replication slot {slot!r} does not exist; {SLOT_LOST_HINT}")
    if info.wal_status == "lost":
        return PositionLost(
            f"the replication slot {slot!r} was invalidated: the server removed WAL it still "
            f"needed (max_slot_wal_keep_size); drop it (`cache-worker teardown`), then "
            f"{SLOT_LOST_HINT}"
        )
    if info.plugin != "pgoutput":
        return SourceMisconfigured(
            f"the replication slot {slot!r} uses the plugin {info.plugin!r}, not pgoutput; it "
            "belongs to something else: set source.slot to another name"
        )
    if info.database != info.current_database:
        return SourceMisconfigured(
            f"the replication slot {slot!r} belongs to database {info.database!r}, not "
            f"{info.current_database!r}: set source.slot to another name"
        )
    return None


def _is_slot_gone(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, psycopg.errors.UndefinedObject) and "replication slot" in text


def _is_publication_gone(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, psycopg.errors.UndefinedObject) and "publication" in text


def _is_slot_invalidated(exc: BaseException) -> bool:
    text = str(exc)
    return "can no longer get changes from replication slot" in text or (
        "replication slot" in text and "invalidated" in text
    )


# ------------------------------------------------------------------------------------------
# The source
# ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    """One connection's worth of streaming state; discarded on reconnect."""

    conn: psycopg.Connection[Any]
    catalog: psycopg.Connection[Any]
    decoder: PgOutputDecoder
    confirmed: int
    # The restart point nudge: the temporary slot's name, the WAL flushed at the last nudge,
    # when the next may come and the interval in force.
    nudge_slot: str = ""
    nudged_lsn: int = 0
    nudge_at: float = 0.0
    nudge_every: float = _NUDGE_INTERVAL_S


class PostgresLogicalSource:
    """Implements ``worker.interfaces.Source`` on a pgoutput logical replication slot.

    Threading: ``stream`` runs on the source thread and owns the streaming connection, which
    both peeks and advances the slot. ``ack`` (main thread) only records the acknowledged LSN and
    wakes the stream, which advances the slot before its next peek: peek and advance both have
    to acquire the slot, so doing both on one connection never fights over it, and ``ack`` never
    blocks the apply loop on a database round trip. ``close`` cancels the stream connection's
    query from any thread.
    """

    kind = kind

    def __init__(self, options: PostgresOptions) -> None:
        self.options = options
        self._tables = frozenset(options.tables)
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._acked = 0
        self._sessions: list[_Session] = []
        self._ctl: psycopg.Connection[Any] | None = None
        self._ctl_lock = threading.Lock()
        self._retained: tuple[float, int | None] | None = None
        self.chunk_rows = CHUNK_ROWS
        # How ``_nudge`` gets a running-transactions record logged: "snapshot" (16+, when
        # allowed), "slot" (a temporary slot), or None once that failed.
        self._nudge_mode: str | None = "slot"

    # -- connections ------------------------------------------------------------------------

    def _control(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run ``fn`` on the control connection (checks, columns, setup); errors translated."""
        with self._ctl_lock:
            try:
                if self._ctl is None or self._ctl.closed:
                    self._ctl = connect(self.options)
                return fn(self._ctl)
            except CacheWorkerError:
                raise
            except Exception as exc:
                if not isinstance(exc, psycopg.errors.DatabaseError) or isinstance(
                    exc, psycopg.OperationalError
                ):
                    close_quietly(self._ctl)
                    self._ctl = None
                raise translate_error(exc, self.options) from exc

    # -- setup -----------------------------------------------------------------------------

    def setup(self, dry_run: bool = False) -> list[str]:
        """Create or update the publication, then create the slot; returns the SQL (idempotent).

        The publication comes first: pgoutput looks it up as of each change's time, so a slot
        older than its publication fails on the changes in between. Creating the slot waits
        for transactions running at that moment to finish.
        """
        return list(self._control(lambda conn: self._setup(conn, dry_run)))

    def _setup(self, conn: psycopg.Connection[Any], dry_run: bool) -> list[str]:
        opts = self.options
        tables = list(dict.fromkeys(opts.tables))
        problems: list[str] = []
        for table in tables:
            identity = replica_identity(conn, table)
            if identity is None:
                raise SchemaError(f"table {table} does not exist")
            if identity.mode != "full" and not identity.columns:
                problems.append(
                    f"{table} has no replica identity, so once published its UPDATEs and "
                    f"DELETEs would fail; run ALTER TABLE {quoted(table)} REPLICA IDENTITY FULL "
                    "(or add a primary key)"
                )
        if problems:
            raise SourceMisconfigured("; ".join(problems))
        statements: list[sql.Composed] = []
        publication = sql.Identifier(opts.publication)
        table_list = sql.SQL(", ").join(qualified(t) for t in tables)
        current = self._publication(conn)
        if current is None:
            statements.append(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(publication, table_list)
            )
        else:
            all_tables, published, actions, filtered = current
            if not all_tables and (published != set(tables) or filtered):
                statements.append(
                    sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(publication, table_list)
                )
            if actions != {"insert", "update", "delete", "truncate"}:
                statements.append(
                    sql.SQL(
                        "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')"
                    ).format(publication)
                )
        slot = _slot_info(conn, opts.slot)
        if slot is None:
            statements.append(
                sql.SQL(
                    "SELECT pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput')"
                ).format(sql.Literal(opts.slot))
            )
        else:
            problem = _slot_problem(slot, opts)
            if problem is not None and not isinstance(problem, PositionLost):
                raise problem
            if slot.wal_status == "lost":
                raise SourceMisconfigured(
                    f"the replication slot {opts.slot!r} was invalidated; drop it with "
                    "`cache-worker teardown`, run setup again, then rewarm"
                )
        texts = [s.as_string(conn) for s in statements]
        if not dry_run:
            for statement, text in zip(statements, texts, strict=True):
                log.info("setup_statement", source=kind, name=opts.name, sql=text)
                conn.execute(statement)
        return texts

    def _publication(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[bool, set[TableRef], set[str], bool] | None:
        """(FOR ALL TABLES, its tables, what it publishes, has row filters/column lists)."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT oid, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate "
                "FROM pg_catalog.pg_publication WHERE pubname = %s",
                (self.options.publication,),
            )
            row = cur.fetchone()
            if row is None:
                return None
            oid, all_tables, *flags = row
            actions = {
                name
                for name, on in zip(("insert", "update", "delete", "truncate"), flags, strict=True)
                if on
            }
            cur.execute(
                "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables "
                "WHERE pubname = %s",
                (self.options.publication,),
            )
            published = {TableRef(str(s), str(t)) for s, t in cur.fetchall()}
            filtered = False
            if conn.info.server_version >= 150000:
                # Row filters and column lists (15+) would hide changes the rules need.
                cur.execute(
                    "SELECT count(*) FROM pg_catalog.pg_publication_rel "
                    "WHERE prpubid = %s AND (prqual IS NOT NULL OR prattrs IS NOT NULL)",
                    (oid,),
                )
                counted = cur.fetchone()
                filtered = bool(counted and counted[0])
        return bool(all_tables), published, actions, filtered

    def teardown(self, dry_run: bool = False) -> list[str]:
        """Drop the slot and the publication if they exist; returns the SQL (idempotent)."""
        return list(self._control(lambda conn: self._teardown(conn, dry_run)))

    def _teardown(self, conn: psycopg.Connection[Any], dry_run: bool) -> list[str]:
        opts = self.options
        statements: list[sql.Composed] = []
        if _slot_info(conn, opts.slot) is not None:
            statements.append(
                sql.SQL("SELECT pg_catalog.pg_drop_replication_slot({})").format(
                    sql.Literal(opts.slot)
                )
            )
        if self._publication(conn) is not None:
            statements.append(
                sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(opts.publication))
            )
        texts = [s.as_string(conn) for s in statements]
        if not dry_run:
            for statement, text in zip(statements, texts, strict=True):
                log.info("teardown_statement", source=kind, name=opts.name, sql=text)
                conn.execute(statement)
        return texts

    # -- Source protocol -------------------------------------------------------------------

    def initial_position(self) -> Position:
        """The slot's ``confirmed_flush_lsn``, for ``start`` "end" and "beginning" alike.

        A slot only holds changes made after it was created and cannot go back, so "beginning"
        means the oldest change the slot still has, which is the same point.
        """
        info = self._control(lambda conn: _slot_info(conn, self.options.slot))
        if info is None:
            raise SourceMisconfigured(
                f"the replication slot {self.options.slot!r} does not exist; {SETUP_HINT}"
            )
        problem = _slot_problem(info, self.options)
        if problem is not None:
            raise problem
        assert info.confirmed is not None
        return make_position(info.confirmed)

    def ack(self, position: Position) -> None:
        """Record that ``position`` is in Redis; the stream thread advances the slot to it."""
        with self._lock:
            if position.version > self._acked:
                self._acked = position.version
        self._wake.set()

    def columns(self, table: TableRef) -> list[str] | None:
        """Column names in ``attnum`` order, or None when the table does not exist."""
        found = self._control(lambda conn: table_columns(conn, table))
        return None if found is None else [c.name for c in found]

    def describe_position(self, position: Position) -> str:
        return describe_position(position)

    def progress_fields(self) -> dict[str, object]:
        """Fields for the run loop's ``progress`` event: the WAL this slot keeps on the server."""
        return {"slot_retained_wal_bytes": self.retained_wal_bytes()}

    def retained_wal_bytes(self) -> int | None:
        """WAL the slot keeps on the server (current WAL LSN - restart_lsn); None if unknown.

        Cached for a second, because the progress event may ask often.
        """
        now = time.monotonic()
        cached = self._retained
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        try:
            info = self._control(lambda conn: _slot_info(conn, self.options.slot))
            value = info.retained_bytes if info is not None else None
        except CacheWorkerError:
            value = None
        self._retained = (now, value)
        return value

    def close(self) -> None:
        """Stop streaming; safe from any thread, and makes a blocked ``stream()`` return."""
        self._closing.set()
        self._wake.set()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            cancel_quietly(session.conn)
        ctl = self._ctl
        cancel_quietly(ctl)
        with self._ctl_lock:
            close_quietly(self._ctl)
            self._ctl = None

    # -- checks ----------------------------------------------------------------------------

    def checks(
        self, key_columns: Mapping[TableRef, AbstractSet[str]] | None = None
    ) -> list[CheckResult]:
        """Reachability, wal_level, slot, publication, replica identity, privileges.

        ``key_columns``: per table, the columns its rules read from old rows (key templates,
        ``when``); without it the replica identity is only reported. Never raises.
        """
        results = base_checks(self.options)
        names = [CHECK_WAL_LEVEL, CHECK_SLOT, CHECK_PUBLICATION, CHECK_PRIVILEGES]
        if not results[0].ok:
            return results + [
                CheckResult(name, False, "not checked: the server is unreachable") for name in names
            ]
        for name, check in (
            (CHECK_WAL_LEVEL, self._check_wal_level),
            (CHECK_SLOT, self._check_slot),
            (CHECK_PUBLICATION, self._check_publication),
            (CHECK_PRIVILEGES, self._check_privileges),
        ):
            try:
                results.append(self._control(check))
            except CacheWorkerError as exc:
                results.append(CheckResult(name, False, f"could not check: {exc}"))
        try:
            results.extend(
                self._control(
                    lambda conn: replica_identity_checks(conn, self.options.tables, key_columns)
                )
            )
        except CacheWorkerError as exc:
            results.append(CheckResult("replica identity", False, f"could not check: {exc}"))
        return results

    def _check_wal_level(self, conn: psycopg.Connection[Any]) -> CheckResult:
        row = conn.execute("SELECT current_setting('wal_level')").fetchone()
        value = str(row[0]) if row else "unknown"
        if value == "logical":
            return CheckResult(CHECK_WAL_LEVEL, True, "wal_level=logical")
        return CheckResult(
            CHECK_WAL_LEVEL,
            False,
            f"wal_level={value}: logical decoding is off; set wal_level=logical in "
            "postgresql.conf and restart the server",
        )

    def _check_slot(self, conn: psycopg.Connection[Any]) -> CheckResult:
        opts = self.options
        info = _slot_info(conn, opts.slot)
        if info is None:
            return CheckResult(
                CHECK_SLOT,
                False,
                f"{opts.slot!r} does not exist; {SETUP_HINT} (if this worker streamed before, "
                "also run `cache-worker reset-checkpoint` and rewarm: changes made while the "
                "slot was missing were not seen)",
            )
        problem = _slot_problem(info, opts)
        if problem is not None:
            return CheckResult(CHECK_SLOT, False, str(problem))
        detail = f"{opts.slot!r} (pgoutput"
        detail += f", active pid {info.active_pid})" if info.active_pid else ", inactive)"
        if info.confirmed is not None:
            detail += f" at {format_lsn(info.confirmed)}"
        if info.retained_bytes is not None:
            detail += f", retains {human_bytes(info.retained_bytes)} of WAL"
        return CheckResult(CHECK_SLOT, True, detail)

    def _check_publication(self, conn: psycopg.Connection[Any]) -> CheckResult:
        opts = self.options
        current = self._publication(conn)
        if current is None:
            return CheckResult(
                CHECK_PUBLICATION, False, f"{opts.publication!r} does not exist; {SETUP_HINT}"
            )
        all_tables, published, actions, filtered = current
        problems = []
        missing = [str(t) for t in opts.tables if not all_tables and t not in published]
        if missing:
            problems.append(f"does not publish {', '.join(missing)}")
        absent = [a for a in ("insert", "update", "delete", "truncate") if a not in actions]
        if absent:
            problems.append(f"does not publish {', '.join(absent)} operations")
        if filtered:
            problems.append("has row filters or column lists")
        if problems:
            return CheckResult(
                CHECK_PUBLICATION,
                False,
                f"{opts.publication!r} {'; '.join(problems)}; {SETUP_HINT}",
            )
        scope = "all tables" if all_tables else f"{len(opts.tables)} rule tables"
        return CheckResult(CHECK_PUBLICATION, True, f"{opts.publication!r} covers {scope}")

    def _check_privileges(self, conn: psycopg.Connection[Any]) -> CheckResult:
        row = conn.execute(
            "SELECT rolsuper, rolreplication, current_user FROM pg_catalog.pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
        if row is None:
            return CheckResult(CHECK_PRIVILEGES, False, "the current role is not in pg_roles")
        superuser, replication, user = bool(row[0]), bool(row[1]), str(row[2])
        no_select = []
        for table in self.options.tables:
            has = conn.execute(
                "SELECT CASE WHEN to_regclass(%s) IS NULL THEN NULL "
                "ELSE has_table_privilege(to_regclass(%s), 'SELECT') END",
                (quoted(table), quoted(table)),
            ).fetchone()
            if has is not None and has[0] is False:
                no_select.append(table)
        if not (superuser or replication):
            return CheckResult(
                CHECK_PRIVILEGES,
                False,
                f"{user} lacks the REPLICATION attribute needed to read a slot; fix: "
                f"ALTER ROLE {sql.Identifier(user).as_string(conn)} REPLICATION",
            )
        granted = "superuser" if superuser else "REPLICATION"
        if no_select:
            grants = "; ".join(
                f"GRANT SELECT ON {quoted(t)} TO {sql.Identifier(user).as_string(conn)}"
                for t in no_select
            )
            return CheckResult(
                CHECK_PRIVILEGES,
                True,
                f"{granted}, but no SELECT on {', '.join(map(str, no_select))} (streaming works; "
                f"rewarming from the tables will not); fix: {grants}",
                warning=True,
            )
        return CheckResult(CHECK_PRIVILEGES, True, f"{granted}, SELECT on every rule table")

    def position_available(self, position: Position) -> CheckResult:
        """Whether the slot still exists and has not moved past the checkpoint."""
        try:
            lsn = position_lsn(position)
            info = self._control(lambda conn: _slot_info(conn, self.options.slot))
        except CacheWorkerError as exc:
            return CheckResult(CHECK_POSITION, False, f"could not check: {exc}")
        problem = _slot_problem(info, self.options)
        if problem is not None:
            return CheckResult(CHECK_POSITION, False, str(problem))
        assert info is not None and info.confirmed is not None
        if info.confirmed > lsn:
            return CheckResult(
                CHECK_POSITION,
                False,
                f"the slot is at {format_lsn(info.confirmed)}, past the checkpoint "
                f"{describe_position(position)}; {BEHIND_HINT}",
            )
        return CheckResult(
            CHECK_POSITION,
            True,
            f"{describe_position(position)} is available (slot at {format_lsn(info.confirmed)})",
        )

    # -- streaming -------------------------------------------------------------------------

    def stream(self, start: Position) -> Iterator[SourceItem]:
        """Yield transactions and heartbeats after ``start``; reconnects until ``close()``."""
        start_lsn = position_lsn(start)
        attempt = 0
        first = True
        while not self._closing.is_set():
            session: _Session | None = None
            try:
                session = self._open_session(start_lsn, first)
                first = False
                for item in self._read(session, start_lsn):
                    attempt = 0
                    yield item
                return
            except Exception as exc:
                if self._closing.is_set():
                    return
                error = translate_error(exc, self.options)
                if _is_slot_gone(exc):
                    error = PositionLost(
                        f"the replication slot {self.options.slot!r} is gone; {SLOT_LOST_HINT}"
                    )
                elif _is_slot_invalidated(exc):
                    error = PositionLost(f"{error_text(exc, self.options)}; {SLOT_LOST_HINT}")
                elif _is_publication_gone(exc):
                    error = SourceMisconfigured(
                        f"{error_text(exc, self.options)}: the publication was dropped while "
                        f"streaming; {SETUP_HINT} (if it was dropped and created again, the "
                        "slot cannot read changes from before that: run `cache-worker teardown` "
                        "and `setup`, reset the checkpoint and rewarm)"
                    )
                if not error.retryable:
                    raise error from (None if error is exc else exc)
                attempt += 1
                ceiling = min(self.options.reconnect_max_backoff_s, 0.2 * 2 ** min(attempt, 20))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                log.warning(
                    "source_reconnect",
                    source=kind,
                    name=self.options.name,
                    attempt=attempt,
                    error_class=type(exc).__name__,
                    error=error_text(exc, self.options),
                    backoff_s=round(delay, 3),
                    resume=format_lsn(max(start_lsn, self._acked)),
                )
                if self._closing.wait(delay):
                    return
            finally:
                if session is not None:
                    self._end_session(session)

    def _open_session(self, start_lsn: int, first: bool) -> _Session:
        opts = self.options
        conn = connect(opts)
        catalog: psycopg.Connection[Any] | None = None
        try:
            catalog = connect(opts)
            info = _slot_info(conn, opts.slot)
            problem = _slot_problem(info, opts)
            if problem is not None:
                raise problem
            assert info is not None and info.confirmed is not None
            if self._publication(conn) is None:
                raise SourceMisconfigured(
                    f"the publication {opts.publication!r} does not exist; {SETUP_HINT}"
                )
            with self._lock:
                floor = max(start_lsn, self._acked)
            if info.confirmed > floor:
                # Only this worker advances the slot, and only to checkpointed positions, so a
                # slot past the checkpoint was recreated or read by someone else.
                raise PositionLost(
                    f"the replication slot {opts.slot!r} is at {format_lsn(info.confirmed)}, "
                    f"past the checkpoint {format_lsn(floor)}; {BEHIND_HINT}"
                )
            decoder_values = TextDecoder(conn, catalog)
            decoder = PgOutputDecoder(
                self._tables,
                decoder_values.loader,
                decoder_values.decode,
                self.chunk_rows,
                opts.columns,
            )
            session = _Session(conn, catalog, decoder, info.confirmed)
            session.nudge_slot = f"cache_worker_nudge_{conn.info.backend_pid}"
            if self._nudge_mode == "slot" and _can_log_standby_snapshot(conn):
                self._nudge_mode = "snapshot"
        except BaseException:
            close_quietly(conn)
            close_quietly(catalog)
            raise
        with self._lock:
            self._sessions.append(session)
        if self._closing.is_set():
            cancel_quietly(conn)
        log.info(
            "source_streaming",
            source=kind,
            name=opts.name,
            target=opts.target,
            server=server_version(conn),
            slot=opts.slot,
            publication=opts.publication,
            slot_at=format_lsn(info.confirmed),
            resume=format_lsn(floor),
            first=first,
        )
        return session

    def _end_session(self, session: _Session) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
        # The last ack may have come after the final advance (burst mode, shutdown); handing
        # it to the slot now saves the next start from re-reading it. Best effort only.
        if not session.conn.closed and not session.conn.broken:
            try:
                self._advance(session)
            except Exception as exc:
                log.debug("final_advance_skipped", error_class=type(exc).__name__)
        close_quietly(session.conn)
        close_quietly(session.catalog)

    def _advance(self, session: _Session) -> None:
        """Move the slot to the last acknowledged position, if it is not there yet."""
        with self._lock:
            target = self._acked
        if target <= session.confirmed:
            return
        try:
            session.conn.execute(
                "SELECT pg_catalog.pg_replication_slot_advance(%s::name, %s::pg_lsn)",
                (self.options.slot, format_lsn(target)),
            )
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # "cannot advance replication slot to X, minimum is Y": already there or beyond.
            info = _slot_info(session.conn, self.options.slot)
            if info is None or info.confirmed is None:
                raise
            session.confirmed = max(session.confirmed, info.confirmed)
            return
        session.confirmed = target
        log.debug("slot_advanced", source=kind, slot=self.options.slot, lsn=format_lsn(target))

    def _async_commit_window(self, session: _Session) -> float:
        """Seconds within which the server flushes an asynchronous commit: 3 wal_writer_delay."""
        row = session.conn.execute(
            "SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'wal_writer_delay'"
        ).fetchone()
        delay_ms = int(row[0]) if row is not None else 200
        return 3 * delay_ms / 1000 + 0.1

    def _wal_lsns(self, session: _Session) -> tuple[int, int]:
        """(flushed, inserted): the end of WAL a peek can read, and the end of WAL written."""
        row = session.conn.execute(
            "SELECT pg_catalog.pg_current_wal_flush_lsn()::text, "
            "pg_catalog.pg_current_wal_insert_lsn()::text"
        ).fetchone()
        assert row is not None
        return parse_lsn(str(row[0])), parse_lsn(str(row[1]))

    def _read(self, session: _Session, start_lsn: int) -> Iterator[SourceItem]:
        """Peek, yield, peek again; advance behind the acks; forever (until close or an error).

        Peeks do not wait for the run loop: the next one starts as soon as the previous one is
        yielded, and the transactions it returns again (the slot only moves past what was
        acknowledged) are skipped by the decoder. The slot follows the acks at most every
        ``_ADVANCE_INTERVAL_S`` while changes flow, because every advance, like every peek,
        decodes again from the slot's restart point. Only when the run loop falls far behind
        what was yielded does the stream wait for its acks.
        """
        opts = self.options
        decoder = session.decoder
        max_changes = max(1, opts.max_changes)
        # Every peek and every advance decodes again from the slot's restart_lsn, which trails
        # by up to the last running-transactions record (15 s of WAL, or more behind a long
        # transaction; see _nudge): a fixed cost per round that small peeks cannot amortise
        # while there is a backlog. So the window doubles while peeks come back full, up to a
        # cap, and falls back once caught up. Memory stays bounded: the server's result spills
        # to disk past work_mem and the client streams it in chunks.
        window = max_changes
        publication = _publication_arg(opts.publication)
        with self._lock:
            # After a reconnect, restart from what the run loop acknowledged, not from what was
            # yielded: yielded but unacknowledged transactions come again. Duplicates are
            # harmless (versioned, idempotent writes); a gap would not be.
            delivered = max(start_lsn, self._acked)
        if delivered > session.confirmed:
            # The checkpoint is ahead of the slot (a crash between saving it and advancing):
            # what lies before it is already in Redis, so the slot may move there now.
            self.ack(make_position(delivered))
        yielded = _Yielded()
        # Caught up means every commit acknowledged to a client before the first quiet peek
        # has been delivered. Logical decoding only sees flushed WAL, and with
        # synchronous_commit off a commit returns before its WAL is flushed, so "the peek was
        # empty" alone could end a burst before the last commits show up. So the WAL inserted
        # by then must be flushed, or that peek must be old enough for the WAL writer to have
        # flushed every asynchronous commit in it (within three wal_writer_delay); what else
        # sits in unflushed WAL (an empty page's header, a background record) may wait much
        # longer and is no commit anyone awaits.
        settle: tuple[int, float] | None = (self._wal_lsns(session)[1], time.monotonic())
        settled = False
        async_window = self._async_commit_window(session)
        last_beat = time.monotonic()
        last_advance = -_ADVANCE_INTERVAL_S
        busy = False  # the last peek brought new transactions or was full
        truncated = False
        last_peek = 0.0
        cycle = min(_BUSY_CYCLE_S, opts.poll_interval_s)
        quiet_wait = 0.0
        while not self._closing.is_set():
            # The run loop is far behind what was yielded (a backlog): wait until the rows it
            # still has to apply are few enough that the next peek, which returns them again,
            # is mostly new ones, but not so few that it runs dry while the server decodes.
            ahead = max(max_changes, window // 4)
            self._wake.clear()
            while yielded.after(self._acked_lsn()) > ahead:
                if self._wake.wait(opts.poll_interval_s):
                    self._wake.clear()
                if self._closing.is_set():
                    return
            now = time.monotonic()
            acked = self._acked_lsn()
            if acked > session.confirmed and (
                not busy
                or now - last_advance >= _ADVANCE_INTERVAL_S
                or yielded.after(session.confirmed) - yielded.after(acked) >= window // 2
            ):
                self._advance(session)
                last_advance = now
            yielded.release(session.confirmed)
            # Captured before the peek. If the peek then returns nothing new, no published
            # change committed before this point is still undelivered, so the slot may advance
            # here: the peek decodes every record that starts before the WAL flushed at its own
            # start, which is at or after this point, and the slot skips exactly the
            # transactions whose commit record starts before its new position. A transaction
            # committing later has its commit record after this point and is decoded later
            # (the slot keeps its restart_lsn before any transaction still running). The
            # flush LSN, not pg_current_wal_lsn(): WAL written but not yet flushed is beyond
            # what the peek reads, and advancing past it could skip a commit in it.
            if busy:
                # Changes are flowing: this peek will most likely bring more, and then these
                # are not needed; if not, the next (quiet) round captures them.
                flushed = inserted = 0
            else:
                flushed, inserted = self._wal_lsns(session)
            if not truncated:
                self._nudge(session, max(flushed, decoder.last_commit_end))
            peeked_at = time.monotonic()
            if busy and peeked_at - last_peek < cycle:
                if self._closing.wait(cycle - (peeked_at - last_peek)):
                    return
                peeked_at = time.monotonic()
            last_peek = peeked_at
            decoder.reset()
            decoder.skip_before = delivered
            decoder.last_commit_end = 0
            decoder.skipped = 0
            # What the slot still holds before ``delivered`` comes again: the limit makes room.
            limit = window + yielded.after(session.confirmed)
            base = yielded.rows
            rows = 0
            yielded_tx = False
            with session.conn.cursor() as cur:
                for (data,) in cur.stream(
                    _PEEK_SQL,
                    (opts.slot, limit, publication),
                    binary=True,
                    size=_FETCH_ROWS,
                ):
                    rows += 1
                    item = decoder.feed(data)
                    if item is None:
                        continue
                    if item.position is not None:
                        delivered = item.position.version
                        yielded.mark(delivered, base + rows - decoder.skipped)
                        yielded_tx = True
                    yield item
                    if self._closing.is_set():
                        return
            if decoder.in_transaction:
                raise ProtocolError("a peek ended inside a transaction")
            truncated = rows >= limit
            nothing_new = rows == decoder.skipped
            unmeasured = not flushed
            busy = yielded_tx or truncated
            now = time.monotonic()
            if busy:
                settle, settled = None, False
            elif unmeasured:
                continue  # a quiet round without the WAL positions: the next one has them
            else:
                if settle is None:
                    settle = (inserted, peeked_at)
                settled = settled or flushed >= settle[0] or now - settle[1] >= async_window
            caught_up = settled
            window = min(window * 2, max(max_changes, _GROWN_LIMIT)) if truncated else max_changes
            end = flushed if nothing_new and not truncated else decoder.last_commit_end
            if yielded_tx:
                last_beat = now
                if end > delivered:
                    # Irrelevant commits after the last transaction of ours: pass them too.
                    delivered = end
                    yielded.mark(end, base + rows - decoder.skipped)
                    yield Heartbeat(make_position(end), caught_up=False)
                continue
            move = end > delivered and (
                truncated  # a full peek of irrelevant changes: must move on to see more
                or now - last_beat >= opts.heartbeat_s
                or end - session.confirmed >= _ADVANCE_AFTER_BYTES
            )
            if move:
                delivered = end
                yielded.mark(end, base + rows - decoder.skipped)
                last_beat = now
                yield Heartbeat(make_position(end), caught_up=caught_up)
            else:
                yield Heartbeat(None, caught_up=caught_up)
            if truncated:
                quiet_wait = 0.0
                continue
            # Quiet: poll again soon (a pause between two commits is often short), then less
            # and less often, up to poll_interval once idle.
            quiet_wait = min(opts.poll_interval_s, max(_FIRST_POLL_S, quiet_wait * 2))
            if self._closing.wait(quiet_wait):
                return

    def _acked_lsn(self) -> int:
        with self._lock:
            return self._acked

    def _nudge(self, session: _Session, flushed: int) -> None:
        """Have the server log a running-transactions record, so the slot's restart point moves.

        Each peek and advance decodes from the slot's restart_lsn, which only moves to a
        running-transactions record the slot has decoded (and whose position it confirmed).
        The server logs one every 15 s of activity, so at a steady write rate every peek
        re-reads up to 15 s of WAL, and a round of peek and advance costs tens of milliseconds
        more than the new changes do. While the stream follows the head of the WAL, this logs
        one about every ``_NUDGE_INTERVAL_S``: with ``pg_log_standby_snapshot()`` where the
        server has it (16+) and the role may run it, otherwise by creating a temporary logical
        slot, which logs that record first thing (its name says whose; it is dropped at once,
        and at most ``_NUDGE_TIMEOUT_MS`` is spent waiting for running transactions, as the
        record is already written then). A failure other than that timeout falls back from the
        function to the slot, and from the slot to not nudging; streaming never depends on it.
        """
        if self._nudge_mode is None or flushed - session.nudged_lsn < _NUDGE_MIN_BYTES:
            return
        now = time.monotonic()
        if now < session.nudge_at:
            return
        conn = session.conn
        try:
            if self._nudge_mode == "snapshot":
                conn.execute("SELECT pg_catalog.pg_log_standby_snapshot()")
            else:
                with conn.transaction():
                    conn.execute(f"SET LOCAL statement_timeout = {_NUDGE_TIMEOUT_MS}")
                    conn.execute(
                        "SELECT pg_catalog.pg_create_logical_replication_slot("
                        "%s::name, 'pgoutput', true)",
                        (session.nudge_slot,),
                    )
                    conn.execute(
                        "SELECT pg_catalog.pg_drop_replication_slot(%s::name)",
                        (session.nudge_slot,),
                    )
        except psycopg.errors.QueryCanceled:
            if self._closing.is_set():
                raise
            # Running transactions kept it waiting (the record is logged all the same); a long
            # one also holds the restart point back, so there is less to gain for a while.
            session.nudge_every = min(session.nudge_every * 2, _NUDGE_MAX_INTERVAL_S)
        except psycopg.Error as exc:
            if self._closing.is_set() or conn.broken or conn.closed:
                raise
            log.warning(
                "restart_point_nudge_disabled",
                source=kind,
                name=self.options.name,
                how=self._nudge_mode,
                error=error_text(exc, self.options),
                effect="each peek decodes up to 15 s of WAL again: more lag at high write rates",
            )
            # pg_log_standby_snapshot() refused: the temporary slot may still work.
            self._nudge_mode = "slot" if self._nudge_mode == "snapshot" else None
            return
        else:
            session.nudge_every = _NUDGE_INTERVAL_S
        session.nudged_lsn = flushed
        session.nudge_at = time.monotonic() + session.nudge_every


class _Yielded:
    """How many peek rows each yielded position took, for the positions the slot has not passed.

    A peek returns everything after the slot's position, so what was yielded but not yet acked
    and advanced over comes again (and is skipped): ``after(lsn)`` counts those rows, which is
    how much larger a peek's limit must be to bring new changes, and how far ahead of the run
    loop the stream is. ``rows`` counts every new (not skipped) peek row yielded so far.
    """

    __slots__ = ("_base", "_lsns", "_rows", "_start", "rows")

    def __init__(self) -> None:
        self.rows = 0
        self._lsns: list[int] = []
        self._rows: list[int] = []
        self._start = 0
        self._base = 0

    def mark(self, lsn: int, rows: int) -> None:
        """``lsn`` was yielded after ``rows`` new rows in all."""
        self.rows = rows
        self._lsns.append(lsn)
        self._rows.append(rows)

    def after(self, lsn: int) -> int:
        """New rows yielded after position ``lsn``."""
        i = bisect.bisect_right(self._lsns, lsn, self._start)
        return self.rows - (self._rows[i - 1] if i > self._start else self._base)

    def release(self, lsn: int) -> None:
        """Forget the positions up to ``lsn`` (the slot is there now)."""
        i = bisect.bisect_right(self._lsns, lsn, self._start)
        if i > self._start:
            self._base = self._rows[i - 1]
            self._start = i
            if i >= 4096 and 2 * i >= len(self._lsns):
                del self._lsns[:i], self._rows[:i]
                self._start = 0


def preflight(options: PostgresOptions, *, resuming: bool = False) -> None:
    """Raise ``SourceMisconfigured`` (or ``SourceUnavailable``) unless streaming can work.

    Used at ``run`` start: wal_level other than logical, a missing slot or publication (the
    message says to run ``cache-worker setup``), or a user without REPLICATION each stop the
    worker with the fix in the message. When ``resuming`` from a checkpoint, a missing slot is
    ``PositionLost``: the changes made since it was dropped were never seen.
    """
    source = PostgresLogicalSource(options)
    try:
        results = source.checks()
    finally:
        source.close()
    reachable = results[0]
    if not reachable.ok:
        # Raised as the connection failure it is: SourceUnavailable (retried by the run loop
        # while the server is merely down) or SourceMisconfigured for a refused login.
        close_quietly(connect(options))
        raise SourceUnavailable(f"{reachable.name}: {reachable.detail}")
    blocking = (CHECK_REACHABLE, CHECK_WAL_LEVEL, CHECK_SLOT, CHECK_PUBLICATION, CHECK_PRIVILEGES)
    failed = [r for r in results if not r.ok and r.name in blocking]
    slot_missing = [r for r in failed if r.name == CHECK_SLOT and "does not exist" in r.detail]
    if resuming and slot_missing:
        raise PositionLost(
            f"replication slot {options.slot!r} is gone, so the changes made since it was "
            "dropped were never seen: run `cache-worker setup --config <file>` to recreate it, "
            "then `cache-worker reset-checkpoint` and rewarm the cache"
        )
    if failed:
        raise SourceMisconfigured(
            "the postgres-logical source cannot stream: "
            + "; ".join(f"{r.name}: {r.detail}" for r in failed)
        )


__all__ = [
    "CHUNK_ROWS",
    "PgOutputDecoder",
    "PostgresLogicalSource",
    "ProtocolError",
    "Relation",
    "describe_position",
    "format_lsn",
    "human_bytes",
    "kind",
    "make_position",
    "parse_lsn",
    "position_lsn",
    "preflight",
]
