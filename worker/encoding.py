"""How row values become cache payloads and key parts: faithful, language-neutral encodings.

One table of rules for every source, so a web tier in any language decodes what it reads:
DECIMAL as an exact decimal string, DATETIME/DATE/TIME as ISO 8601, JSON columns as JSON,
binary as base64, NULL as JSON ``null`` (in a hash: the field is absent), sets as sorted lists.
The functions here are on the hot path: JSON is written by orjson where it gives the very text
the standard library's encoder would, and by the standard encoder otherwise.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson


def format_timedelta(value: dt.timedelta) -> str:
    """A MySQL TIME as ``[-]HH:MM:SS[.ffffff]``; hours may exceed 24 as MySQL allows."""
    sign = "-" if value < dt.timedelta(0) else ""
    value = abs(value)
    total_seconds = value.days * 86400 + value.seconds
    hours, rest = divmod(total_seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{sign}{hours:02d}:{minutes:02d}:{seconds:02d}"
    if value.microseconds:
        text += f".{value.microseconds:06d}"
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # A string keeps every digit; a JSON number would be rounded by most parsers.
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return format_timedelta(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot encode a value of type {type(value).__name__}")


def _replace_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _replace_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_non_finite(v) for v in value]
    return value


_encoder = json.JSONEncoder(
    default=_json_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False
)
# orjson writes the same compact text several times faster than the standard encoder (whose
# per-call setup alone costs more than a small row). It spells naive and UTC datetimes and
# dates exactly as isoformat() does, several times faster; other time zones (offsets with
# seconds, historical zone offsets) and times it spells differently, so a row holding one has
# its datetimes and times passed through to ``_json_default``.
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME
_UTC = dt.UTC
_NATIVE_KINDS = frozenset({str, int, bool, type(None), Decimal, dt.date, dict, list})


def encode_json(row: Mapping[str, Any]) -> str:
    """The row as compact JSON text (UTF-8 characters kept, not escaped).

    A row with a float column, or anything orjson refuses (an integer over 64 bits, text that
    is not valid UTF-8, a non-text key), takes the standard encoder: it spells floats as
    Python does and says which value it cannot encode. orjson would write NaN as null.
    """
    if type(row) is dict:
        option = 0
        for value in row.values():
            kind = type(value)
            if kind in _NATIVE_KINDS:
                continue
            if kind is float:
                break
            if kind is not dt.datetime or (value.tzinfo is not None and value.tzinfo is not _UTC):
                option = _PASSTHROUGH
        else:
            try:
                return orjson.dumps(row, default=_json_default, option=option).decode()
            except TypeError:
                pass
    try:
        return _encoder.encode(row)
    except ValueError:
        # NaN and infinities are not JSON; Postgres floats can hold them, so spell them out.
        return _encoder.encode(_replace_non_finite(dict(row)))


def scalar_text(value: Any) -> str:
    """A single non-NULL value as text, for hash fields and key parts."""
    kind = type(value)
    # The two kinds almost every key and hash field is made of, before the general dispatch.
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value)
            if math.isfinite(value)
            else ("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")
        )
    if isinstance(value, dict | list | tuple):
        return encode_json(value) if isinstance(value, dict) else _encoder.encode(list(value))
    encoded = _json_default(value)
    return encoded if isinstance(encoded, str) else _encoder.encode(encoded)


def encode_hash(row: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The row as hash field/value pairs; a NULL column is left out (HGET answers nil)."""
    return tuple((name, scalar_text(value)) for name, value in row.items() if value is not None)
