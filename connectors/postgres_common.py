"""What both Postgres sources share: options, connecting, error translation, value decoding, checks.

``PostgresOptions`` is the one options type of ``postgres-notify`` and ``postgres-logical``.
``connect`` opens a psycopg connection with the session settings value decoding relies on (ISO
dates, UTC, exact floats, hex bytea) and translates failures; ``translate_error`` maps any psycopg
or socket exception to the ``worker.errors`` class the core understands, with passwords redacted.
``TextDecoder`` turns Postgres text-format values (pgoutput's tuple data, ``jsonb_each_text``,
``to_jsonb``'s strings) into the same Python values the MySQL source produces, so rules behave
identically on every source. ``table_columns``, ``base_checks`` and ``replica_identity_checks``
back ``columns()`` and ``cache-worker check``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.types.array import ArrayLoader

from worker.errors import (
    CacheWorkerError,
    SourceError,
    SourceMisconfigured,
    SourceUnavailable,
)
from worker.events import TableRef
from worker.interfaces import CheckResult
from worker.redact import redact, redact_url, url_secrets

log = structlog.get_logger("cache_worker.source.postgres")

CHECK_REACHABLE = "postgres reachable"
CHECK_REPLICA_IDENTITY = "replica identity"

# Session settings every connection gets, because the text form of values depends on them: the
# decoder parses ISO dates only, floats must print exactly (shortest round-trip on 12+, 17
# digits before), bytea must be hex and timestamptz must come with an offset we turn into UTC.
_SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
)

# Text loaders for these are replaced or post-processed (see TextDecoder).
_OID_JSON = 114
_OID_JSONB = 3802
_OID_TIMESTAMPTZ = 1184
_OID_NUMERIC = 1700
_OID_FLOAT4 = 700
_OID_FLOAT8 = 701
_OID_TEXT = 25
_INT_OIDS = frozenset({20, 21, 23, 26})
_JSON_OIDS = frozenset({_OID_JSON, _OID_JSONB})


@dataclass(frozen=True)
class PostgresOptions:
    """How to reach the server and what to read; ``password`` is never logged."""

    dsn: str  # postgresql://user@host:port/db (a password in it is allowed, and redacted)
    password: str | None = field(repr=False)  # wins over the DSN's password
    tables: tuple[TableRef, ...]  # the rules' tables
    name: str  # the worker name, for log fields
    start: Literal["end", "beginning"] = "end"
    connect_timeout_s: float = 10.0
    # libpq parameters: sslmode, sslrootcert, sslcert, sslkey.
    ssl: dict[str, str] | None = field(default=None, repr=False)
    reconnect_max_backoff_s: float = 30.0
    poll_interval_s: float = 1.0
    # postgres-notify
    schema_name: str = "cache_worker"
    channel: str = "cache_worker"
    outbox_batch: int = 1000
    # postgres-logical
    slot: str = "cache_worker_default"
    publication: str = "cache_worker_default"
    max_changes: int = 5000
    heartbeat_s: float = 10.0
    # The only columns the rules read, by table (a table not named here: all of them); the
    # sources leave the others' values undecoded (logical) or unconverted (notify, which keeps
    # the primary key too) and out of the rows.
    columns: Mapping[TableRef, frozenset[str]] = field(default_factory=dict)

    @property
    def secrets(self) -> list[str | None]:
        """Everything that must be masked in messages: the password and the DSN's password."""
        return [self.password, *url_secrets(self.dsn)]

    @property
    def target(self) -> str:
        """The DSN without its password, for messages and log fields."""
        return redact(redact_url(self.dsn), self.secrets)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

# SQLSTATE classes and codes, by what the operator has to do about them.
_MISCONFIGURED_CLASSES = ("28",)  # invalid authorization specification (login refused)
_MISCONFIGURED_CODES = frozenset(
    {
        "42501",  # insufficient_privilege
        "3D000",  # invalid_catalog_name: the database does not exist
        "55000",  # object_not_in_prerequisite_state: e.g. wal_level < logical
        "53400",  # configuration_limit_exceeded: e.g. all replication slots in use
    }
)
_UNAVAILABLE_CLASSES = ("08", "57", "53", "58")  # connection, shutdown, resources, system
_UNAVAILABLE_CODES = frozenset({"40001", "40P01", "55006"})  # retry; 55006: object in use
# Connection-time failures come without a SQLSTATE; libpq's message says what happened.
_LOGIN_REFUSED_TEXTS = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects",
    "authentication failed",
    "no password supplied",
    "does not exist",  # role or database
    "permission denied",
    "certificate",
    "ssl",
)
_TRANSIENT_LOGIN_TEXTS = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many clients",
    "remaining connection slots",
)


def error_text(exc: BaseException, options: PostgresOptions) -> str:
    """The exception's first line with every known secret masked."""
    text = str(exc).strip() or type(exc).__name__
    return redact(redact_url(text), options.secrets)


def translate_error(exc: BaseException, options: PostgresOptions) -> CacheWorkerError:
    """Map a psycopg/socket exception to the ``worker.errors`` class the core understands.

    Connection problems are ``SourceUnavailable`` (retried), a refused login or missing privilege
    or server setting is ``SourceMisconfigured`` (the operator must act), anything else the server
    rejected (undefined object, syntax) is ``SourceError``. Messages never carry the password.
    """
    if isinstance(exc, CacheWorkerError):
        return exc
    target = options.target
    text = error_text(exc, options)
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate.startswith(_MISCONFIGURED_CLASSES) or sqlstate in _MISCONFIGURED_CODES:
            return SourceMisconfigured(f"Postgres {target} refused: {text} (SQLSTATE {sqlstate})")
        if sqlstate.startswith(_UNAVAILABLE_CLASSES) or sqlstate in _UNAVAILABLE_CODES:
            return SourceUnavailable(f"Postgres {target} is unavailable: {text}")
        return SourceError(f"Postgres {target} rejected a query: {text} (SQLSTATE {sqlstate})")
    if isinstance(exc, psycopg.OperationalError):
        lowered = text.lower()
        if not any(t in lowered for t in _TRANSIENT_LOGIN_TEXTS) and any(
            t in lowered for t in _LOGIN_REFUSED_TEXTS
        ):
            return SourceMisconfigured(f"Postgres {target} refused the connection: {text}")
        return SourceUnavailable(f"Postgres {target} is unavailable: {text}")
    if isinstance(exc, psycopg.InterfaceError | OSError | EOFError | TimeoutError):
        # InterfaceError here is nearly always "the connection is closed/lost".
        return SourceUnavailable(f"Postgres {target} is unavailable: {text}")
    if isinstance(exc, psycopg.ProgrammingError | psycopg.DataError | psycopg.NotSupportedError):
        return SourceError(f"Postgres {target} rejected a query: {text}")
    if isinstance(exc, psycopg.Error):
        return SourceError(f"Postgres {target}: {type(exc).__name__}: {text}")
    return SourceError(f"Postgres {target}: {type(exc).__name__}: {text}")


def is_undefined_object(exc: BaseException) -> bool:
    """True for "replication slot ... does not exist" and similar (SQLSTATE 42704)."""
    return isinstance(exc, pg_errors.UndefinedObject)


# ------------------------------------------------------------------------------------------
# Connecting
# ------------------------------------------------------------------------------------------


def conninfo_kwargs(options: PostgresOptions) -> dict[str, Any]:
    """libpq keyword arguments layered over the DSN (password, timeouts, TLS, keepalives)."""
    kwargs: dict[str, Any] = {
        # libpq takes whole seconds; 0 would mean "wait forever".
        "connect_timeout": max(1, round(options.connect_timeout_s)),
        "application_name": f"cache-worker:{options.name}"[:63],
        # A dead peer (server host gone, NAT dropped the flow) must surface as an error instead
        # of a read that blocks forever.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if options.password is not None:
        kwargs["password"] = options.password
    if options.ssl:
        kwargs.update(options.ssl)
    return kwargs


class _RepeatedCloseError(logging.Filter):
    """Drops psycopg's "error ignored terminating <Pipeline>" warning.

    psycopg logs it when a pipeline (or COPY) block that is already raising fails to end as
    well: every time a source's ``close()`` shuts a session's socket under a pipeline, which a
    postgres-notify stop nearly always does. The block's own exception reaches the source
    either way (a reconnect, or the end of the stream), so the warning only repeats it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error ignored terminating")


def _quiet_repeated_close_errors() -> None:
    psycopg_log = logging.getLogger("psycopg")
    if not any(isinstance(f, _RepeatedCloseError) for f in psycopg_log.filters):
        psycopg_log.addFilter(_RepeatedCloseError())


def connect(options: PostgresOptions, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A new connection with the session settings decoding needs; errors are translated."""
    _quiet_repeated_close_errors()
    try:
        conn = psycopg.connect(options.dsn, autocommit=True, **conninfo_kwargs(options))
    except Exception as exc:
        raise translate_error(exc, options) from exc
    try:
        with conn.cursor() as cur:
            for name, value in _SESSION_SETTINGS:
                cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.autocommit = autocommit
    except Exception as exc:
        close_quietly(conn)
        raise translate_error(exc, options) from exc
    return conn


def close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Close a connection that is being discarded; a failed goodbye changes nothing."""
    if conn is None:
        return
    with contextlib.suppress(Exception):
        conn.close()


def cancel_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Interrupt the connection's running query from another thread (used by ``close()``)."""
    if conn is None or conn.closed:
        return
    with contextlib.suppress(Exception):
        conn.cancel_safe(timeout=2.0)


# ------------------------------------------------------------------------------------------
# Catalog helpers
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """One live column of a table, as ``pg_attribute`` describes it."""

    name: str
    type_oid: int
    type_name: str


# The ordinary or partitioned table ``c`` named by the parameters (schema, name), as the end of a
# query that selects from it.
TABLE_BY_NAME = (
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')"
)


def table_oid(conn: psycopg.Connection[Any], table: TableRef) -> int | None:
    """The table's OID; None if there is no such ordinary or partitioned table."""
    row = conn.execute("SELECT c.oid " + TABLE_BY_NAME, (table.schema, table.name)).fetchone()
    return None if row is None else int(row[0])


def table_columns(conn: psycopg.Connection[Any], table: TableRef) -> list[ColumnInfo] | None:
    """The table's columns in ``attnum`` order (dropped ones left out); None if it is missing."""
    oid = table_oid(conn, table)
    if oid is None:
        return None
    rows = conn.execute(
        "SELECT attname, atttypid, pg_catalog.format_type(atttypid, atttypmod) "
        "FROM pg_catalog.pg_attribute "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (oid,),
    ).fetchall()
    return [ColumnInfo(str(n), int(o), str(t)) for n, o, t in rows]


def qualified(table: TableRef) -> sql.Composable:
    """``"schema"."table"`` as a psycopg SQL fragment."""
    return sql.Identifier(table.schema, table.name)


def quoted(table: TableRef) -> str:
    """``"schema"."table"`` as text, for messages that show SQL the operator can paste."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (table.schema, table.name))


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------


def _json_float(value: Any) -> Any:
    """JSON parsed with Decimal floats -> the float form ``json.loads`` produces.

    ``parse_float`` only ever sees literals with a fraction or exponent, so ``1.0`` stays a
    float (as on the logical path and in MySQL) instead of turning into the int ``1``.
    """
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _json_float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_float(v) for v in value]
    return value


class TextDecoder:
    """Converts Postgres text-format values into the Python values rules see on every source.

    int2/4/8 -> int, numeric -> Decimal (NaN kept), float4/8 -> float, bool, text types -> str,
    bytea -> bytes, json/jsonb -> parsed JSON (non-integer numbers as float, as the MySQL source
    does), date/time/timestamp -> naive datetime types, timestamptz -> aware datetime in UTC,
    uuid -> UUID, arrays -> lists of decoded elements, domains as their base type, enums and
    unknown types -> str. Values Python cannot represent (``infinity`` dates, years beyond 9999)
    come back as their text.

    The loaders are psycopg's text loaders from ``conn.adapters`` (C-accelerated), one instance
    per type OID. The first value of a type psycopg does not know makes one catalog query on
    ``catalog`` (default ``conn``) to tell domains, arrays and enums apart, so call ``decode``
    from the thread that owns that connection and not while a query on it is in progress.
    """

    def __init__(
        self, conn: psycopg.Connection[Any], catalog: psycopg.Connection[Any] | None = None
    ) -> None:
        self._conn = conn
        # Where unknown type OIDs are looked up; a separate connection lets ``decode`` run while
        # ``conn`` is busy streaming a result (psycopg holds the connection's lock meanwhile).
        self._catalog = catalog if catalog is not None else conn
        self._loaders: dict[int, Callable[[bytes], Any]] = {}
        self._elements: dict[int, int] = {}
        self._warned: set[int] = set()
        for info in conn.adapters.types:
            if info.array_oid:
                self._elements[info.array_oid] = info.oid

    def loader(self, type_oid: int) -> Callable[[bytes], Any]:
        """The raw loader ``decode`` uses for ``type_oid``: fast, but may raise on odd values.

        Hot loops call it directly and fall back to ``decode`` for a value it raised on.
        """
        load = self._loaders.get(type_oid)
        if load is None:
            load = self._loaders[type_oid] = self._make_loader(type_oid)
        return load

    def decode(self, type_oid: int, text: str | bytes | memoryview | None) -> Any:
        """The Python value of ``text`` (a value's text form) for a column of type ``type_oid``."""
        if text is None:
            return None
        load = self.loader(type_oid)
        data = text.encode("utf-8") if isinstance(text, str) else text
        try:
            return load(data)  # type: ignore[arg-type]
        except (psycopg.DataError, ValueError, OverflowError):
            value = bytes(data).decode("utf-8", "replace")
            if type_oid not in self._warned:
                self._warned.add(type_oid)
                log.warning(
                    "value_not_representable",
                    type_oid=type_oid,
                    value=value[:40],
                    action="passed on as text",
                )
            return value

    def decode_json_value(self, type_oid: int, value: Any) -> Any:
        """A column value as ``to_jsonb(row)`` renders it -> the value ``decode`` would give.

        Strings (timestamps with a ``T``, ``\\x`` bytea, UUIDs, NaN/Infinity) go through
        ``decode``; JSON numbers become int/Decimal/float by column type (parse with
        ``parse_float=Decimal`` to keep numeric exact); json/jsonb values pass through; array
        elements are decoded by element type.
        """
        if value is None:
            return None
        if type_oid in _JSON_OIDS:
            return _json_float(value)
        if isinstance(value, str):
            if type_oid == _OID_TEXT:
                return value
            return self.decode(type_oid, value)
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float | Decimal):
            if type_oid == _OID_NUMERIC:
                return value if isinstance(value, Decimal) else Decimal(str(value))
            if type_oid in (_OID_FLOAT4, _OID_FLOAT8):
                return float(value)
            if type_oid in _INT_OIDS:
                return int(value)
            return self.decode(type_oid, str(value))
        if isinstance(value, list):
            element = self._element_of(type_oid)
            if element is None:
                return _json_float(value)
            return [self.decode_json_value(element, v) for v in value]
        return _json_float(value)

    # -- loaders ---------------------------------------------------------------------------

    def _element_of(self, type_oid: int) -> int | None:
        if type_oid in self._elements:
            return self._elements[type_oid]
        described = self._describe(type_oid)
        if described is not None and described[1]:
            self._elements[type_oid] = described[1]
            return described[1]
        return None

    def _describe(self, type_oid: int) -> tuple[str, int, int, str] | None:
        """(typtype, typelem if an array, typbasetype, typdelim) of an OID psycopg lacks."""
        try:
            with self._catalog.cursor() as cur:
                cur.execute(
                    "SELECT typtype, CASE WHEN typcategory = 'A' THEN typelem ELSE 0 END, "
                    "typbasetype, typdelim FROM pg_catalog.pg_type WHERE oid = %s",
                    (type_oid,),
                )
                row = cur.fetchone()
        except psycopg.Error as exc:
            log.warning("type_lookup_failed", type_oid=type_oid, error_class=type(exc).__name__)
            return None
        if row is None:
            return None
        return str(row[0]), int(row[1]), int(row[2]), str(row[3])

    def _make_loader(self, type_oid: int) -> Callable[[bytes], Any]:
        if type_oid in _JSON_OIDS:
            # psycopg's json loader returns the same floats; json.loads directly skips a layer.
            return json.loads
        adapters = self._conn.adapters
        cls = adapters.get_loader(type_oid, Format.TEXT)
        if cls is None:
            described = self._describe(type_oid)
            if described is not None:
                typtype, element, base, delimiter = described
                if typtype == "d" and base:
                    return self._loader_for_base(base)
                if element:
                    self._elements[type_oid] = element
                    return self._array_loader(element, delimiter)
            # Enums and every other type psycopg has no loader for: the text itself.
            return _to_str
        load = cls(type_oid, self._conn).load
        if type_oid == _OID_TIMESTAMPTZ:
            return lambda data: _utc(load(data))
        if type_oid in self._elements and self._elements[type_oid] == _OID_TIMESTAMPTZ:
            return lambda data: _utc_list(load(data))
        return load

    def _loader_for_base(self, base: int) -> Callable[[bytes], Any]:
        return self.loader(base)

    def _array_loader(self, element: int, delimiter: str) -> Callable[[bytes], Any]:
        # An array of a type psycopg does not know (an enum, a domain): psycopg's array parser
        # with the element loader it would pick, which is the text loader for unknown types.
        name = f"ArrayLoader_{element}"
        attribs = {"base_oid": element, "delimiter": delimiter.encode()}
        cls: type[Loader] = type(name, (ArrayLoader,), attribs)
        loader = cls(0, self._conn)
        return loader.load


def _to_str(data: bytes) -> str:
    return bytes(data).decode("utf-8", "replace")


def _utc(value: Any) -> Any:
    # psycopg returns the connection's time zone; UTC everywhere keeps keys and payloads stable.
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC)
    return value


def _utc_list(value: Any) -> Any:
    if isinstance(value, list):
        return [_utc_list(v) for v in value]
    return _utc(value)


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------


def server_version(conn: psycopg.Connection[Any]) -> str:
    """``PostgreSQL 15.6`` style text from the server's ``server_version``."""
    return f"PostgreSQL {conn.info.parameter_status('server_version') or '?'}"


def base_checks(options: PostgresOptions) -> list[CheckResult]:
    """ "postgres reachable": the redacted DSN and server version, or why not. Never raises."""
    try:
        conn = connect(options)
    except CacheWorkerError as exc:
        return [CheckResult(CHECK_REACHABLE, False, str(exc))]
    try:
        return [CheckResult(CHECK_REACHABLE, True, f"{options.target} {server_version(conn)}")]
    finally:
        close_quietly(conn)


@dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    """A table's replica identity: ``default``, ``full``, ``index`` or ``nothing``, and its columns.

    ``columns`` are what the old image of an UPDATE/DELETE carries: the primary key (default), the
    index's columns (index), every column (full, given as None) or none.
    """

    mode: Literal["default", "full", "index", "nothing"]
    columns: frozenset[str] | None


_IDENTITY_MODES: dict[str, Literal["default", "full", "index", "nothing"]] = {
    "d": "default",
    "f": "full",
    "i": "index",
    "n": "nothing",
}


def replica_identity(conn: psycopg.Connection[Any], table: TableRef) -> ReplicaIdentity | None:
    """The table's replica identity, or None when the table does not exist."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.oid, c.relreplident FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (table.schema, table.name),
        )
        row = cur.fetchone()
        if row is None:
            return None
        oid, code = row
        mode = _IDENTITY_MODES.get(str(code), "default")
        if mode == "full":
            return ReplicaIdentity(mode, None)
        if mode == "nothing":
            return ReplicaIdentity(mode, frozenset())
        flag = "indisprimary" if mode == "default" else "indisreplident"
        cur.execute(
            "SELECT a.attname FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) "
            f"WHERE i.indrelid = %s AND i.{flag}",
            (oid,),
        )
        return ReplicaIdentity(mode, frozenset(str(r[0]) for r in cur.fetchall()))


def replica_identity_checks(
    conn: psycopg.Connection[Any],
    tables: Iterable[TableRef],
    needs_old_keys: Mapping[TableRef, AbstractSet[str]] | None = None,
) -> list[CheckResult]:
    """One "replica identity <table>" result per table.

    ``needs_old_keys`` maps a table to the columns its rules must read from the *old* row image
    of an UPDATE or DELETE (``RuleSet.needed_old_columns(watch=False)``): DEFAULT identity sends
    only the primary key, and on UPDATE only when it changed, so any other column there needs
    ``REPLICA IDENTITY FULL`` or old keys are never evicted. Without it the identity is only
    reported. A table whose UPDATE/DELETE cannot be replicated at all (NOTHING, or DEFAULT
    without a primary key) fails either way: Postgres then rejects the application's UPDATEs
    and DELETEs once the table is in a publication.
    """
    results: list[CheckResult] = []
    for table in tables:
        name = f"{CHECK_REPLICA_IDENTITY} {table}"
        identity = replica_identity(conn, table)
        fix = f"ALTER TABLE {quoted(table)} REPLICA IDENTITY FULL"
        if identity is None:
            results.append(CheckResult(name, False, f"table {table} does not exist"))
            continue
        if identity.mode == "full":
            results.append(CheckResult(name, True, "FULL: old rows carry every column"))
            continue
        if not identity.columns:
            why = "NOTHING" if identity.mode == "nothing" else "DEFAULT without a primary key"
            results.append(
                CheckResult(
                    name,
                    False,
                    f"{why}: UPDATE/DELETE of a published table fail on the server and old rows "
                    f"are never sent; fix: {fix}",
                )
            )
            continue
        label = "DEFAULT (primary key" if identity.mode == "default" else "USING INDEX ("
        label += f" {', '.join(sorted(identity.columns))})"
        needed = needs_old_keys.get(table) if needs_old_keys is not None else None
        if needed is None:
            results.append(
                CheckResult(
                    name,
                    True,
                    f"{label}: old rows carry only these columns, on UPDATE only when they change",
                )
            )
            continue
        missing = sorted(set(needed) - identity.columns)
        if missing:
            results.append(
                CheckResult(
                    name,
                    False,
                    f"{label}: rules read {', '.join(missing)} from the old row, which "
                    f"UPDATE/DELETE do not send, so old keys would stay in the cache; fix: {fix}",
                )
            )
        else:
            results.append(
                CheckResult(name, True, f"{label}: covers every column rules read from old rows")
            )
    return results


__all__ = [
    "CHECK_REACHABLE",
    "CHECK_REPLICA_IDENTITY",
    "TABLE_BY_NAME",
    "ColumnInfo",
    "PostgresOptions",
    "ReplicaIdentity",
    "TextDecoder",
    "base_checks",
    "cancel_quietly",
    "close_quietly",
    "connect",
    "conninfo_kwargs",
    "error_text",
    "is_undefined_object",
    "qualified",
    "quoted",
    "replica_identity",
    "replica_identity_checks",
    "server_version",
    "table_columns",
    "table_oid",
    "translate_error",
]
