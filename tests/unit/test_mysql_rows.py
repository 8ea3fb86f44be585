"""Unit tests of ``connectors.mysql_rows``: pymysql SELECT values -> the binlog source's values.

Each case pairs what pymysql returns for a column (as MariaDB 10.11 sends it) with what
``connectors.mysql`` makes of the same value in the binlog; the integration test proves the pairs
on a real server, these pin the conversions without one.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from connectors.mysql_rows import _Column


def column(data_type: str, column_type: str = "", is_json: bool = False) -> _Column:
    return _Column("c", data_type, column_type or data_type, is_json)


def convert(col: _Column, value: Any) -> Any:
    fn = col.convert()
    return value if fn is None or value is None else fn(value)


@pytest.mark.parametrize(
    ("data_type", "selected", "binlog"),
    [
        ("bit", b"\x00\x05", 5),
        ("bit", b"\x03\xff", 1023),
        ("set", "a,b", ["a", "b"]),
        ("set", "", []),
        ("set", {"b", "a"}, ["a", "b"]),
        (
            "timestamp",
            dt.datetime(2024, 2, 29, 12, 0),
            dt.datetime(2024, 2, 29, 12, 0, tzinfo=dt.UTC),
        ),
        ("timestamp", "0000-00-00 00:00:00", None),
        ("datetime", "0000-00-00 00:00:00", None),
        ("date", "2024-01-00", None),
        ("date", dt.date(2024, 1, 2), dt.date(2024, 1, 2)),
        ("year", 0, None),
        ("year", 2024, 2024),
        # MariaDB prints 3.14159 for a FLOAT; the reader selects CAST(c AS DOUBLE) instead.
        ("float", 3.1415927410125732, 3.1415927),
        ("float", 16777216.0, 16777216.0),
        ("float", 0.10000000149011612, 0.1),
        ("json", '{"a": 1.50, "b": [true]}', {"a": 1.5, "b": [True]}),
        ("json", b"[1]", [1]),
        ("varchar", "Zoë 😀", "Zoë 😀"),
        ("decimal", None, None),
    ],
)
def test_select_values_become_binlog_values(data_type: str, selected: Any, binlog: Any) -> None:
    assert convert(column(data_type), selected) == binlog


def test_mariadb_json_is_longtext_parsed_and_kept_as_text_when_invalid() -> None:
    col = column("longtext", is_json=True)
    assert convert(col, '{"x": 1}') == {"x": 1}
    assert convert(col, "not json") == "not json"
    assert convert(column("longtext"), '{"x": 1}') == '{"x": 1}'


def test_float_columns_are_selected_as_double() -> None:
    assert column("float").select_sql() == "CAST(`c` AS DOUBLE) AS `c`"
    assert _Column("a`b", "int", "int", False).select_sql() == "`a``b`"


def test_key_values_become_parameters_that_compare_like_the_column() -> None:
    aware = dt.datetime(2024, 2, 29, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert column("timestamp").param(aware) == dt.datetime(2024, 2, 29, 12, 0)
    mood = column("enum", "enum('sad','ok')")
    assert mood.param("ok") == 2 and mood.param("") == 0
    assert column("set").param(["a", "b"]) == "a,b"
    assert column("int").param(7) == 7
