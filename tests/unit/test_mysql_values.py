"""Unit tests of the pure parts of ``connectors.mysql``: positions, GTID state, value conversion
plans and privilege parsing. The streaming behaviour is tested against a real server in
``tests/integration/test_mysql_source.py``.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from pymysqlreplication.constants import FIELD_TYPE

from connectors.mysql import (
    ColumnInfo,
    MySQLOptions,
    MySQLSource,
    _MariaGtids,
    _MySQLGtids,
    build_plan,
    describe_position,
    file_index,
    make_position,
    missing_privileges,
    parse_grants,
    translate_error,
)
from worker.errors import PositionLost, SourceError, SourceMisconfigured, SourceUnavailable
from worker.events import TableRef

T = TableRef("app", "t")


def _column(ctype: int, name: str | None, **attrs: Any) -> SimpleNamespace:
    defaults: dict[str, Any] = {
        "type": ctype,
        "name": name,
        "unsigned": False,
        "character_set_name": None,
        "enum_values": None,
        "set_values": None,
        "max_length": 0,
    }
    return SimpleNamespace(**{**defaults, **attrs})


def test_positions() -> None:
    position = make_position("binlog.000003", 1234, "0-1-55")
    assert position.version == 3 * 2**32 + 1234
    assert describe_position(position) == "binlog.000003:1234 gtid=0-1-55"
    assert describe_position(make_position("mysql-bin.000010", 4, None)) == "mysql-bin.000010:4"
    assert make_position("b.000002", 4, None) > make_position("b.000001", 2**31, None)
    assert file_index("host-bin.123456") == 123456
    with pytest.raises(SourceError):
        file_index("binlog")


def test_mariadb_gtid_state_keeps_one_gtid_per_domain() -> None:
    state = _MariaGtids.parse("0-1-55,1-2-7")
    state.add(0, 3, 56)
    assert state.text() == "0-3-56,1-2-7"
    assert _MariaGtids.parse("").text() is None


def test_mysql_gtid_set_merges_intervals() -> None:
    sid = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
    state = _MySQLGtids.parse(f"{sid.upper()}:1-5:7,\n{'a' * 8}-aaaa-aaaa-aaaa-{'a' * 12}:3")
    state.add_text(f"{sid}:6")
    state.add_text(f"{sid}:8")
    state.add_text(f"{sid}:3")
    assert state.text() == f"{sid}:1-8,{'a' * 8}-aaaa-aaaa-aaaa-{'a' * 12}:3"


def test_plan_converts_values_faithfully() -> None:
    columns = [
        _column(FIELD_TYPE.VARCHAR, "utf", character_set_name="utf8"),
        _column(FIELD_TYPE.VARCHAR, "l1", character_set_name="cp1252"),
        _column(FIELD_TYPE.BLOB, "blob", character_set_name="binary"),
        _column(FIELD_TYPE.STRING, "bin4", character_set_name="binary", max_length=4),
        _column(FIELD_TYPE.FLOAT, "f"),
        _column(FIELD_TYPE.TIMESTAMP2, "ts"),
        _column(FIELD_TYPE.YEAR, "y"),
        _column(FIELD_TYPE.BIT, "bit"),
        _column(FIELD_TYPE.SET, "set"),
        _column(FIELD_TYPE.JSON, "json"),
        _column(FIELD_TYPE.LONG, "n"),
    ]
    warnings: list[str] = []
    plan = build_plan(T, columns, None, True, warnings.append)
    table = SimpleNamespace(columns=columns)
    plan.apply_patches(table)
    # The library is told to decode text as latin-1, i.e. to hand over the raw bytes.
    assert {c.character_set_name for c in columns[:4]} == {"latin-1"}

    raw = "h\u00e9llo \U0001f30d".encode().decode("latin-1")
    values = {
        "utf": raw,
        "l1": b"\x81\xe9\x80".decode("latin-1"),
        "blob": b"\x00\xff".decode("latin-1"),
        "bin4": "a",
        "f": 3.140000104904175,
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5),
        "y": 2024,
        "bit": "101",
        "set": {"b", "a"},
        "json": {b"k": [b"v", 1, None, {b"x": 1.5}]},
        "n": 7,
    }
    assert plan.convert(values, {}) == {
        "utf": "h\u00e9llo \U0001f30d",
        "l1": "\x81\u00e9\u20ac",
        "blob": b"\x00\xff",
        "bin4": b"a\x00\x00\x00",
        "f": 3.14,
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "y": 2024,
        "bit": 5,
        "set": ["a", "b"],
        "json": {"k": ["v", 1, None, {"x": 1.5}]},
        "n": 7,
    }
    zeros = {"ts": dt.datetime(1970, 1, 1), "y": 1900, "set": None, "utf": None}
    assert plan.convert(zeros, {"set": "empty set"}) == {
        "ts": None,
        "y": None,
        "set": [],
        "utf": None,
    }
    assert plan.convert({"set": None}, {"set": "null"}) == {"set": None}
    assert warnings == []


def test_invalid_utf8_is_replaced_and_warned_once_per_column() -> None:
    columns = [_column(FIELD_TYPE.VARCHAR, "v", character_set_name="utf8")]
    source = MySQLSource(
        MySQLOptions(host="h", port=1, user="u", password="pw", server_id=1, tables=(T,))
    )
    plan = build_plan(T, columns, None, True, source._warn_decode)
    bad = b"ok\xff\xfe".decode("latin-1")
    with structlog.testing.capture_logs() as logs:
        first = plan.convert({"v": bad}, {})
        second = plan.convert({"v": bad}, {})
    assert first == second == {"v": "ok\ufffd\ufffd"}
    events = [e for e in logs if e["event"] == "column_text_not_decodable"]
    assert len(events) == 1 and events[0]["column"] == "app.t.v"


def test_plan_without_row_metadata_uses_information_schema() -> None:
    columns = [
        _column(FIELD_TYPE.LONGLONG, None),
        _column(FIELD_TYPE.ENUM, None),
        _column(FIELD_TYPE.SET, None),
        _column(FIELD_TYPE.BLOB, None),
        _column(FIELD_TYPE.VARCHAR, None),
        _column(FIELD_TYPE.BLOB, None),
    ]
    info = [
        ColumnInfo("id", "bigint", "bigint(20) unsigned", None),
        ColumnInfo("e", "enum", "enum('a','it''s')", "utf8mb4"),
        ColumnInfo("s", "set", "set('x','y')", "utf8mb4"),
        ColumnInfo("b", "blob", "blob", None),
        ColumnInfo("l", "varchar", "varchar(5)", "latin1"),
        ColumnInfo("j", "longtext", "longtext", "utf8mb4", is_json=True),
    ]
    plan = build_plan(T, columns, info, False, lambda column: None)
    plan.apply_patches(SimpleNamespace(columns=columns))
    assert [c.name for c in columns] == ["id", "e", "s", "b", "l", "j"]
    assert columns[0].unsigned is True
    assert columns[1].enum_values == ["", "a", "it's"]
    assert columns[2].set_values == ["x", "y"]
    converted = plan.convert(
        {"id": 1, "e": "a", "s": {"y"}, "b": "\xff", "l": "\xe9", "j": '{"a": [1]}'}, {}
    )
    assert converted == {"id": 1, "e": "a", "s": ["y"], "b": b"\xff", "l": "é", "j": {"a": [1]}}


def test_rebuilding_a_plan_on_patched_columns_keeps_their_charset() -> None:
    columns = [_column(FIELD_TYPE.BLOB, "b", character_set_name="binary")]
    build_plan(T, columns, None, True, lambda c: None).apply_patches(
        SimpleNamespace(columns=columns)
    )
    again = build_plan(T, columns, None, True, lambda c: None)
    assert again.convert({"b": "\xff"}, {}) == {"b": b"\xff"}


MARIADB_GRANTS = {
    "root": ["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION"],
    "replica": [
        "GRANT SELECT, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `cw`@`%` "
        "IDENTIFIED BY PASSWORD '*ABC'"
    ],
    "scoped": [
        "GRANT REPLICATION REPLICA, REPLICATION CLIENT ON *.* TO `cw`@`%`",
        "GRANT SELECT ON `app`.* TO `cw`@`%`",
        "GRANT SELECT ON `shop\\_%`.* TO `cw`@`%`",
        "GRANT SELECT ON `billing`.`invoices` TO `cw`@`%`",
        "GRANT SELECT (`id`) ON `billing`.`payments` TO `cw`@`%`",
    ],
    "select_only": [
        "GRANT USAGE ON *.* TO `ro`@`%`",
        "GRANT SELECT ON `app`.* TO `ro`@`%`",
    ],
}


@pytest.mark.parametrize(
    ("who", "tables", "missing"),
    [
        ("root", [T], []),
        ("replica", [T, TableRef("other", "x")], []),
        (
            "scoped",
            [
                T,
                TableRef("shop_eu", "orders"),
                TableRef("billing", "invoices"),
                TableRef("billing", "payments"),
                TableRef("shopXeu", "orders"),
            ],
            ["SELECT on `billing`.*", "SELECT on `shopXeu`.*"],
        ),
        ("select_only", [T], ["REPLICATION SLAVE", "REPLICATION CLIENT"]),
    ],
)
def test_missing_privileges(who: str, tables: list[TableRef], missing: list[str]) -> None:
    grants, roles = parse_grants(MARIADB_GRANTS[who])
    assert roles == []
    assert missing_privileges(grants, tables, mariadb=True) == missing


def test_grants_of_roles_and_mysql_super() -> None:
    grants, roles = parse_grants(
        [
            "GRANT SUPER, REPLICATION SLAVE ON *.* TO `u`@`%`",
            "GRANT `reader`@`%`,`ops` TO `u`@`%`",
        ]
    )
    assert roles == ["`reader`@`%`", "`ops`"]
    assert missing_privileges(grants, [], mariadb=False) == []
    assert missing_privileges(grants, [], mariadb=True) == ["REPLICATION CLIENT"]


def test_error_translation_never_shows_the_password() -> None:
    import pymysql

    options = MySQLOptions(
        host="db", port=3306, user="cw", password="hunter22", server_id=1, tables=(T,)
    )
    lost = translate_error(pymysql.err.OperationalError(1236, "Could not find first log"), options)
    assert isinstance(lost, PositionLost) and "cache-worker reset-checkpoint" in str(lost)
    denied = translate_error(pymysql.err.OperationalError(1045, "Access denied"), options)
    assert isinstance(denied, SourceMisconfigured)
    privilege = translate_error(pymysql.err.OperationalError(1227, "need REPL"), options)
    assert isinstance(privilege, SourceMisconfigured) and "REPLICATION SLAVE" in str(privilege)
    gone = translate_error(pymysql.err.OperationalError(2013, "lost hunter22"), options)
    assert isinstance(gone, SourceUnavailable) and gone.retryable
    assert "hunter22" not in str(gone) and "hunter22" not in repr(options)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("TRUNCATE TABLE t", T),
        ("truncate `app`.`t`", T),
        ("TRUNCATE TABLE app.t", T),
        ("TRUNCATE TABLE other", None),
        ("TRUNCATE TABLE `x`.`t`", None),
    ],
)
def test_truncate_detection(query: str, expected: TableRef | None) -> None:
    source = MySQLSource(
        MySQLOptions(host="h", port=1, user="u", password=None, server_id=1, tables=(T,))
    )
    assert source._truncated(SimpleNamespace(schema=b"app"), query) == expected
