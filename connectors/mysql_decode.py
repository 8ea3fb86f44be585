"""Fast decoding of binlog row images: the hot path of the MySQL/MariaDB source.

The stock mysql-replication reader decodes every column through a long chain of type checks,
reads the packet a few bytes at a time and builds each value twice (its own, then ours); on two
cores that caps a replica at a few thousand rows a second. This module owns the replacement: for
each table map it compiles, once, one reader per column from the library's parsed column
definitions and our decoding plan (``connectors.mysql.build_plan``), and then decodes whole rows
events straight from the packet bytes into the exact values the library-plus-plan path gives
(``tests/integration/test_mysql_decode.py`` proves this on every column type). A table with a
column type this module does not know, or an event whose images are not full, gets ``None`` from
``compile_table`` / ``decode_rows`` and the caller falls back to the library.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from pymysqlreplication.constants import FIELD_TYPE
from pymysqlreplication.json_binary import parse_json

# Event types (MySQL's binlog_event.h and MariaDB's log_event.h).
QUERY_EVENT = 2
ROTATE_EVENT = 4
FORMAT_DESCRIPTION_EVENT = 15
XID_EVENT = 16
TABLE_MAP_EVENT = 19
WRITE_ROWS_V1 = 23
UPDATE_ROWS_V1 = 24
DELETE_ROWS_V1 = 25
WRITE_ROWS_V2 = 30
UPDATE_ROWS_V2 = 31
DELETE_ROWS_V2 = 32
MARIADB_GTID_EVENT = 162

ROWS_V1 = frozenset({WRITE_ROWS_V1, UPDATE_ROWS_V1, DELETE_ROWS_V1})
ROWS_V2 = frozenset({WRITE_ROWS_V2, UPDATE_ROWS_V2, DELETE_ROWS_V2})
UPDATE_EVENTS = frozenset({UPDATE_ROWS_V1, UPDATE_ROWS_V2})
INSERT_EVENTS = frozenset({WRITE_ROWS_V1, WRITE_ROWS_V2})

# The packet is the OK byte followed by the 19-byte event header.
HEADER = struct.Struct("<IBIIIH")
HEADER_END = 20
CHECKSUM_LEN = 4

Reader = Callable[[bytes, int], tuple[Any, int]]
Image = dict[str, Any]
Convert = Callable[[Any], Any]

_I8 = struct.Struct("<b").unpack_from
_U8 = struct.Struct("<B").unpack_from
_I16 = struct.Struct("<h").unpack_from
_U16 = struct.Struct("<H").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I64 = struct.Struct("<q").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_F32 = struct.Struct("<f").unpack_from
_F64 = struct.Struct("<d").unpack_from
_BE_I32 = struct.Struct(">i").unpack_from
_DECIMAL_BYTES = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)
_utcfromtimestamp = dt.datetime.utcfromtimestamp


def table_id_of(data: bytes) -> int:
    """The 6-byte table id that starts the post-header of table-map and rows events."""
    return int.from_bytes(data[HEADER_END : HEADER_END + 6], "little")


def _packed_int(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFC:
        return int.from_bytes(data[pos + 1 : pos + 3], "little"), pos + 3
    if first == 0xFD:
        return int.from_bytes(data[pos + 1 : pos + 4], "little"), pos + 4
    return int.from_bytes(data[pos + 1 : pos + 9], "little"), pos + 9


# -- column readers: (packet, offset) -> (library value, next offset) --------------------------


def _fixed(unpack: Callable[[bytes, int], tuple[Any, ...]], size: int) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        return unpack(data, pos)[0], pos + size

    return read


def _int24(signed: bool) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        return int.from_bytes(data[pos : pos + 3], "little", signed=signed), pos + 3

    return read


def _be_int(data: bytes, pos: int, size: int) -> int:
    # The library's read_int_be_by_size: big-endian and signed.
    return int.from_bytes(data[pos : pos + size], "big", signed=True)


def _fsp_reader(fsp: int) -> tuple[int, Callable[[bytes, int], int]]:
    """Bytes of the fractional part and how to read it into microseconds, as the library does."""
    size = (fsp + 1) // 2
    if size == 0:
        return 0, lambda _data, _pos: 0
    scale: int = 10 ** (6 - fsp)
    odd = fsp % 2 == 1

    def micros(data: bytes, pos: int) -> int:
        value = _be_int(data, pos, size)
        if odd:
            value = int(value / 10)
        return value * scale

    return size, micros


def _string(length_bytes: int) -> Reader:
    # Text is handed on as latin-1 (every byte one code point), as the plan's converters expect.
    if length_bytes == 1:

        def read1(data: bytes, pos: int) -> tuple[Any, int]:
            end = pos + 1 + data[pos]
            return data[pos + 1 : end].decode("latin-1"), end

        return read1

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        start = pos + length_bytes
        end = start + int.from_bytes(data[pos:start], "little")
        return data[start:end].decode("latin-1"), end

    return read


def _raw(length_bytes: int) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        start = pos + length_bytes
        end = start + int.from_bytes(data[pos:start], "little")
        return data[start:end], end

    return read


def _json(length_bytes: int) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        start = pos + length_bytes
        end = start + int.from_bytes(data[pos:start], "little")
        if end == start:
            return None, end
        return parse_json(data[start], data[start + 1 : end]), end

    return read


def _decimal_layout(precision: int, decimals: int) -> tuple[int, int, int, int, int, int]:
    """(bytes in all, leading group bytes and digits, full groups, trailing bytes and digits)."""
    uncomp_integral, comp_integral = divmod(precision - decimals, 9)
    uncomp_fractional, comp_fractional = divmod(decimals, 9)
    int_size = _DECIMAL_BYTES[comp_integral]
    frac_size = _DECIMAL_BYTES[comp_fractional]
    full_groups = uncomp_integral + uncomp_fractional
    total = int_size + 4 * full_groups + frac_size
    return total, int_size, comp_integral, full_groups, frac_size, comp_fractional


def _new_decimal(precision: int, decimals: int) -> Reader:
    total, int_size, comp_integral, full_groups, frac_size, comp_fractional = _decimal_layout(
        precision, decimals
    )
    sign_bit = 1 << (8 * total - 1)
    all_ones = (1 << (8 * total)) - 1
    # The value is a row of base-10**9 groups (the outer ones shorter), each stored big-endian
    # in its own bytes: (bit offset from the right, bytes -> digits) for each group, left first.
    groups: list[tuple[int, int, int]] = []
    shift = 8 * total
    for size, digits in (
        [(int_size, comp_integral)] * bool(int_size)
        + [(4, 9)] * full_groups
        + [(frac_size, comp_fractional)] * bool(frac_size)
    ):
        shift -= 8 * size
        groups.append((shift, (1 << (8 * size)) - 1, 10**digits))
    exponent = f"E-{decimals}" if decimals else ""

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        # The sign is the top bit, flipped; negative values are stored inverted as a whole.
        raw = int.from_bytes(data[pos : pos + total], "big") ^ sign_bit
        negative = raw & sign_bit
        if negative:
            raw ^= all_ones
        value = 0
        for group_shift, mask, scale in groups:
            value = value * scale + ((raw >> group_shift) & mask)
        # The exponent keeps the column's scale: 1.50 stays 1.50, as the library gives it.
        return Decimal(f"{'-' if negative else ''}{value}{exponent}"), pos + total

    return read


def _datetime2(fsp: int) -> Reader:
    frac_size, micros = _fsp_reader(fsp)

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        packed = int.from_bytes(data[pos : pos + 5], "big")
        year_month = (packed >> 22) & 0x1FFFF
        micro = micros(data, pos + 5) if frac_size else 0
        if micro > 999999:
            raise ValueError(f"microsecond {micro} out of range")  # as datetime.replace would
        try:
            value = dt.datetime(
                year_month // 13,
                year_month % 13,
                (packed >> 17) & 0x1F,
                (packed >> 12) & 0x1F,
                (packed >> 6) & 0x3F,
                packed & 0x3F,
                micro if micro > 0 else 0,
            )
        except ValueError:
            return None, pos + 5 + frac_size
        return value, pos + 5 + frac_size

    return read


def _timestamp2(fsp: int) -> Reader:
    frac_size, micros = _fsp_reader(fsp)

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        value = _utcfromtimestamp(_BE_I32(data, pos)[0])
        if frac_size:
            micro = micros(data, pos + 4)
            if micro > 0:
                value = value.replace(microsecond=micro)
        return value, pos + 4 + frac_size

    return read


def _time2(fsp: int) -> Reader:
    frac_size, micros = _fsp_reader(fsp)

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        packed = _be_int(data, pos, 3)
        sign = 1 if (packed >> 23) & 1 else -1
        if sign == -1:
            packed = ~packed + 1
        value = dt.timedelta(
            hours=(packed >> 12) & 0x3FF,
            minutes=(packed >> 6) & 0x3F,
            seconds=packed & 0x3F,
            microseconds=micros(data, pos + 3),
        )
        return value * sign, pos + 3 + frac_size

    return read


def _date(data: bytes, pos: int) -> tuple[Any, int]:
    packed = int.from_bytes(data[pos : pos + 3], "little")
    year, month, day = packed >> 9, (packed >> 5) & 0xF, packed & 0x1F
    if not (year and month and day):
        return None, pos + 3
    return dt.date(year, month, day), pos + 3


def _time(data: bytes, pos: int) -> tuple[Any, int]:
    packed = int.from_bytes(data[pos : pos + 3], "little")
    value = dt.timedelta(
        hours=int(packed / 10000), minutes=int((packed % 10000) / 100), seconds=int(packed % 100)
    )
    return value, pos + 3


def _datetime(data: bytes, pos: int) -> tuple[Any, int]:
    packed = _U64(data, pos)[0]
    date, time = packed // 1000000, packed % 1000000
    year, month, day = date // 10000, (date % 10000) // 100, date % 100
    if not (year and month and day):
        return None, pos + 8
    value = dt.datetime(year, month, day, time // 10000, (time % 10000) // 100, time % 100)
    return value, pos + 8


def _timestamp(data: bytes, pos: int) -> tuple[Any, int]:
    return _utcfromtimestamp(_U32(data, pos)[0]), pos + 4


def _year(data: bytes, pos: int) -> tuple[Any, int]:
    return data[pos] + 1900, pos + 1


def _enum(size: int, values: Sequence[str] | None) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        index = int.from_bytes(data[pos : pos + size], "little")
        return (values[index] if values else None), pos + size

    return read


def _set(size: int, values: Sequence[str] | None) -> Reader:
    # The library gives a set (None when empty) and the plan sorts it ([] when empty): the
    # sorted list straight away.
    members = list(values or ())

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        mask = int.from_bytes(data[pos : pos + size], "little")
        return sorted(v for i, v in enumerate(members) if mask >> i & 1), pos + size

    return read


def _bit(bits: int, size: int) -> Reader:
    # The library's string of '0'/'1', which the plan turns into an int, is the big-endian
    # number cut to the column's width.
    mask = (1 << bits) - 1

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        return format(int.from_bytes(data[pos : pos + size], "big") & mask, f"0{bits}b"), pos + size

    return read


_FIXED_WIDTH: dict[int, tuple[int, Callable[[bytes, int], tuple[Any, ...]], Any]] = {
    FIELD_TYPE.TINY: (1, _I8, _U8),
    FIELD_TYPE.SHORT: (2, _I16, _U16),
    FIELD_TYPE.LONG: (4, _I32, _U32),
    FIELD_TYPE.LONGLONG: (8, _I64, _U64),
    FIELD_TYPE.FLOAT: (4, _F32, _F32),
    FIELD_TYPE.DOUBLE: (8, _F64, _F64),
}
_PLAIN: dict[int, Reader] = {
    FIELD_TYPE.DATE: _date,
    FIELD_TYPE.DATETIME: _datetime,
    FIELD_TYPE.TIME: _time,
    FIELD_TYPE.TIMESTAMP: _timestamp,
    FIELD_TYPE.YEAR: _year,
}
_WITH_FSP: dict[int, Callable[[int], Reader]] = {
    FIELD_TYPE.DATETIME2: _datetime2,
    FIELD_TYPE.TIMESTAMP2: _timestamp2,
    FIELD_TYPE.TIME2: _time2,
}
_LENGTH_PREFIXED: dict[int, Callable[[int], Reader]] = {
    FIELD_TYPE.JSON: _json,
    FIELD_TYPE.GEOMETRY: _raw,
}


def _reader(column: Any) -> Reader | None:
    """The reader for one library column definition, or None for a type we leave to the library."""
    ctype = column.type
    fixed = _FIXED_WIDTH.get(ctype)
    if fixed is not None:
        size, signed, unsigned = fixed
        return _fixed(unsigned if column.unsigned else signed, size)
    if ctype in _PLAIN:
        return _PLAIN[ctype]
    if ctype in _WITH_FSP:
        return _WITH_FSP[ctype](column.fsp)
    if ctype in _LENGTH_PREFIXED:
        return _LENGTH_PREFIXED[ctype](column.length_size)
    if ctype in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING, FIELD_TYPE.BLOB):
        if column.character_set_name != "latin-1":
            return None  # the plan did not take over this column's text decoding
        return _string(_text_prefix(column))
    if ctype == FIELD_TYPE.INT24:
        return _int24(not column.unsigned)
    if ctype == FIELD_TYPE.NEWDECIMAL:
        return _new_decimal(column.precision, column.decimals)
    if ctype == FIELD_TYPE.ENUM:
        return _enum(column.size, column.enum_values)
    if ctype == FIELD_TYPE.SET:
        return _set(column.size, column.set_values)
    if ctype == FIELD_TYPE.BIT:
        return _bit(column.bits, column.bytes)
    return None


_PLAIN_WIDTH: dict[int, int] = {
    FIELD_TYPE.DATE: 3,
    FIELD_TYPE.DATETIME: 8,
    FIELD_TYPE.TIME: 3,
    FIELD_TYPE.TIMESTAMP: 4,
    FIELD_TYPE.YEAR: 1,
    FIELD_TYPE.INT24: 3,
}
_FSP_BASE_WIDTH: dict[int, int] = {
    FIELD_TYPE.DATETIME2: 5,
    FIELD_TYPE.TIMESTAMP2: 4,
    FIELD_TYPE.TIME2: 3,
}


def _width(column: Any) -> int | None:
    """The bytes a non-NULL value of the column always takes, or None if it varies."""
    ctype = column.type
    if ctype in _FIXED_WIDTH:
        return int(_FIXED_WIDTH[ctype][0])
    if ctype in _PLAIN_WIDTH:
        return _PLAIN_WIDTH[ctype]
    if ctype in _FSP_BASE_WIDTH:
        return _FSP_BASE_WIDTH[ctype] + (int(column.fsp) + 1) // 2
    if ctype == FIELD_TYPE.NEWDECIMAL:
        return _decimal_layout(column.precision, column.decimals)[0]
    if ctype in (FIELD_TYPE.ENUM, FIELD_TYPE.SET):
        return int(column.size)
    if ctype == FIELD_TYPE.BIT:
        return int(column.bytes)
    return None


def _text_prefix(column: Any) -> int:
    """Bytes of the length prefix of a CHAR, VARCHAR or BLOB/TEXT value."""
    if column.type == FIELD_TYPE.BLOB:
        return int(column.length_size)
    return 2 if column.max_length > 255 else 1


def _length_bytes(column: Any) -> int | None:
    """The size of the length prefix of a variable-length column, None for any other."""
    ctype = column.type
    if ctype in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING, FIELD_TYPE.BLOB):
        return _text_prefix(column)
    if ctype in _LENGTH_PREFIXED:
        return int(column.length_size)
    return None


def _skip_source(index: int, column: Any) -> list[str]:
    """Statements that move ``pos`` past column ``index`` without building its value."""
    width = _width(column)
    if width is not None:
        return [f"pos += {width}"]
    prefix = _length_bytes(column)
    if prefix == 1:
        return ["pos += data[pos] + 1"]
    if prefix == 2:
        return ["pos += (data[pos] | data[pos + 1] << 8) + 2"]
    if prefix is not None:
        return [f"pos += from_bytes(data[pos : pos + {prefix}], 'little') + {prefix}"]
    return [f"_, pos = R{index}(data, pos)"]


def _column_source(index: int, column: Any, namespace: dict[str, Any]) -> list[str]:
    """Statements that read column ``index`` into ``v<index>`` and move ``pos`` past it."""
    var = f"v{index}"
    fixed = _FIXED_WIDTH.get(column.type)
    if fixed is not None:
        size, signed, unsigned = fixed
        namespace[f"U{index}"] = unsigned if column.unsigned else signed
        return [f"{var} = U{index}(data, pos)[0]", f"pos += {size}"]
    if column.type in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING) and _text_prefix(column) == 1:
        return [
            "n = data[pos] + 1",
            f"{var} = data[pos + 1 : pos + n].decode('latin-1')",
            "pos += n",
        ]
    if column.type == FIELD_TYPE.VARCHAR:
        return [
            "n = (data[pos] | data[pos + 1] << 8) + 2",
            f"{var} = data[pos + 2 : pos + n].decode('latin-1')",
            "pos += n",
        ]
    return [f"{var}, pos = R{index}(data, pos)"]


RowsReader = Callable[[bytes, int, int], tuple[list[tuple[Image | None, Image | None]], int]]


def _image_source(
    columns: Sequence[tuple[str, Any, Reader, Convert | None]],
    keep: frozenset[str] | None,
    namespace: dict[str, Any],
    target: str,
) -> list[str]:
    """Statements that read one row image at ``pos`` into the dict ``target``, moving ``pos``.

    Names and readers reach the code only through its namespace (``K<i>``, ``R<i>``, ``C<i>``),
    never as text, so no column name can change what the code does. Columns outside ``keep``
    (when given) are stepped over: no value is built for them and the image leaves them out.
    """
    null_bytes = (len(columns) + 7) // 8
    if null_bytes == 1:
        lines = ["nulls = data[pos]", "pos += 1"]
    else:
        lines = [f"nulls = from_bytes(data[pos : pos + {null_bytes}], 'little')"]
        lines.append(f"pos += {null_bytes}")
    kept: list[int] = []
    for index, (name, column, reader, convert) in enumerate(columns):
        namespace[f"R{index}"] = reader
        if keep is not None and name not in keep:
            lines.append(f"if not nulls & {1 << index}:")
            lines.extend(f"    {line}" for line in _skip_source(index, column))
            continue
        kept.append(index)
        namespace[f"K{index}"] = name
        lines.append(f"if nulls & {1 << index}:")
        lines.append(f"    v{index} = None")
        lines.append("else:")
        lines.extend(f"    {line}" for line in _column_source(index, column, namespace))
        if convert is not None:
            namespace[f"C{index}"] = convert
            lines.append(f"    if v{index} is not None:")
            lines.append(f"        v{index} = C{index}(v{index})")
    items = ", ".join(f"K{i}: v{i}" for i in kept)
    lines.append(f"{target} = {{{items}}}")
    return lines


def _compile_rows(
    columns: Sequence[tuple[str, Any, Reader, Convert | None]],
    images: Mapping[str, frozenset[str] | None],
) -> RowsReader:
    """One straight-line loop that reads every row of a rows event: ``images`` names the images
    each row has (``before``, ``after`` or both) with the columns each keeps (None: all), and
    the rows come out as (before, after).

    Generated once per table map and event kind: a loop over per-column reader objects, or even
    one call per image, costs a call, a tuple and a branch each, which at tens of thousands of
    rows a second is most of the decoding time.
    """
    namespace: dict[str, Any] = {"from_bytes": int.from_bytes}
    lines = ["def rows(data, pos, end):", "    out = []", "    append = out.append"]
    lines.append("    while pos < end:")
    for target, keep in images.items():
        lines.extend(f"        {line}" for line in _image_source(columns, keep, namespace, target))
    before = "before" if "before" in images else "None"
    after = "after" if "after" in images else "None"
    lines.append(f"        append(({before}, {after}))")
    lines.append("    return out, pos")
    exec(compile("\n".join(lines), "<cache-worker row image>", "exec"), namespace)
    rows: RowsReader = namespace["rows"]
    return rows


class TableDecoder:
    """Decodes the full row images of one table map; built once, used for every rows event."""

    __slots__ = ("_deletes", "_full", "_inserts", "_ncols", "_updates")

    def __init__(
        self,
        columns: Sequence[tuple[str, Any, Reader, Convert | None]],
        keep: frozenset[str] | None = None,
        keep_old: frozenset[str] | None = None,
    ) -> None:
        self._ncols = len(columns)
        self._full = b"\xff" * (self._ncols // 8) + (
            bytes([(1 << (self._ncols % 8)) - 1]) if self._ncols % 8 else b""
        )
        # Old images carry only what the rules read from them (keys, when, watch): an UPDATE of
        # a refreshed table decodes one whole row, not two.
        self._updates = _compile_rows(columns, {"before": keep_old, "after": keep})
        self._inserts = _compile_rows(columns, {"after": keep})
        self._deletes = _compile_rows(columns, {"before": keep_old})

    def decode(
        self, data: bytes, event_type: int, end: int
    ) -> list[tuple[Image | None, Image | None]] | None:
        """(before, after) images of every row in a rows event; None when not full images."""
        pos = HEADER_END + 8  # table id (6) and flags (2)
        if event_type in ROWS_V2:
            pos += _U16(data, pos)[0]  # the extra data's length counts its own two bytes
        ncols, pos = _packed_int(data, pos)
        if ncols != self._ncols:
            return None
        width = len(self._full)
        full = self._full
        if data[pos : pos + width] != full:
            return None
        pos += width
        update = event_type in UPDATE_EVENTS
        if update:
            if data[pos : pos + width] != full:
                return None
            pos += width
        if update:
            rows, pos = self._updates(data, pos, end)
        elif event_type in INSERT_EVENTS:
            rows, pos = self._inserts(data, pos, end)
        else:
            rows, pos = self._deletes(data, pos, end)
        if pos != end:
            raise ValueError(f"row images overran the event by {pos - end} bytes")
        return rows


def compile_table(
    columns: Sequence[Any],
    converters: Sequence[tuple[str, Convert]],
    set_columns: Sequence[str],
    keep: frozenset[str] | None = None,
    keep_old: frozenset[str] | None = None,
) -> TableDecoder | None:
    """A decoder for the library's (plan-patched) columns, or None if one is not ours to read.

    ``converters`` and ``set_columns`` are the plan's: the converters apply on top of the
    library's value, exactly as ``_Plan.convert`` does; SET columns come out of their reader
    already as the plan's sorted list. ``keep`` names the only columns the images carry (the
    rules need no others); a column outside it only has to be one we can step over.
    ``keep_old`` does the same for the old images of updates and deletes (None: as ``keep``).
    """
    by_name = dict(converters)
    sets = set(set_columns)
    names = {column.name for column in columns}
    if keep is not None and not keep <= names:
        # A rule's column the map does not name (no column names in the binlog, or a column
        # dropped since the rules were checked): decode it all and let the rules say what is
        # missing, rather than hand them images without it.
        keep = None
    if keep_old is None or not keep_old <= names:
        keep_old = keep
    compiled: list[tuple[str, Any, Reader, Convert | None]] = []
    for index, column in enumerate(columns):
        name = column.name or f"UNKNOWN_COL{index}"
        reader = _reader(column)
        if reader is None:
            if keep is None or name in keep or not _skippable(column):
                return None
            if keep_old is None or name in keep_old:
                return None
            reader = _unreadable
        compiled.append((name, column, reader, None if name in sets else by_name.get(name)))
    if len({entry[0] for entry in compiled}) != len(compiled):
        return None  # duplicate names: the library's dict semantics decide, leave it to them
    return TableDecoder(compiled, keep, keep_old)


def _skippable(column: Any) -> bool:
    return _width(column) is not None or _length_bytes(column) is not None


def _unreadable(data: bytes, pos: int) -> tuple[Any, int]:
    # Stands in for a column that is only ever stepped over; never called.
    raise AssertionError("a skipped column was read")
