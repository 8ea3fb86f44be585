"""Unit tests of value encoding: exact decimals, ISO times, base64 binary, JSON, NULL."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

from worker.encoding import encode_hash, encode_json, format_timedelta, scalar_text


def test_json_encoding_is_faithful():
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


def test_non_finite_floats_become_strings():
    assert json.loads(encode_json({"a": float("nan"), "b": [float("inf")]})) == {
        "a": "NaN",
        "b": ["Infinity"],
    }


def test_timedelta_formats():
    assert format_timedelta(dt.timedelta(hours=25, seconds=1, microseconds=5)) == "25:00:01.000005"
    assert format_timedelta(dt.timedelta(0)) == "00:00:00"


def test_hash_encoding_omits_nulls_and_stringifies():
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


def test_scalar_text_for_keys():
    assert scalar_text(42) == "42"
    assert scalar_text("ä b") == "ä b"
    assert scalar_text(dt.date(2020, 1, 1)) == "2020-01-01"
    assert scalar_text(Decimal("3.50")) == "3.50"
