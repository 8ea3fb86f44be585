"""The MySQL/MariaDB binlog ``Source``: follows the row-based binlog as a replica and turns it into
``Transaction``/``Heartbeat`` items for the run loop. It owns everything MySQL-specific: positions
(binlog file/offset plus GTID, and the integer ``version`` derived from them), choosing between
GTID and file/offset resume, grouping row events into transactions and chunks, normalising column
values into faithful Python values, reconnecting with backoff when the server goes away,
translating pymysql/pymysqlreplication errors into ``worker.errors`` classes, and the preflight
checks (binlog settings, privileges) behind ``cache-worker check`` and ``run``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, TypeVar

import pymysql
import structlog
from pymysqlreplication import BinLogStreamReader, row_event
from pymysqlreplication.constants import FIELD_TYPE
from pymysqlreplication.event import (
    GtidEvent,
    HeartbeatLogEvent,
    MariadbGtidEvent,
    MariadbGtidListEvent,
    QueryEvent,
    RotateEvent,
    XAPrepareEvent,
    XidEvent,
)
from pymysqlreplication.row_event import (
    DeleteRowsEvent,
    PartialUpdateRowsEvent,
    UpdateRowsEvent,
    WriteRowsEvent,
)

from connectors.mysql_decode import INSERT_EVENTS as _INSERT_EVENTS
from connectors.mysql_decode import UPDATE_EVENTS, TableDecoder, compile_table
from connectors.mysql_stream import FastMariaGtid, FastRows, FastXid, PacketEvents
from worker.errors import (
    CacheWorkerError,
    PositionLost,
    SourceError,
    SourceMisconfigured,
    SourceUnavailable,
)
from worker.events import Heartbeat, Op, Position, RowChange, SourceItem, TableRef, Transaction
from worker.interfaces import CheckResult
from worker.redact import redact

log = structlog.get_logger("cache_worker.source.mysql")
_T = TypeVar("_T")

RECOVERY_HINT = "reset the checkpoint (cache-worker reset-checkpoint) and rewarm, or set start"
_HEARTBEAT_EVERY_S = 0.5
_FILE_SPAN = 2**32

# Server error codes this module reacts to.
_ER_DBACCESS_DENIED = 1044
_ER_ACCESS_DENIED = 1045
_ER_PARSE_ERROR = 1064
_ER_TABLEACCESS_DENIED = 1142
_ER_SPECIFIC_ACCESS_DENIED = 1227
_ER_MASTER_FATAL_READING_BINLOG = 1236
_ACCESS_ERRORS = {_ER_DBACCESS_DENIED, _ER_TABLEACCESS_DENIED, _ER_SPECIFIC_ACCESS_DENIED}

CHECK_REACHABLE = "mysql reachable"
CHECK_BINLOG = "binlog enabled"
CHECK_FORMAT = "binlog_format=ROW"
CHECK_ROW_IMAGE = "binlog_row_image=FULL"
CHECK_ROW_METADATA = "binlog_row_metadata=FULL"
CHECK_PRIVILEGES = "privileges"
CHECK_GTID = "gtid"
CHECK_POSITION = "binlog position"
_ALL_CHECKS = (
    CHECK_REACHABLE,
    CHECK_BINLOG,
    CHECK_FORMAT,
    CHECK_ROW_IMAGE,
    CHECK_ROW_METADATA,
    CHECK_PRIVILEGES,
    CHECK_GTID,
)

_ROWS_EVENTS: dict[type, Op] = {
    WriteRowsEvent: Op.INSERT,
    UpdateRowsEvent: Op.UPDATE,
    DeleteRowsEvent: Op.DELETE,
}
_ONLY_EVENTS = [
    WriteRowsEvent,
    UpdateRowsEvent,
    DeleteRowsEvent,
    PartialUpdateRowsEvent,
    XidEvent,
    QueryEvent,
    MariadbGtidEvent,
    GtidEvent,
    RotateEvent,
    HeartbeatLogEvent,
    # Carries MariaDB's full GTID state at the start of each binlog file: it lets a stream that
    # began at a file/offset learn a GTID it can later resume from.
    MariadbGtidListEvent,
    XAPrepareEvent,
]
_MARIADB_FL_STANDALONE = 0x01


# ------------------------------------------------------------------------------------------
# Options and positions
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MySQLOptions:
    """How to reach the server and what to read; ``password`` is never logged."""

    host: str
    port: int
    user: str
    password: str | None = field(repr=False)
    # The replica server id; it must differ from every other replica of the server, or the
    # server disconnects one of the two whenever the other connects.
    server_id: int
    # Only these tables are read; other tables' rows are skipped unparsed where possible.
    tables: tuple[TableRef, ...]
    # Where to start without a checkpoint: the current end of the binlog or its first file.
    start: Literal["end", "beginning"] = "end"
    # auto: by GTID when the checkpoint has one and the server has GTIDs, else file/offset.
    resume: Literal["auto", "gtid", "file"] = "auto"
    heartbeat_s: float = 1.0
    # A transaction with more rows than this is yielded in chunks of this many rows.
    chunk_rows: int = 5000
    connect_timeout_s: float = 10.0
    # pymysql's ssl dict (ca/cert/key/check_hostname); None disables TLS.
    ssl: dict[str, Any] | None = field(default=None, repr=False)
    reconnect_max_backoff_s: float = 30.0
    # The only columns the rules read, by table (a table not named here: all of them). Row
    # images decoded on the fast path carry just these; the others are stepped over unbuilt.
    columns: Mapping[TableRef, frozenset[str]] = field(default_factory=dict)
    # The only columns the rules read from old images (UPDATE before, DELETE); see
    # RuleSet.needed_old_columns. A table missing here gets the columns above.
    old_columns: Mapping[TableRef, frozenset[str]] = field(default_factory=dict)


_FILE_INDEX_RE = re.compile(r"\.(\d+)$")

# pymysql's "preferred" TLS context (no TLS options given: TLS if the server offers it, without
# verification), built once: pymysql builds one per connection by loading the system's CA store,
# about 50 ms of CPU, and the source opens several connections (control, binlog, catalog) as it
# starts and on every reconnect.
_preferred_tls: list[Any] = []


def open_connection(**kwargs: Any) -> pymysql.Connection[Any]:
    """``pymysql.connect(**kwargs)``, sharing the preferred-TLS context between connections."""
    if kwargs.get("ssl") or kwargs.get("ssl_disabled") or kwargs.get("defer_connect"):
        return pymysql.connect(**kwargs)
    if not _preferred_tls:
        conn = pymysql.connect(**kwargs)
        if _preferred(conn):
            _preferred_tls.append(getattr(conn, "ctx"))  # noqa: B009 - not in pymysql's stubs
        return conn
    # Made without TLS (pymysql would build the context in __init__), then set up exactly as
    # its preferred mode leaves a connection: TLS when the server offers it, never required.
    conn = pymysql.connect(defer_connect=True, ssl_disabled=True, **kwargs)
    setattr(conn, "ssl", True)  # noqa: B010 - pymysql's attributes, not in its stubs
    setattr(conn, "_ssl_required", False)  # noqa: B010
    setattr(conn, "ctx", _preferred_tls[0])  # noqa: B010
    conn.connect()
    return conn


def _preferred(conn: pymysql.Connection[Any]) -> bool:
    # Attributes of pymysql's own; a version without them simply builds its context each time.
    return bool(getattr(conn, "ssl", False)) and not getattr(conn, "_ssl_required", True)


def file_index(name: str) -> int:
    """The numeric suffix of a binlog file name (``binlog.000003`` -> 3)."""
    match = _FILE_INDEX_RE.search(name)
    if match is None:
        raise SourceError(f"binlog file name {name!r} has no numeric suffix")
    return int(match.group(1))


def make_position(file: str, pos: int, gtid: str | None) -> Position:
    """A checkpointable position: resume in ``file`` at offset ``pos`` (or after ``gtid``)."""
    return Position(file_index(file) * _FILE_SPAN + pos, {"file": file, "pos": pos, "gtid": gtid})


def describe_position(position: Position) -> str:
    """Short human text such as ``binlog.000003:1234 gtid=0-1-55``."""
    coords = position.coords
    text = f"{coords.get('file')}:{coords.get('pos')}"
    if coords.get("gtid"):
        text += f" gtid={coords['gtid']}"
    return text


# ------------------------------------------------------------------------------------------
# GTID state
# ------------------------------------------------------------------------------------------


class _MariaGtids:
    """MariaDB's replication position: the last GTID of every replication domain."""

    __slots__ = ("domains",)

    def __init__(self, domains: dict[int, tuple[int, int]] | None = None) -> None:
        self.domains: dict[int, tuple[int, int]] = dict(domains or {})

    @classmethod
    def parse(cls, text: str) -> _MariaGtids:
        domains: dict[int, tuple[int, int]] = {}
        for part in text.replace("\n", "").split(","):
            part = part.strip()
            if not part:
                continue
            domain, server, seq = (int(x) for x in part.split("-"))
            domains[domain] = (server, seq)
        return cls(domains)

    def add(self, domain: int, server: int, seq: int) -> None:
        self.domains[domain] = (server, seq)

    def copy(self) -> _MariaGtids:
        return _MariaGtids(self.domains)

    def text(self) -> str | None:
        if not self.domains:
            return None
        return ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(self.domains.items()))


class _MySQLGtids:
    """MySQL's executed GTID set, as closed intervals per source UUID."""

    __slots__ = ("sets",)

    def __init__(self, sets: dict[str, list[list[int]]] | None = None) -> None:
        self.sets: dict[str, list[list[int]]] = {
            k: [list(i) for i in v] for k, v in (sets or {}).items()
        }

    @classmethod
    def parse(cls, text: str) -> _MySQLGtids:
        sets: dict[str, list[list[int]]] = {}
        for part in text.replace("\n", "").split(","):
            part = part.strip()
            if not part:
                continue
            sid, *ranges = part.split(":")
            intervals = sets.setdefault(sid.lower(), [])
            for rng in ranges:
                lo, _, hi = rng.partition("-")
                intervals.append([int(lo), int(hi or lo)])
            intervals.sort()
        return cls(sets)

    def add_text(self, gtid: str) -> None:
        sid, _, gno_text = gtid.rpartition(":")
        gno = int(gno_text)
        intervals = self.sets.setdefault(sid.lower(), [])
        if intervals and intervals[-1][1] + 1 == gno:
            intervals[-1][1] = gno  # the common case: the next transaction of this source
            return
        if any(lo <= gno <= hi for lo, hi in intervals):
            return
        intervals.append([gno, gno])
        intervals.sort()
        merged: list[list[int]] = []
        for lo, hi in intervals:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.sets[sid.lower()] = merged

    def copy(self) -> _MySQLGtids:
        return _MySQLGtids(self.sets)

    def text(self) -> str | None:
        parts = []
        for sid, intervals in sorted(self.sets.items()):
            if intervals:
                spans = ":".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in intervals)
                parts.append(f"{sid}:{spans}")
        return ",".join(parts) or None


_Gtids = _MariaGtids | _MySQLGtids


@dataclass(slots=True)
class _Cursor:
    """Where the stream resumes: the last transaction boundary fully processed."""

    file: str
    pos: int
    gtids: _Gtids | None
    version: int
    text_cache: str | None = None
    # The GTID text is only needed when a position is handed out, not at every boundary.
    dirty: bool = True

    @classmethod
    def from_position(cls, position: Position, mariadb: bool) -> _Cursor:
        try:
            file = str(position.coords["file"])
            pos = int(position.coords["pos"])
            base = file_index(file) * _FILE_SPAN
            text = position.coords.get("gtid") or None
            gtids: _Gtids | None = None
            if text:
                gtids = _MariaGtids.parse(text) if mariadb else _MySQLGtids.parse(text)
        except (KeyError, TypeError, ValueError, SourceError) as exc:
            raise SourceError(
                f"the checkpoint {position.to_dict()} is not a "
                f"{'MariaDB' if mariadb else 'MySQL'} binlog position; {RECOVERY_HINT}"
            ) from exc
        return cls(file, pos, gtids, base + pos)

    @property
    def gtid_text(self) -> str | None:
        if self.dirty:
            self.text_cache = self.gtids.text() if self.gtids is not None else None
            self.dirty = False
        return self.text_cache

    def position(self) -> Position:
        return Position(self.version, {"file": self.file, "pos": self.pos, "gtid": self.gtid_text})


# ------------------------------------------------------------------------------------------
# Value normalisation
# ------------------------------------------------------------------------------------------

# The library decodes text columns with the charset it was told; we tell it latin-1, which maps
# every byte to one code point and never fails, then decode the original bytes ourselves. That
# keeps a stray invalid byte from killing the stream and gives BLOB/BINARY columns their bytes.
_PASSTHROUGH_CHARSET = "latin-1"
_TEXT_TYPES = frozenset(
    {
        FIELD_TYPE.VARCHAR,
        FIELD_TYPE.VAR_STRING,
        FIELD_TYPE.STRING,
        FIELD_TYPE.BLOB,
        FIELD_TYPE.TINY_BLOB,
        FIELD_TYPE.MEDIUM_BLOB,
        FIELD_TYPE.LONG_BLOB,
    }
)
_INT_TYPES = frozenset(
    {FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.INT24, FIELD_TYPE.LONG, FIELD_TYPE.LONGLONG}
)
_EPOCH = dt.datetime(1970, 1, 1)

# MySQL's latin1 is cp1252 except that the five bytes cp1252 leaves undefined map to the C1
# control characters of the same value, so every byte decodes.
_LATIN1_FROM_LATIN1_TEXT: dict[int, str] = {}
for _byte in range(0x80, 0xA0):
    try:
        _LATIN1_FROM_LATIN1_TEXT[_byte] = bytes([_byte]).decode("cp1252")
    except UnicodeDecodeError:
        _LATIN1_FROM_LATIN1_TEXT[_byte] = chr(_byte)

# Charset names as the library reports them (Python-ish) or information_schema spells them
# (MySQL), mapped to Python codecs where the two differ.
_CODECS = {
    "utf8": "utf-8",
    "utf8mb3": "utf-8",
    "utf8mb4": "utf-8",
    "ucs2": "utf-16-be",
    "utf16": "utf-16-be",
    "utf16le": "utf-16-le",
    "utf32": "utf-32-be",
    "koi8r": "koi8_r",
    "koi8u": "koi8_u",
    "sjis": "shift_jis",
    "ujis": "euc_jp",
    "eucjpms": "euc_jp",
    "euckr": "euc_kr",
    "greek": "iso8859_7",
    "hebrew": "iso8859_8",
    "latin2": "iso8859_2",
    "latin5": "iso8859_9",
    "latin7": "iso8859_13",
    "macroman": "mac_roman",
    "macce": "mac_latin2",
    "tis620": "tis_620",
}
_LATIN1_NAMES = frozenset({"latin1", "cp1252"})


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same FLOAT, as the server prints it."""
    for digits in (6, 7, 8, 9):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
            return candidate
    return value


def _timestamp(value: dt.datetime) -> dt.datetime | None:
    # TIMESTAMP is seconds since the epoch in UTC; 0 is the "zero date".
    if value == _EPOCH:
        return None
    return value.replace(tzinfo=dt.UTC)


def _year(value: int) -> int | None:
    # YEAR is stored as value - 1900; the zero year 0000 is stored as 0.
    return None if value == 1900 else value


def _bits(value: str) -> int:
    return int(value, 2)


def _json_clean(value: Any) -> Any:
    """MySQL binary JSON as decoded by the library (bytes keys and strings) -> plain JSON types."""
    if isinstance(value, dict):
        return {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): _json_clean(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_json_clean(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    return value


def _json_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _to_bytes(value: str) -> bytes:
    return value.encode(_PASSTHROUGH_CHARSET)


def _binary_padder(length: int) -> Callable[[str], bytes]:
    # The binlog drops a BINARY(n) value's trailing zero bytes; SELECT returns all n bytes.
    def pad(value: str) -> bytes:
        return value.encode(_PASSTHROUGH_CHARSET).ljust(length, b"\x00")

    return pad


def _uuid_text(value: str) -> str:
    # MariaDB's UUID is FIXED_BINARY(16) to the binlog. Tested on 10.11 with UUID() (v1), v2,
    # v4, v5, v6, v7, other variants, all-zero and all-ones values: the row image always holds
    # the bytes in text order, whatever byte swap the server may do for index order, so no
    # un-swapping here. The binlog drops trailing zero bytes, hence the padding.
    return str(uuid.UUID(bytes=value.encode(_PASSTHROUGH_CHARSET).ljust(16, b"\x00")))


def _inet6_text(value: str) -> str:
    """16 network-order bytes -> the text MariaDB's SELECT prints for an INET6.

    Not ``str(ipaddress.IPv6Address)``: MariaDB (like MySQL's INET6_NTOA) compresses the first
    longest run of zero groups even when it is a single group, and prints the last 32 bits as
    dotted IPv4 for IPv4-compatible (``::1.2.3.4``) and IPv4-mapped (``::ffff:1.2.3.4``) values.
    """
    raw = value.encode(_PASSTHROUGH_CHARSET).ljust(16, b"\x00")
    words = struct.unpack("!8H", raw)
    gap_pos, gap_len = -1, 0
    run_pos = -1
    for i, word in enumerate((*words, 1)):  # the sentinel closes a trailing run
        if word == 0:
            if run_pos < 0:
                run_pos = i
        elif run_pos >= 0:
            if i - run_pos > gap_len:
                gap_pos, gap_len = run_pos, i - run_pos
            run_pos = -1
    if gap_pos == 0 and (gap_len == 6 or (gap_len == 5 and words[5] == 0xFFFF)):
        prefix = "::" if gap_len == 6 else "::ffff:"
        return prefix + ".".join(str(b) for b in raw[12:])
    if gap_pos < 0:
        return ":".join(f"{w:x}" for w in words)
    head = ":".join(f"{w:x}" for w in words[:gap_pos])
    tail = ":".join(f"{w:x}" for w in words[gap_pos + gap_len :])
    return f"{head}::{tail}"


_FIXED_BINARY_TEXT: dict[str, Callable[[str], str]] = {"uuid": _uuid_text, "inet6": _inet6_text}


def _latin1(value: str) -> str:
    return value if value.isascii() else value.translate(_LATIN1_FROM_LATIN1_TEXT)


def _text_decoder(codec: str, warn: Callable[[], None]) -> Callable[[str], str]:
    def decode(value: str) -> str:
        if value.isascii() and codec == "utf-8":
            return value
        raw = value.encode(_PASSTHROUGH_CHARSET)
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            warn()
            return raw.decode(codec, "replace")

    return decode


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """What information_schema says about one column."""

    name: str
    data_type: str
    column_type: str
    charset: str | None
    is_json: bool = False


_QUOTED_RE = re.compile(r"'((?:[^'\\]|''|\\.)*)'")


def _enum_values(column_type: str) -> list[str]:
    """``enum('a','b''c')`` -> ``['a', "b'c"]`` (also for ``set(...)``)."""
    return [
        m.group(1).replace("''", "'").replace("\\\\", "\\")
        for m in _QUOTED_RE.finditer(column_type)
    ]


@dataclass(slots=True)
class _Plan:
    """Per-table decoding plan, precomputed once per table map so rows convert cheaply."""

    ref: TableRef
    ncols: int
    patches: list[tuple[int, str, Any]]
    converters: list[tuple[str, Callable[[Any], Any]]]
    set_columns: list[str]
    table: Any = None

    def apply_patches(self, table: Any) -> None:
        columns = table.columns
        for index, attr, value in self.patches:
            setattr(columns[index], attr, value)
        self.table = table

    def convert(self, values: dict[str, Any], none_sources: dict[str, str]) -> dict[str, Any]:
        for name, fn in self.converters:
            value = values.get(name)
            if value is not None:
                values[name] = fn(value)
        for name in self.set_columns:
            value = values.get(name)
            if value is None:
                # The library returns None for an empty SET as well as for NULL.
                if none_sources.get(name) == "empty set":
                    values[name] = []
            else:
                values[name] = sorted(value)
        return values


def build_plan(
    ref: TableRef,
    columns: Sequence[Any],
    info: Sequence[ColumnInfo] | None,
    metadata_full: bool,
    warn_decode: Callable[[str], None],
) -> _Plan:
    """Decide, per column, how the library must decode it and how we convert what it returns.

    ``columns`` are the library's table-map columns; ``info`` is information_schema's view of
    the table, used for what the table map lacks (names, signedness, ENUM/SET values and
    charsets without ``binlog_row_metadata=FULL``; MariaDB's JSON columns, which are LONGTEXT,
    and its UUID/INET6 columns, which are BINARY(16)).
    """
    if info is not None and len(info) != len(columns):
        log.warning(
            "table_definition_mismatch",
            table=str(ref),
            binlog_columns=len(columns),
            information_schema_columns=len(info),
            risk="the table changed since this event was written; column info is ignored",
        )
        info = None
    patches: list[tuple[int, str, Any]] = []
    converters: list[tuple[str, Callable[[Any], Any]]] = []
    set_columns: list[str] = []
    for index, column in enumerate(columns):
        col_info = info[index] if info is not None else None
        name = column.name or (col_info.name if col_info else None) or f"UNKNOWN_COL{index}"
        if column.name is None and col_info is not None:
            patches.append((index, "name", name))
        ctype = column.type
        text_of = _FIXED_BINARY_TEXT.get(col_info.data_type) if col_info is not None else None
        if text_of is not None and ctype == FIELD_TYPE.STRING:
            # MariaDB's UUID/INET6 reach the binlog as BINARY(16), even with full metadata; only
            # information_schema knows them, and SELECT (hence verify) gives their text form.
            patches.append(
                (index, "cw_charset", getattr(column, "cw_charset", column.character_set_name))
            )
            patches.append((index, "character_set_name", _PASSTHROUGH_CHARSET))
            converters.append((name, text_of))
        elif ctype in _TEXT_TYPES:
            # A column object may already carry our override when a plan is rebuilt mid-event.
            original = getattr(column, "cw_charset", column.character_set_name)
            charset = original if metadata_full else None
            if charset is None and col_info is not None:
                charset = col_info.charset or "binary"
            patches.append((index, "cw_charset", original))
            patches.append((index, "character_set_name", _PASSTHROUGH_CHARSET))
            if charset == "binary" and ctype == FIELD_TYPE.STRING and column.max_length:
                converters.append((name, _binary_padder(column.max_length)))
            else:
                converter = _text_converter(ref, name, charset, col_info, warn_decode)
                converters.append((name, converter))
        elif ctype in _INT_TYPES:
            if not metadata_full and col_info is not None and "unsigned" in col_info.column_type:
                patches.append((index, "unsigned", True))
        elif ctype == FIELD_TYPE.ENUM:
            if not column.enum_values and col_info is not None:
                patches.append((index, "enum_values", ["", *_enum_values(col_info.column_type)]))
        elif ctype == FIELD_TYPE.SET:
            if not column.set_values and col_info is not None:
                patches.append((index, "set_values", _enum_values(col_info.column_type)))
            set_columns.append(name)
        elif ctype == FIELD_TYPE.FLOAT:
            converters.append((name, _float32))
        elif ctype in (FIELD_TYPE.TIMESTAMP, FIELD_TYPE.TIMESTAMP2):
            converters.append((name, _timestamp))
        elif ctype == FIELD_TYPE.YEAR:
            converters.append((name, _year))
        elif ctype == FIELD_TYPE.BIT:
            converters.append((name, _bits))
        elif ctype == FIELD_TYPE.JSON:
            converters.append((name, _json_clean))
    return _Plan(ref, len(columns), patches, converters, set_columns)


def _text_converter(
    ref: TableRef,
    name: str,
    charset: str | None,
    col_info: ColumnInfo | None,
    warn_decode: Callable[[str], None],
) -> Callable[[str], Any]:
    if charset == "binary":
        return _to_bytes
    if charset is not None and charset.lower() in _LATIN1_NAMES:
        return _latin1
    column = f"{ref}.{name}"
    codec = _CODECS.get((charset or "utf8").lower(), charset or "utf-8")
    try:
        "".encode(codec)
    except LookupError:
        log.warning("column_charset_unsupported", column=column, charset=charset)
        codec = "utf-8"
    decode = _text_decoder(codec, lambda: warn_decode(column))
    if col_info is not None and col_info.is_json:

        def decode_json(value: str) -> Any:
            return _json_text(decode(value))

        return decode_json
    return decode


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


class _ConnectionLost(Exception):
    """The replication connection dropped; deliberately not a pymysql error, see ``_connect``."""


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _error_text(exc: BaseException, password: str | None) -> str:
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) >= 2:
        text = f"({exc.args[0]}) {exc.args[1]}"
    else:
        text = str(exc) or type(exc).__name__
    return redact(text, [password])


def translate_error(exc: BaseException, options: MySQLOptions) -> CacheWorkerError:
    """Map a driver/library exception to the ``worker.errors`` class the core understands."""
    if isinstance(exc, CacheWorkerError):
        return exc
    target = f"{options.user}@{options.host}:{options.port}"
    text = _error_text(exc, options.password)
    code = _error_code(exc)
    if code == _ER_MASTER_FATAL_READING_BINLOG:
        return PositionLost(
            f"the MySQL server {target} cannot stream from the checkpointed position: {text}; "
            f"{RECOVERY_HINT}"
        )
    if code == _ER_ACCESS_DENIED:
        return SourceMisconfigured(
            f"MySQL {target} refused the login: {text}; check the user and password"
        )
    if code in _ACCESS_ERRORS:
        return SourceMisconfigured(
            f"MySQL {target} denied an operation: {text}; the user needs "
            f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* and SELECT on the rule schemas"
        )
    if type(exc).__name__ == "BinLogNotEnabled":
        return SourceMisconfigured(
            f"binary logging is disabled on {target}; start the server with log_bin"
        )
    if isinstance(exc, pymysql.err.ProgrammingError | pymysql.err.NotSupportedError):
        return SourceError(f"MySQL {target} rejected a query: {text}")
    if isinstance(
        exc,
        _ConnectionLost
        | pymysql.err.OperationalError
        | pymysql.err.InterfaceError
        | pymysql.err.InternalError
        | OSError
        | EOFError,
    ):
        return SourceUnavailable(f"MySQL {target} is unavailable: {text}")
    return SourceError(f"MySQL {target}: {type(exc).__name__}: {text}")


# ------------------------------------------------------------------------------------------
# Privileges
# ------------------------------------------------------------------------------------------

_GRANT_RE = re.compile(
    r"^GRANT\s+(?P<privs>.+?)\s+ON\s+(?:(?:TABLE|FUNCTION|PROCEDURE|PACKAGE(?:\s+BODY)?)\s+)?"
    r"(?P<scope>(?:`(?:[^`]|``)*`|\*|[^\s.`]+)(?:\.(?:`(?:[^`]|``)*`|\*|[^\s`]+))?)\s+TO\s",
    re.IGNORECASE | re.DOTALL,
)
_ROLE_RE = re.compile(r"^GRANT\s+(?P<roles>`.+?)\s+TO\s", re.IGNORECASE | re.DOTALL)
_ROLE_NAME_RE = re.compile(r"`(?:[^`]|``)*`(?:@`(?:[^`]|``)*`)?")
_IDENT_RE = re.compile(r"`((?:[^`]|``)*)`|(\*)|([^\s.`]+)")


@dataclass(frozen=True, slots=True)
class Grant:
    """One ``GRANT ... ON scope`` line: privileges (upper case) on ``db``/``table`` (None = *)."""

    privileges: frozenset[str]
    db: str | None
    table: str | None


def _split_privileges(text: str) -> frozenset[str]:
    privileges: set[str] = set()
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            privileges.add("".join(current))
            current = []
        else:
            current.append(char)
    privileges.add("".join(current))
    normalised = set()
    for privilege in privileges:
        privilege = " ".join(privilege.split()).upper()
        # A column-level privilege ("SELECT (a, b)") does not cover the whole table.
        if "(" not in privilege and privilege:
            normalised.add(privilege)
    return frozenset(normalised)


def _scope_parts(scope: str) -> tuple[str | None, str | None]:
    parts: list[str | None] = []
    for match in _IDENT_RE.finditer(scope):
        quoted, star, bare = match.groups()
        if star:
            parts.append(None)
        else:
            parts.append(quoted.replace("``", "`") if quoted is not None else bare)
    if len(parts) == 1:
        return parts[0], None
    return parts[0], parts[1]


def parse_grants(lines: Sequence[str]) -> tuple[list[Grant], list[str]]:
    """Parse ``SHOW GRANTS`` output into privilege grants and the names of granted roles."""
    grants: list[Grant] = []
    roles: list[str] = []
    for line in lines:
        match = _GRANT_RE.match(line.strip())
        if match is not None:
            db, table = _scope_parts(match.group("scope"))
            grants.append(Grant(_split_privileges(match.group("privs")), db, table))
            continue
        role_match = _ROLE_RE.match(line.strip())
        if role_match is not None:
            roles.extend(m.group(0) for m in _ROLE_NAME_RE.finditer(role_match.group("roles")))
    return grants, roles


def _db_pattern_matches(pattern: str, db: str) -> bool:
    # Database-level grants may use the LIKE wildcards % and _, escaped with a backslash.
    regex = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            regex.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        regex.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        i += 1
    return re.fullmatch("".join(regex), db) is not None


def _has_global(grants: Sequence[Grant], names: set[str]) -> bool:
    for grant in grants:
        if grant.db is None and ("ALL PRIVILEGES" in grant.privileges or grant.privileges & names):
            return True
    return False


def _has_select(grants: Sequence[Grant], table: TableRef) -> bool:
    for grant in grants:
        if not ({"SELECT", "ALL PRIVILEGES", "ALL"} & grant.privileges):
            continue
        if grant.db is None:
            return True
        if not _db_pattern_matches(grant.db, table.schema):
            continue
        if grant.table is None or grant.table == table.name:
            return True
    return False


def missing_privileges(
    grants: Sequence[Grant], tables: Sequence[TableRef], mariadb: bool
) -> list[str]:
    """The privileges the user lacks, e.g. ``["REPLICATION SLAVE", "SELECT on `app`.*"]``."""
    missing: list[str] = []
    if not _has_global(grants, {"REPLICATION SLAVE", "REPLICATION REPLICA", "ALL"}):
        missing.append("REPLICATION SLAVE")
    client = {"REPLICATION CLIENT", "BINLOG MONITOR", "ALL"}
    if not mariadb:
        client.add("SUPER")
    if not _has_global(grants, client):
        missing.append("REPLICATION CLIENT")
    seen: set[str] = set()
    for table in tables:
        if table.schema in seen:
            continue
        if not _has_select(grants, table):
            seen.add(table.schema)
            missing.append(f"SELECT on `{table.schema}`.*")
    return missing


def _grant_fix(missing: Sequence[str], account: str) -> str:
    statements = []
    global_privs = [m for m in missing if not m.startswith("SELECT on ")]
    if global_privs:
        statements.append(f"GRANT {', '.join(global_privs)} ON *.* TO {account};")
    for item in missing:
        if item.startswith("SELECT on "):
            statements.append(f"GRANT SELECT ON {item.removeprefix('SELECT on ')} TO {account};")
    return " ".join(statements)


def _account(current_user: str) -> str:
    user, _, host = current_user.rpartition("@")
    return f"'{user}'@'{host}'"


# ------------------------------------------------------------------------------------------
# The source
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ServerInfo:
    version: str
    mariadb: bool
    variables: dict[str, str]

    @property
    def metadata_full(self) -> bool:
        return self.variables.get("binlog_row_metadata", "").upper() == "FULL"

    @property
    def has_gtid(self) -> bool:
        return self.mariadb or self.variables.get("gtid_mode", "").upper() == "ON"


_VARIABLES = (
    "log_bin",
    "binlog_format",
    "binlog_row_image",
    "binlog_row_metadata",
    "gtid_mode",
    "gtid_binlog_pos",
    "binlog_row_value_options",
)


def _server_info(conn: pymysql.Connection[Any]) -> _ServerInfo:
    with conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        row = cur.fetchone()
        version = str(row[0]) if row else ""
        placeholders = ", ".join(["%s"] * len(_VARIABLES))
        cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({placeholders})", _VARIABLES)
        variables = {str(name).lower(): str(value) for name, value in cur.fetchall()}
    return _ServerInfo(version, "mariadb" in version.lower(), variables)


def _master_status(conn: pymysql.Connection[Any], mariadb: bool) -> tuple[str, int] | None:
    """The binlog file and offset the server is writing at."""
    with conn.cursor() as cur:
        if mariadb:
            cur.execute("SHOW MASTER STATUS")
        else:
            # MySQL 8.4 removed SHOW MASTER STATUS; before 8.2 the new spelling does not parse.
            try:
                cur.execute("SHOW BINARY LOG STATUS")
            except pymysql.err.ProgrammingError as exc:
                if _error_code(exc) != _ER_PARSE_ERROR:
                    raise
                cur.execute("SHOW MASTER STATUS")
        row = cur.fetchone()
    if not row:
        return None
    return str(row[0]), int(row[1])


def _shutdown(conn: Any) -> None:
    # Only the socket is touched: closing the pymysql object from another thread would race
    # with the reader thread, while shutdown() makes its blocked recv() return at once.
    sock = getattr(conn, "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close_quietly(conn: Any) -> None:
    if conn is None:
        return
    # The connection is being discarded; a failure to say goodbye changes nothing.
    with contextlib.suppress(Exception):
        conn.close()


@dataclass(slots=True)
class _OpenTx:
    """The transaction being read: its start version, GTID and not yet yielded changes."""

    version: int
    explicit: bool
    gtid: Any = None
    changes: list[RowChange] = field(default_factory=list)


class _Session:
    """One connection's worth of streaming state; discarded on reconnect."""

    def __init__(self, source: MySQLSource, info: _ServerInfo, meta: pymysql.Connection[Any]):
        self.source = source
        self.info = info
        self.meta = meta
        self.conns: list[Any] = []
        self.reader: Any = None
        self.packets: PacketEvents | None = None
        self.plans: dict[int, _Plan] = {}
        self.table_info: dict[TableRef, list[ColumnInfo] | None] = {}

    def abort(self) -> None:
        for conn in [*self.conns, self.meta]:
            _shutdown(conn)

    def close(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(Exception):
                self.reader.close()
        for conn in self.conns:
            _close_quietly(conn)
        _close_quietly(self.meta)

    def invalidate(self) -> None:
        """Forget table definitions: after a DDL or a new binlog file they may mean otherwise."""
        if self.reader is not None:
            # freeze_schema makes the library keep a table map per table id instead of parsing
            # the one before every transaction (half the decoding time); ids are reused after a
            # server restart (a new file) and a DDL changes the definition behind an id.
            self.reader.table_map.clear()
        if self.packets is not None:
            self.packets.forget_tables()
        self.plans.clear()
        self.table_info.clear()
        # The library caches information_schema column names process-wide and never forgets.
        row_event._COLUMN_NAME_CACHE.clear()

    def columns_info(self, ref: TableRef) -> list[ColumnInfo] | None:
        if ref in self.table_info:
            return self.table_info[ref]
        with self.meta.cursor() as cur:
            cur.execute(
                "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME "
                "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
                "ORDER BY ORDINAL_POSITION",
                (ref.schema, ref.name),
            )
            rows = cur.fetchall()
            json_columns: set[str] = set()
            if self.info.mariadb and rows:
                # MariaDB's JSON is LONGTEXT plus a json_valid() CHECK named after the column.
                cur.execute(
                    "SELECT CONSTRAINT_NAME, CHECK_CLAUSE "
                    "FROM information_schema.CHECK_CONSTRAINTS "
                    "WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s",
                    (ref.schema, ref.name),
                )
                for _name, clause in cur.fetchall():
                    match = re.fullmatch(r"json_valid\(`((?:[^`]|``)+)`\)", str(clause).strip())
                    if match:
                        json_columns.add(match.group(1).replace("``", "`"))
        info = [
            ColumnInfo(
                name=str(name),
                data_type=str(data_type).lower(),
                column_type=str(column_type).lower(),
                charset=str(charset) if charset is not None else None,
                is_json=str(name) in json_columns,
            )
            for name, data_type, column_type, charset in rows
        ] or None
        self.table_info[ref] = info
        return info

    def plan(self, event: Any, ref: TableRef) -> _Plan:
        return self.plan_for(event.table_id, ref)

    def plan_for(self, table_id: int, ref: TableRef) -> _Plan:
        table = self.reader.table_map[table_id]
        plan = self.plans.get(table_id)
        if plan is None or plan.ref != ref or plan.ncols != len(table.columns):
            needs_info = self.info.mariadb or not self.info.metadata_full
            info = self.columns_info(ref) if needs_info else None
            plan = build_plan(
                ref, table.columns, info, self.info.metadata_full, self.source._warn_decode
            )
            self.plans[table_id] = plan
        if plan.table is not table:
            # The library built a new table object (first use, or after an invalidation):
            # our decoding overrides live on its column objects.
            plan.apply_patches(table)
        return plan

    def decoder_for(self, table_id: int, table: Any) -> TableDecoder | None:
        """The fast decoder of a followed table's map (None: the library decodes its rows)."""
        ref = TableRef(table.schema, table.table)
        plan = self.plan_for(table_id, ref)
        options = self.source.options
        keep, keep_old = options.columns.get(ref), options.old_columns.get(ref)
        return compile_table(plan.table.columns, plan.converters, plan.set_columns, keep, keep_old)


class MySQLSource:
    """Implements ``worker.interfaces.Source`` for MySQL and MariaDB (row-based binlog)."""

    def __init__(self, options: MySQLOptions) -> None:
        self.options = options
        self._tables = frozenset(options.tables)
        self._table_keys = frozenset((t.schema, t.name) for t in options.tables)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._ctl: pymysql.Connection[Any] | None = None
        self._ctl_lock = threading.Lock()
        self._sessions: list[_Session] = []
        self._acked: Position | None = None
        self._warned: set[str] = set()
        self._last_check_error: CacheWorkerError | None = None

    # -- connections ------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        opts = self.options
        kwargs: dict[str, Any] = {
            "host": opts.host,
            "port": opts.port,
            "user": opts.user,
            "password": opts.password or "",
            "connect_timeout": opts.connect_timeout_s,
            # A dead peer must surface as an error eventually; the server sends a heartbeat at
            # least every heartbeat_s while idle, so silence this long means it is gone.
            "read_timeout": max(30.0, 5 * opts.heartbeat_s),
            "write_timeout": max(30.0, 5 * opts.heartbeat_s),
            "charset": "utf8mb4",
            "autocommit": True,
        }
        if opts.ssl is not None:
            kwargs["ssl"] = opts.ssl
        return kwargs

    def _connect(self) -> pymysql.Connection[Any]:
        return open_connection(**self._connect_kwargs())

    def _query(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on the control connection (used by checks, columns, positions)."""
        with self._ctl_lock:
            try:
                if self._ctl is None:
                    self._ctl = self._connect()
                with self._ctl.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall())
            except pymysql.err.MySQLError as exc:
                if not isinstance(exc, pymysql.err.ProgrammingError):
                    _close_quietly(self._ctl)
                    self._ctl = None
                raise

    def _server(self) -> _ServerInfo:
        with self._ctl_lock:
            try:
                if self._ctl is None:
                    self._ctl = self._connect()
                return _server_info(self._ctl)
            except pymysql.err.MySQLError:
                _close_quietly(self._ctl)
                self._ctl = None
                raise

    def _guard(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except CacheWorkerError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.options) from exc

    # -- Source protocol -------------------------------------------------------------------

    def initial_position(self) -> Position:
        """Where to start without a checkpoint: the end of the binlog, or its first file."""
        return self._guard(self._initial_position)

    def _initial_position(self) -> Position:
        info = self._server()
        if self.options.start == "beginning":
            rows = self._query("SHOW BINARY LOGS")
            if not rows:
                raise SourceMisconfigured("binary logging is disabled (SHOW BINARY LOGS is empty)")
            return make_position(str(rows[0][0]), 4, None)
        # The GTID and the file/offset are read separately; re-read until a commit did not
        # slip in between, so both describe the same point.
        status: tuple[str, int] | None = None
        for _ in range(10):
            before = self._gtid_text(info)
            with self._ctl_lock:
                if self._ctl is None:
                    self._ctl = self._connect()
                status = _master_status(self._ctl, info.mariadb)
            if status is None:
                raise SourceMisconfigured("binary logging is disabled (SHOW MASTER STATUS empty)")
            if self._gtid_text(info) == before:
                return make_position(status[0], status[1], before)
        # Commits kept slipping in between: the file/offset alone is still a correct start.
        assert status is not None
        return make_position(status[0], status[1], None)

    def _gtid_text(self, info: _ServerInfo) -> str | None:
        if info.mariadb:
            rows = self._query("SELECT @@GLOBAL.gtid_binlog_pos")
        elif info.has_gtid:
            rows = self._query("SELECT @@GLOBAL.gtid_executed")
        else:
            return None
        text = str(rows[0][0] or "").replace("\n", "").strip() if rows else ""
        return text or None

    def ack(self, position: Position) -> None:
        """Nothing to release: the server purges its binlog on its own schedule."""
        self._acked = position

    def columns(self, table: TableRef) -> list[str] | None:
        """Column names in ordinal order, or None when the table does not exist."""
        rows = self._guard(
            lambda: self._query(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                (table.schema, table.name),
            )
        )
        return [str(r[0]) for r in rows] or None

    def describe_position(self, position: Position) -> str:
        return describe_position(position)

    def close(self) -> None:
        """Stop streaming; safe from any thread, and makes a blocked ``stream()`` return."""
        self._closing.set()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.abort()
        with self._ctl_lock:
            _close_quietly(self._ctl)
            self._ctl = None

    # -- checks ----------------------------------------------------------------------------

    def checks(self) -> list[CheckResult]:
        """Reachability, binlog settings and privileges; never raises for a down server."""
        opts = self.options
        self._last_check_error = None
        try:
            info = self._server()
        except Exception as exc:
            error = translate_error(exc, opts)
            self._last_check_error = error
            return [CheckResult(CHECK_REACHABLE, False, str(error))] + [
                CheckResult(name, False, "not checked: the server is unreachable")
                for name in _ALL_CHECKS[1:]
            ]
        results = [CheckResult(CHECK_REACHABLE, True, f"{opts.host}:{opts.port} {info.version}")]
        for check in (
            self._check_binlog,
            self._check_format,
            self._check_row_image,
            self._check_row_metadata,
            self._check_privileges,
            self._check_gtid,
        ):
            try:
                results.append(check(info))
            except Exception as exc:
                error = translate_error(exc, opts)
                name = _ALL_CHECKS[len(results)]
                results.append(CheckResult(name, False, f"could not check: {error}"))
        return results

    def _check_binlog(self, info: _ServerInfo) -> CheckResult:
        value = info.variables.get("log_bin", "OFF").upper()
        if value in ("ON", "1"):
            return CheckResult(CHECK_BINLOG, True, "log_bin=ON")
        return CheckResult(CHECK_BINLOG, False, f"log_bin={value}; start the server with --log-bin")

    def _check_format(self, info: _ServerInfo) -> CheckResult:
        value = info.variables.get("binlog_format", "").upper()
        if value == "ROW":
            return CheckResult(CHECK_FORMAT, True, "binlog_format=ROW")
        return CheckResult(
            CHECK_FORMAT,
            False,
            f"binlog_format={value or 'unknown'}: row changes are not logged as rows; set "
            "binlog_format=ROW in the server config (SET GLOBAL affects new sessions only)",
        )

    def _check_row_image(self, info: _ServerInfo) -> CheckResult:
        value = info.variables.get("binlog_row_image", "").upper()
        if "PARTIAL_JSON" in info.variables.get("binlog_row_value_options", "").upper():
            return CheckResult(
                CHECK_ROW_IMAGE,
                False,
                "binlog_row_value_options=PARTIAL_JSON logs JSON updates as diffs without the "
                "full row; SET GLOBAL binlog_row_value_options=''",
            )
        if value == "FULL":
            return CheckResult(CHECK_ROW_IMAGE, True, "binlog_row_image=FULL")
        return CheckResult(
            CHECK_ROW_IMAGE,
            False,
            f"binlog_row_image={value or 'unknown'}: rows are logged without all columns; set "
            "binlog_row_image=FULL in the server config",
        )

    def _check_row_metadata(self, info: _ServerInfo) -> CheckResult:
        value = info.variables.get("binlog_row_metadata", "").upper()
        if value == "FULL":
            return CheckResult(CHECK_ROW_METADATA, True, "binlog_row_metadata=FULL")
        return CheckResult(
            CHECK_ROW_METADATA,
            True,
            f"binlog_row_metadata={value or 'unsupported'}: column names, signedness, charsets "
            "and ENUM/SET values are read from information_schema, so a DDL between a change "
            "and its reading can mislabel columns; fix: SET GLOBAL binlog_row_metadata=FULL",
            warning=True,
        )

    def _check_privileges(self, info: _ServerInfo) -> CheckResult:
        lines = [str(r[0]) for r in self._query("SHOW GRANTS FOR CURRENT_USER()")]
        grants, roles = parse_grants(lines)
        for role in roles:
            try:
                role_lines = [str(r[0]) for r in self._query(f"SHOW GRANTS FOR {role}")]
            except pymysql.err.MySQLError:
                continue
            grants.extend(parse_grants(role_lines)[0])
        missing = missing_privileges(grants, self.options.tables, info.mariadb)
        if not missing:
            return CheckResult(
                CHECK_PRIVILEGES, True, "REPLICATION SLAVE, REPLICATION CLIENT, SELECT granted"
            )
        current = self._query("SELECT CURRENT_USER()")
        account = _account(str(current[0][0])) if current else f"'{self.options.user}'@'%'"
        return CheckResult(
            CHECK_PRIVILEGES,
            False,
            f"missing {', '.join(missing)}; fix: {_grant_fix(missing, account)}",
        )

    def _check_gtid(self, info: _ServerInfo) -> CheckResult:
        if info.mariadb:
            pos = info.variables.get("gtid_binlog_pos") or "(none yet)"
            return CheckResult(CHECK_GTID, True, f"MariaDB GTID available, gtid_binlog_pos={pos}")
        mode = info.variables.get("gtid_mode", "OFF").upper()
        if self.options.resume == "gtid" and mode != "ON":
            return CheckResult(
                CHECK_GTID, False, f"resume=gtid but gtid_mode={mode}; set gtid_mode=ON"
            )
        detail = f"gtid_mode={mode}"
        if mode != "ON":
            detail += "; resuming by binlog file/offset"
        return CheckResult(CHECK_GTID, True, detail)

    def position_available(self, position: Position) -> CheckResult:
        """Whether the checkpoint's binlog file still exists; FAIL means the position is lost."""
        file = str(position.coords.get("file"))
        pos = int(position.coords.get("pos", 0))
        try:
            rows = self._guard(lambda: self._query("SHOW BINARY LOGS"))
        except CacheWorkerError as exc:
            return CheckResult(CHECK_POSITION, False, f"could not check: {exc}")
        sizes = {str(r[0]): int(r[1]) for r in rows}
        if file not in sizes:
            oldest = str(rows[0][0]) if rows else "none"
            return CheckResult(
                CHECK_POSITION,
                False,
                f"{describe_position(position)} is gone (oldest binlog is {oldest}); "
                f"{RECOVERY_HINT}",
            )
        if pos > sizes[file]:
            return CheckResult(
                CHECK_POSITION,
                False,
                f"{describe_position(position)} is past the end of {file} ({sizes[file]} bytes); "
                f"{RECOVERY_HINT}",
            )
        return CheckResult(CHECK_POSITION, True, f"{describe_position(position)} is available")

    # -- streaming -------------------------------------------------------------------------

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(event, **fields)

    def _warn_decode(self, column: str) -> None:
        self._warn_once(
            f"decode:{column}",
            "column_text_not_decodable",
            column=column,
            action="invalid bytes replaced with U+FFFD",
        )

    def stream(self, start: Position) -> Iterator[SourceItem]:
        """Yield transactions and heartbeats after ``start``; reconnects until ``close()``."""
        cursor: _Cursor | None = None
        attempt = 0
        while not self._closing.is_set():
            session: _Session | None = None
            try:
                session = self._open_session()
                if cursor is None:
                    cursor = _Cursor.from_position(start, session.info.mariadb)
                for item in self._read(session, cursor):
                    attempt = 0
                    yield item
                if self._closing.is_set():
                    return
                raise _ConnectionLost("the server ended the binlog stream")
            except CacheWorkerError:
                raise
            except Exception as exc:
                if self._closing.is_set():
                    return
                error = translate_error(exc, self.options)
                if not error.retryable:
                    raise error from exc
                attempt += 1
                ceiling = min(self.options.reconnect_max_backoff_s, 0.2 * 2 ** min(attempt, 20))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                log.warning(
                    "source_reconnect",
                    attempt=attempt,
                    error_class=type(exc).__name__,
                    error=_error_text(exc, self.options.password),
                    backoff_s=round(delay, 3),
                    resume=describe_position(cursor.position()) if cursor else None,
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
        meta = self._connect()
        try:
            info = _server_info(meta)
        except BaseException:
            _close_quietly(meta)
            raise
        session = _Session(self, info, meta)
        with self._lock:
            self._sessions.append(session)
        if self._closing.is_set():
            session.abort()
        if not info.metadata_full:
            self._warn_once(
                "column_names",
                "column_names_from_information_schema",
                binlog_row_metadata=info.variables.get("binlog_row_metadata", "unsupported"),
                risk="column names and types come from information_schema as of now, so a DDL "
                "between a change and its reading can mislabel columns; fix: "
                "SET GLOBAL binlog_row_metadata=FULL",
            )
        return session

    def _make_reader(self, session: _Session, cursor: _Cursor) -> Any:
        opts = self.options
        info = session.info
        gtid = cursor.gtid_text if cursor.gtids is not None else None
        if opts.resume == "gtid" and not info.has_gtid:
            raise SourceMisconfigured(
                "resume=gtid but the server has no GTIDs (gtid_mode is not ON)"
            )
        use_gtid = opts.resume != "file" and gtid is not None and info.has_gtid
        if opts.resume == "gtid" and gtid is None:
            self._warn_once(
                "gtid_missing",
                "resume_by_file",
                reason="the checkpoint has no GTID yet",
                position=describe_position(cursor.position()),
            )

        def connect(**kwargs: Any) -> Any:
            if "db" in kwargs:  # the library still uses pymysql's deprecated spelling
                kwargs["database"] = kwargs.pop("db")
            conn = open_connection(**kwargs)
            read_packet: Callable[..., Any] = conn._read_packet

            def read(*args: Any, **kw: Any) -> Any:
                try:
                    return read_packet(*args, **kw)
                except pymysql.err.OperationalError as exc:
                    # The library silently reconnects on these codes, from where it last read
                    # (mid-transaction) or from the original GTID (replaying everything);
                    # raising a non-pymysql error lets stream() resume from a boundary instead.
                    if _error_code(exc) in (2006, 2013):
                        raise _ConnectionLost(_error_text(exc, opts.password)) from exc
                    raise

            setattr(conn, "_read_packet", read)  # noqa: B010 - shadows the method per instance
            session.conns.append(conn)
            if self._closing.is_set():
                _shutdown(conn)
            return conn

        kwargs: dict[str, Any] = {
            "connection_settings": self._connect_kwargs(),
            "server_id": opts.server_id,
            "blocking": True,
            "resume_stream": True,
            "only_events": _ONLY_EVENTS,
            "only_schemas": sorted({t.schema for t in opts.tables}),
            "only_tables": sorted({t.name for t in opts.tables}),
            "slave_heartbeat": opts.heartbeat_s,
            "enable_logging": False,
            "use_column_name_cache": not info.metadata_full,
            "freeze_schema": True,
            "pymysql_wrapper": connect,
        }
        if use_gtid:
            kwargs.update(auto_position=gtid, is_mariadb=info.mariadb)
        else:
            # is_mariadb=True only makes sense with auto_position: without it the library asks
            # MariaDB for the empty file name at offset 4, i.e. the very first binlog, and
            # ignores log_file/log_pos. The MySQL-style dump by file/offset works on MariaDB.
            kwargs.update(log_file=cursor.file, log_pos=cursor.pos, is_mariadb=False)
        log.info(
            "source_streaming",
            host=opts.host,
            port=opts.port,
            server=info.version,
            resume="gtid" if use_gtid else "file",
            position=describe_position(cursor.position()),
        )
        return BinLogStreamReader(**kwargs)

    def _read(self, session: _Session, cursor: _Cursor) -> Iterator[SourceItem]:
        """Read one connection's events, updating ``cursor`` at every transaction boundary."""
        opts = self.options
        mariadb = session.info.mariadb
        reader = self._make_reader(session, cursor)
        session.reader = reader
        packets = session.packets = PacketEvents(reader, self._table_keys, session.decoder_for)
        events = packets.events()
        plans = session.plans
        chunk_rows = max(1, opts.chunk_rows)
        table_keys = self._table_keys
        target = _master_status(session.meta, mariadb)
        target_version = (
            file_index(target[0]) * _FILE_SPAN + target[1] if target is not None else None
        )
        read_file = cursor.file
        read_base = file_index(read_file) * _FILE_SPAN
        tx: _OpenTx | None = None
        pending = False
        last_beat = time.monotonic()
        previous_beat: int | None = None
        gtids = cursor.gtids

        def boundary(log_pos: int) -> None:
            if tx is not None and tx.gtid is not None and gtids is not None:
                if mariadb:
                    assert isinstance(gtids, _MariaGtids)
                    gtids.add(*tx.gtid)
                else:
                    assert isinstance(gtids, _MySQLGtids)
                    gtids.add_text(tx.gtid)
                cursor.dirty = True
            version = read_base + log_pos
            if version > cursor.version:
                cursor.file, cursor.pos, cursor.version = read_file, log_pos, version
            if cursor.gtids is not gtids:
                cursor.gtids, cursor.dirty = gtids, True

        while True:
            try:
                event = next(events, None)
            except (CacheWorkerError, _ConnectionLost, pymysql.err.MySQLError, OSError):
                raise
            except Exception as exc:
                raise SourceError(
                    f"could not decode the binlog near {read_file}:{packets.log_pos}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if event is None or self._closing.is_set():
                return
            cls = type(event)
            if cls is not HeartbeatLogEvent:
                previous_beat = None
            if cls is FastRows:
                if tx is None:
                    tx = _OpenTx(cursor.version, explicit=True)
                for change in _fast_changes(event, plans[event.table_id].ref, tx.version):
                    if len(tx.changes) >= chunk_rows:
                        yield Transaction(tx.changes, None, None)
                        tx.changes = []
                    tx.changes.append(change)
                continue
            op = _ROWS_EVENTS.get(cls)
            if op is not None:
                if (event.schema, event.table) not in table_keys:
                    continue
                if tx is None:
                    tx = _OpenTx(cursor.version, explicit=True)
                for change in self._changes(session, event, op, tx.version, read_file):
                    if len(tx.changes) >= chunk_rows:
                        yield Transaction(tx.changes, None, None)
                        tx.changes = []
                    tx.changes.append(change)
                continue
            packet = event.packet
            if cls is FastXid or cls is XidEvent or cls is XAPrepareEvent:
                if cls is XAPrepareEvent and tx is not None and tx.changes:
                    self._warn_once(
                        "xa",
                        "xa_transaction_delivered_at_prepare",
                        risk="an XA transaction rolled back after PREPARE is not undone",
                    )
                boundary(packet.log_pos)
                done, tx = tx, None
                if done is not None and done.changes:
                    yield Transaction(done.changes, cursor.position(), float(event.timestamp))
                    pending = False
                else:
                    pending = True
            elif cls is FastMariaGtid or cls is MariadbGtidEvent or cls is GtidEvent:
                if tx is not None and tx.changes:
                    # A group that never committed in the log (e.g. XA); it ends where this
                    # one starts, which is a boundary.
                    self._warn_once("unterminated", "transaction_without_commit")
                    boundary(packet.log_pos - packet.event_size)
                    yield Transaction(tx.changes, cursor.position(), float(event.timestamp))
                start = read_base + packet.log_pos - packet.event_size
                if cls is not GtidEvent:
                    tx = _OpenTx(
                        start,
                        explicit=not (event.flags & _MARIADB_FL_STANDALONE),
                        gtid=(event.domain_id, event.server_id, event.gtid_seq_no),
                    )
                else:
                    tx = _OpenTx(start, explicit=False, gtid=event.gtid)
            elif cls is QueryEvent:
                query = event.query.strip()
                keyword = query[:12].upper()
                if keyword == "BEGIN" or keyword.startswith("XA START"):
                    if tx is None:
                        start = read_base + packet.log_pos
                        tx = _OpenTx(start - packet.event_size, explicit=True)
                    else:
                        tx.explicit = True
                    continue
                if keyword in ("COMMIT", "ROLLBACK") or keyword.startswith("XA COMMIT"):
                    # ROLLBACK in the binlog means non-transactional changes that stayed.
                    boundary(packet.log_pos)
                    done, tx = tx, None
                    if done is not None and done.changes:
                        yield Transaction(done.changes, cursor.position(), float(event.timestamp))
                        pending = False
                    else:
                        pending = True
                elif keyword.startswith(("SAVEPOINT", "ROLLBACK TO", "XA END")):
                    continue
                else:
                    session.invalidate()
                    truncated = self._truncated(event, query)
                    if tx is not None and tx.explicit:
                        continue
                    version = tx.version if tx is not None else cursor.version
                    boundary(packet.log_pos)
                    tx = None
                    if truncated is not None:
                        change = RowChange(Op.TRUNCATE, truncated, None, None, version)
                        yield Transaction([change], cursor.position(), float(event.timestamp))
                        pending = False
                    else:
                        pending = True
            elif cls is RotateEvent:
                read_file = event.next_binlog
                read_base = file_index(read_file) * _FILE_SPAN
                session.invalidate()
                if tx is None:
                    boundary(event.position)
            elif cls is HeartbeatLogEvent:
                if tx is None:
                    match = _FILE_INDEX_RE.search(event.ident.rstrip("\x00"))
                    beat_base = int(match.group(1)) * _FILE_SPAN if match else read_base
                    beat = beat_base + packet.log_pos
                    status = _master_status(session.meta, mariadb)
                    end = file_index(status[0]) * _FILE_SPAN + status[1] if status else beat
                    # At the server's end of log, or sent the same heartbeat twice with nothing
                    # in between (idle, whatever coordinates it reports): caught up.
                    idle, previous_beat = previous_beat == beat, beat
                    if beat >= end or idle:
                        if beat >= end and beat_base == read_base and beat > cursor.version:
                            # Everything up to the dump's position was read and no transaction
                            # is open: skip the trailing events that belong to none (MariaDB's
                            # binlog checkpoints), so the checkpoint reaches the end of the log.
                            boundary(packet.log_pos)
                        yield Heartbeat(cursor.position(), caught_up=True)
                        pending = False
                        last_beat = time.monotonic()
                        target_version = None
                        continue
            elif cls is MariadbGtidListEvent:
                if gtids is None and tx is None and event.timestamp:
                    state = _MariaGtids()
                    for item in event.gtid_list:
                        known = state.domains.get(item.domain_id)
                        if known is None or item.gtid_seq_no > known[1]:
                            state.add(item.domain_id, item.server_id, item.gtid_seq_no)
                    gtids = state
            elif cls is PartialUpdateRowsEvent and (event.schema, event.table) in table_keys:
                raise SourceMisconfigured(
                    f"{event.schema}.{event.table}: partial JSON updates are logged without "
                    "the full row; SET GLOBAL binlog_row_value_options=''"
                )
            if tx is None and target_version is not None and cursor.version >= target_version:
                # Reached the end of the log as it was when we connected: a busy server may
                # never go idle long enough to send a heartbeat, and burst mode must finish.
                target_version = None
                yield Heartbeat(cursor.position(), caught_up=True)
                pending = False
                last_beat = time.monotonic()
            elif pending and time.monotonic() - last_beat >= _HEARTBEAT_EVERY_S:
                yield Heartbeat(cursor.position(), caught_up=False)
                pending = False
                last_beat = time.monotonic()

    def _changes(
        self, session: _Session, event: Any, op: Op, version: int, read_file: str
    ) -> list[RowChange]:
        ref = TableRef(event.schema, event.table)
        plan = session.plan(event, ref)
        try:
            rows = event.rows
        except Exception as exc:
            raise SourceError(
                f"could not decode rows of {ref} near {read_file}:{event.packet.log_pos}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        convert = plan.convert
        if op is Op.UPDATE:
            return [
                RowChange(
                    op,
                    ref,
                    convert(row["before_values"], row["before_none_sources"]),
                    convert(row["after_values"], row["after_none_sources"]),
                    version,
                )
                for row in rows
            ]
        if op is Op.INSERT:
            return [
                RowChange(op, ref, None, convert(row["values"], row["none_sources"]), version)
                for row in rows
            ]
        return [
            RowChange(op, ref, convert(row["values"], row["none_sources"]), None, version)
            for row in rows
        ]

    def _truncated(self, event: Any, query: str) -> TableRef | None:
        match = _TRUNCATE_RE.match(query)
        if match is None:
            return None
        default_schema = event.schema.decode() if isinstance(event.schema, bytes) else event.schema
        first = (match.group(1) or match.group(2) or "").replace("``", "`")
        second = match.group(3) or match.group(4)
        if second is not None:
            ref = TableRef(first, second.replace("``", "`"))
        else:
            ref = TableRef(str(default_schema), first)
        return ref if ref in self._tables else None


def _fast_changes(event: FastRows, ref: TableRef, version: int) -> list[RowChange]:
    etype = event.event_type
    op = Op.UPDATE if etype in UPDATE_EVENTS else Op.DELETE
    if etype in _INSERT_EVENTS:
        op = Op.INSERT
    return [RowChange(op, ref, before, after, version) for before, after in event.rows]


_TRUNCATE_RE = re.compile(
    r"^TRUNCATE\s+(?:TABLE\s+)?(?:`((?:[^`]|``)+)`|([\w$]+))(?:\.(?:`((?:[^`]|``)+)`|([\w$]+)))?",
    re.IGNORECASE,
)


def preflight(options: MySQLOptions) -> None:
    """Raise ``SourceMisconfigured`` (or ``SourceUnavailable``) unless streaming can work.

    Used at ``run`` start: binlog off, a format other than ROW, a row image other than FULL or
    missing privileges each make the stream useless or wrong, so they stop the worker with the
    fix in the message. ``binlog_row_metadata`` other than FULL is only a warning.
    """
    source = MySQLSource(options)
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
            "the MySQL source cannot stream: " + "; ".join(f"{r.name}: {r.detail}" for r in failed)
        )
