"""Unit tests of value encoding: exact decimals, ISO times, base64 binary, JSON, NULL."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from worker import encoding
from worker.encoding import encode_hash, encode_json, format_timedelta, scalar_text


def test_json_encoding_is_faithful() -> None:
    row = {
        "price": Decimal("12345678901234567890.123456"),
        "at": dt.datetime(2024, 1, 2, 3, 4, 5, 600000),
        "at_utc": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "day": dt.date(2024, 2, 29),
        "clock": dt.timedelta(hours=-838, minutes=-59, seconds=-59),
        "t": dt.time(13, 14, 15),
        "raw": b"\x00\xff\xfe",
        "doc": {"a": [1, {"b": None}], "é": "😀"},
        "tags": {"b", "a"},
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "nothing": None,
        "name": "Zoë 😀",
        "big": 18446744073709551615,
        "ratio": 0.1,
    }
    decoded = json.loads(encode_json(row))
    assert decoded == {
        "price": "12345678901234567890.123456",
        "at": "2024-01-02T03:04:05.600000",
        "at_utc": "2024-01-02T03:04:05+00:00",
        "day": "2024-02-29",
        "clock": "-838:59:59",
        "t": "13:14:15",
        "raw": "AP/+",
        "doc": {"a": [1, {"b": None}], "é": "😀"},
        "tags": ["a", "b"],
        "id": "12345678-1234-5678-1234-567812345678",
        "nothing": None,
        "name": "Zoë 😀",
        "big": 18446744073709551615,
        "ratio": 0.1,
    }
    assert "😀" in encode_json({"x": "😀"})  # UTF-8 kept, not \u-escaped


def test_non_finite_floats_become_strings() -> None:
    assert json.loads(encode_json({"a": float("nan"), "b": [float("inf")]})) == {
        "a": "NaN",
        "b": ["Infinity"],
    }


def test_timedelta_formats() -> None:
    assert format_timedelta(dt.timedelta(hours=25, seconds=1, microseconds=5)) == "25:00:01.000005"
    assert format_timedelta(dt.timedelta(0)) == "00:00:00"


def test_hash_encoding_omits_nulls_and_stringifies() -> None:
    pairs = dict(
        encode_hash(
            {
                "id": 1,
                "ok": True,
                "n": None,
                "d": Decimal("1.10"),
                "j": {"k": 1},
                "b": b"\x01",
                "s": "x",
            }
        )
    )
    assert pairs == {"id": "1", "ok": "true", "d": "1.10", "j": '{"k":1}', "b": "AQ==", "s": "x"}


def test_scalar_text_for_keys() -> None:
    assert scalar_text(42) == "42"
    assert scalar_text("ä b") == "ä b"
    assert scalar_text(dt.date(2020, 1, 1)) == "2020-01-01"
    assert scalar_text(Decimal("3.50")) == "3.50"


def _standard(row: dict[str, Any]) -> str:
    return json.dumps(
        row, default=encoding._json_default, ensure_ascii=False, separators=(",", ":")
    )


def test_json_text_is_the_standard_encoders_whichever_encoder_writes_it() -> None:
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30, seconds=15))
    rows: list[dict[str, Any]] = [
        {"id": 1, "name": 'é\u2028\x00"\\', "n": None, "ok": True, "big": 2**64 - 1},
        {"at": dt.datetime(1800, 1, 1, 0, 0, 0, 1, tzinfo=tz), "t": dt.time(1, 2, 3, 5)},
        {"d": dt.date(9999, 12, 31), "u": uuid.UUID(int=7), "dec": Decimal("-0.000")},
        # Naive and UTC datetimes are orjson's own; a zone's historical offset is not.
        {
            "utc": dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC),
            "naive": dt.datetime(1, 1, 1),
        },
        {"paris": dt.datetime(1800, 1, 1, tzinfo=ZoneInfo("Europe/Paris")), "n": 1},
        {"doc": {"a": [1, {"b": "c"}], "z": None}, "tags": ["x", "y"], "bin": b"\x00\xff"},
        {"set": frozenset({"b", "a"}), "clock": dt.timedelta(seconds=-1)},
        {"huge": 2**70, "tiny": -(2**63)},  # over 64 bits: the standard encoder writes it
        {"f": 1e16, "g": 0.1, "h": -0.0},  # floats: spelled as Python spells them
    ]
    for row in rows:
        assert encode_json(row) == _standard(row)
    # The same columns in another order stay in that order.
    assert encode_json({"b": 1, "a": 2}) == '{"b":1,"a":2}'


def test_json_refusals_name_the_value_whichever_encoder_tried_first() -> None:
    with pytest.raises(TypeError, match="cannot encode a value of type object"):
        encode_json({"x": object()})
    # A lone surrogate cannot be UTF-8: the standard encoder still writes the text (the sink
    # then refuses that one payload), as it always did.
    assert encode_json({"s": "\ud800"}) == '{"s":"\ud800"}'
    assert encode_json({"nan": float("nan")}) == '{"nan":"NaN"}'
