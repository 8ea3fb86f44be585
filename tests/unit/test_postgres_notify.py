"""Unit tests of the pure parts of ``connectors.postgres_notify``: names, lock keys, SQL text, JSON
values and how outbox rows become transactions and positions (no server needed)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import pytest
from psycopg import sql

from connectors.postgres_common import PostgresOptions
from connectors.postgres_notify import (
    PostgresNotifySource,
    _decode_image,
    _plain_json,
    _StreamState,
    batch_lock_key,
    capture_function_sql,
    describe_position,
    function_name,
    lock_key,
    make_position,
    outbox_sql,
    sleep_lock_key,
    trigger_name,
    trigger_sql,
)
from worker.events import Op, TableRef

T = TableRef("app", "t")
OTHER = TableRef("app", "other")


def options(**kw: Any) -> PostgresOptions:
    settings: dict[str, Any] = {
        "dsn": "postgresql://u:secret@db:5432/app",
        "password": None,
        "tables": (T,),
        "name": "unit",
        **kw,
    }
    return PostgresOptions(**settings)


def text(statement: sql.Composable) -> str:
    return statement.as_string(None)


def test_names_fit_postgres_identifiers_and_stay_distinct() -> None:
    long_schema = "s" * 63
    assert trigger_name("cache_worker", "update") == "cache_worker_update"
    names = {trigger_name(long_schema, op) for op in ("insert", "update", "delete", "truncate")}
    assert len(names) == 4 and all(len(n.encode()) <= 63 for n in names)
    assert function_name(TableRef("a_b", "c")) != function_name(TableRef("a", "b_c"))
    assert len(function_name(TableRef("x" * 63, "y" * 63)).encode()) <= 63
    assert len(function_name(TableRef("é" * 40, "ü" * 40)).encode()) <= 63


def test_lock_keys_are_stable_distinct_signed_64_bit() -> None:
    keys = [f("cache_worker") for f in (lock_key, batch_lock_key, sleep_lock_key)]
    assert len(set(keys)) == 3
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert lock_key("cache_worker") == keys[0]
    assert lock_key("other") != keys[0]


def test_setup_sql_quotes_identifiers_and_captures_each_row() -> None:
    opts = options(schema_name="cw", channel="chan")
    table = TableRef("My Schema", 'we"ird')
    created = text(outbox_sql(opts)[1])
    assert 'CREATE TABLE IF NOT EXISTS "cw"."outbox"' in created
    assert "xid8 NOT NULL DEFAULT pg_current_xact_id()" in created
    assert "old json," in created and "new json," in created
    function = text(capture_function_sql(opts, table))
    assert 'INSERT INTO "cw"."outbox"' in function
    assert "pg_catalog.row_to_json(OLD), pg_catalog.row_to_json(NEW)" in function
    assert 'pg_catalog.row_to_json(n.*) FROM "cache_worker_new" AS n' in function
    assert 'pg_catalog.row_to_json(o.*) FROM "cache_worker_old" AS o' in function
    assert "'My Schema', 'we\"ird'" in function
    assert "pg_notify('chan', '')" in function
    assert "pg_try_advisory_xact_lock_shared(" in function
    assert str(sleep_lock_key("cw")) in function
    assert "SECURITY DEFINER" in function
    triggers = [text(s) for s in trigger_sql(opts, table)]
    # Whatever an older version created is dropped first.
    drops = [s for s in triggers if s.startswith("DROP TRIGGER IF EXISTS")]
    assert {s.split()[4] for s in drops} == {
        '"cw_insert"',
        '"cw_update"',
        '"cw_delete"',
        '"cw_truncate"',
        '"cw_row"',
    }
    assert all(s.endswith(' ON "My Schema"."we""ird"') for s in drops)
    created_triggers = [s.split(' ON "My Schema"."we""ird"')[1] for s in triggers[len(drops) :]]
    function_name_sql = text(sql.Identifier("cw", function_name(table))) + "()"
    assert created_triggers == [
        f" REFERENCING NEW TABLE AS cache_worker_new FOR EACH STATEMENT "
        f"EXECUTE FUNCTION {function_name_sql}",
        f" FOR EACH ROW EXECUTE FUNCTION {function_name_sql}",
        f" REFERENCING OLD TABLE AS cache_worker_old FOR EACH STATEMENT "
        f"EXECUTE FUNCTION {function_name_sql}",
        f" FOR EACH STATEMENT EXECUTE FUNCTION {function_name_sql}",
    ]
    events = [s.split()[4:6] for s in triggers[len(drops) :]]
    assert events == [["INSERT", "ON"], ["UPDATE", "ON"], ["DELETE", "ON"], ["TRUNCATE", "ON"]]
    # A partitioned table: one row trigger for all three operations (a row moving to another
    # partition fires only the partitions' row-level DELETE and INSERT triggers).
    partitioned = [text(s) for s in trigger_sql(opts, table, partitioned=True)][len(drops) :]
    assert len(partitioned) == 2
    assert "AFTER INSERT OR UPDATE OR DELETE" in partitioned[0]
    assert "FOR EACH ROW" in partitioned[0] and "REFERENCING" not in partitioned[0]
    assert "AFTER TRUNCATE" in partitioned[1] and "FOR EACH STATEMENT" in partitioned[1]


def test_function_body_resolves_nothing_through_the_search_path() -> None:
    """The function runs as its owner without a pinned search_path, so every function and
    operator it uses must be schema-qualified (and it names no type)."""
    function = text(capture_function_sql(options(), T))
    body = function.split("$cache_worker$")[1]
    operators = re.findall(r"OPERATOR\(([^)]*)\)", body)
    assert operators and all(op.startswith("pg_catalog.") for op in operators)
    body = re.sub(r"OPERATOR\([^)]*\)", " ", body)
    body = re.sub(r"--[^\n]*", "", body)  # comments
    body = body.replace(".*", "")  # whole-row references (n.*), not an operator
    calls = re.findall(r"([\w.]+)\s*\(", body)
    unqualified = [c for c in calls if not c.startswith("pg_catalog.") and c != "VALUES"]
    assert unqualified == [], unqualified
    assert not re.search(r"::|[=<>+*/|]", body)


def test_function_body_gets_a_dollar_tag_it_does_not_contain() -> None:
    table = TableRef("app", "has $cache_worker$ in it")
    function = text(capture_function_sql(options(), table))
    assert "AS $cache_worker_$" in function and function.endswith("$cache_worker_$")


def test_plain_json_gives_json_loads_floats() -> None:
    value = {"a": [Decimal("1.0"), 2, Decimal("2.5")], "b": {"c": Decimal("1E+2")}}
    assert _plain_json(value) == {"a": [1.0, 2, 2.5], "b": {"c": 100.0}}
    assert type(_plain_json(value)["a"][0]) is float


def test_images_decode_with_exact_numbers_and_whitespace_or_bad_json_is_still_handled() -> None:
    image = '{"id":1,"n":12.50,"f":1e2,"s":"x y","j":{"a":[1,2.5]}}'
    assert _decode_image(image) == {
        "id": 1,
        "n": Decimal("12.50"),
        "f": Decimal("1E+2"),
        "s": "x y",
        "j": {"a": [1, Decimal("2.5")]},
    }
    # Images older versions wrote (jsonb text) have spaces inside; surrounding ones too.
    assert _decode_image(' {"id": 1, "s": "a"} ') == {"id": 1, "s": "a"}
    for bad in ('{"id": 1} trailing', '{"id": ', ""):
        with pytest.raises(json.JSONDecodeError):
            _decode_image(bad)


def test_describe_position() -> None:
    assert describe_position(make_position(12, 10)) == "outbox id 10"


class _Rows:
    """Stands in for a session: rows decode to their JSON text as a dict; a text "key:value"
    names its primary key."""

    def row(self, table: TableRef, text: str | None) -> dict[str, Any] | None:
        return None if text is None else {"text": text}

    def rekeyed(self, table: TableRef, before: dict[str, Any], after: dict[str, Any]) -> bool:
        old, new = before["text"], after["text"]
        return ":" in old and old.split(":")[0] != new.split(":")[0]


def _row(outbox_id: int, txid: str, table: TableRef = T, op: str = "insert") -> tuple[Any, ...]:
    new = None if op == "delete" else f"n{outbox_id}"
    old = None if op == "insert" else f"o{outbox_id}"
    return (outbox_id, txid, op, table.schema, table.name, old, new, 1.0 + outbox_id)


def test_rows_group_by_transaction_in_commit_order_with_growing_positions() -> None:
    source = PostgresNotifySource(options(tables=(T,)))
    state = _StreamState(high=0)
    rows = [
        _row(1, "100"),
        _row(2, "200"),
        _row(3, "100", op="update"),
        _row(4, "300", table=OTHER),  # not a rule table: skipped, and no position of its own
        _row(5, "200", op="delete"),
    ]
    txs = source._transactions(_Rows(), rows, state)  # type: ignore[arg-type]
    assert [[c.version for c in tx.changes] for tx in txs] == [[1, 3], [2, 5]]
    assert [c.op for c in txs[0].changes] == [Op.INSERT, Op.UPDATE]
    assert txs[1].changes[1].before == {"text": "o5"} and txs[1].changes[1].after is None
    assert [(tx.position.version, tx.position.coords) for tx in txs if tx.position] == [
        (3, {"id": 3}),
        (5, {"id": 5}),
    ]
    assert txs[1].committed_at == 6.0
    assert state.high == 5


def test_positions_stay_newer_than_the_checkpoint_when_ids_are_lower() -> None:
    """A re-read batch or a late commit carries ids at or below the checkpoint; the run loop
    acks only positions newer than its checkpoint, so versions keep growing past it."""
    source = PostgresNotifySource(options())
    state = _StreamState(high=1000)
    txs = source._transactions(_Rows(), [_row(7, "1"), _row(8, "2")], state)  # type: ignore[arg-type]
    assert [tx.position.version for tx in txs if tx.position] == [1001, 1002]
    assert [tx.position.coords["id"] for tx in txs if tx.position] == [7, 8]
    # Row versions stay the outbox ids: cache writes are ordered by the database, not by us.
    assert [tx.changes[0].version for tx in txs] == [7, 8]


def test_an_update_of_the_primary_key_becomes_a_delete_and_an_insert() -> None:
    """Row triggers see a key change as one UPDATE of the physical row; to a cache it is
    another row, so the old key must go, in the same transaction and with the same version."""
    source = PostgresNotifySource(options())
    state = _StreamState(high=0)
    rows = [
        (1, "10", "update", "app", "t", "k1:a", "k1:b", 1.0),
        (2, "10", "update", "app", "t", "k1:b", "k2:b", 1.0),
    ]
    (tx,) = source._transactions(_Rows(), rows, state)  # type: ignore[arg-type]
    assert [(c.op, c.before, c.after, c.version) for c in tx.changes] == [
        (Op.UPDATE, {"text": "k1:a"}, {"text": "k1:b"}, 1),
        (Op.DELETE, {"text": "k1:b"}, None, 2),
        (Op.INSERT, None, {"text": "k2:b"}, 2),
    ]
