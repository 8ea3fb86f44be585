"""Unit tests of rule semantics: keys, key moves, watch, when, formats, TTL and NULL keys."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, cast

import pytest

from worker.actions import Evict, Refresh
from worker.events import Op, Row, RowChange, TableRef
from worker.rules import KeyTemplate, Rule, RuleSet

USERS = TableRef("shop", "users")
ORDERS = TableRef("shop", "orders")


def change(
    op: Op,
    before: Row | None = None,
    after: Row | None = None,
    version: int = 7,
    table: TableRef = USERS,
) -> RowChange:
    return RowChange(op, table, before, after, version)


def rule(**kw: Any) -> Rule:
    defaults: dict[str, Any] = dict(
        name="r", table=USERS, keys=(KeyTemplate.parse("user:{id}"),), jitter=0.0
    )
    defaults.update(kw)
    return Rule(**defaults)


def test_template_renders_columns_and_literal_braces() -> None:
    t = KeyTemplate.parse("{{tenant:{tenant}}}:user:{id}")
    assert t.columns == ("tenant", "id")
    assert t.render({"tenant": "acme", "id": 42}) == "{tenant:acme}:user:42"


@pytest.mark.parametrize(
    "text",
    [
        "user",
        "user:{}",
        "user:{id.name}",
        "user:{id[0]}",
        "user:{id!r}",
        "user:{id:>5}",
        "user:{id",
    ],
)
def test_bad_templates_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        KeyTemplate.parse(text)


def test_insert_refreshes_with_json_value_ttl_and_version() -> None:
    r = rule(ttl_ms=60_000)
    [action] = r.actions_for(change(Op.INSERT, after={"id": 1, "name": "Ann"}))
    assert isinstance(action, Refresh)
    assert action.key == "user:1"
    # A json-format rule: the value is the JSON text (a hash rule's would be field pairs).
    assert json.loads(cast(str, action.value)) == {"id": 1, "name": "Ann"}
    assert action.ttl_ms == 60_000
    assert action.version == 7


def test_several_key_templates_per_rule() -> None:
    r = rule(keys=(KeyTemplate.parse("user:{id}"), KeyTemplate.parse("user:email:{email}")))
    actions = r.actions_for(change(Op.INSERT, after={"id": 1, "email": "a@x"}))
    assert [a.key for a in actions] == ["user:1", "user:email:a@x"]


def test_update_moving_key_column_evicts_old_and_refreshes_new() -> None:
    r = rule(keys=(KeyTemplate.parse("user:email:{email}"),))
    actions = r.actions_for(
        change(Op.UPDATE, before={"id": 1, "email": "old@x"}, after={"id": 1, "email": "new@x"})
    )
    assert [(type(a).__name__, a.key) for a in actions] == [
        ("Evict", "user:email:old@x"),
        ("Refresh", "user:email:new@x"),
    ]


def test_evict_rule_acts_on_old_and_new_key() -> None:
    r = rule(table=ORDERS, keys=(KeyTemplate.parse("user:{user_id}:orders"),), action="evict")
    actions = r.actions_for(
        change(Op.UPDATE, {"id": 5, "user_id": 1}, {"id": 5, "user_id": 2}, table=ORDERS)
    )
    assert actions == [Evict("user:1:orders", "r", 7), Evict("user:2:orders", "r", 7)]
    same = r.actions_for(
        change(Op.UPDATE, {"id": 5, "user_id": 1}, {"id": 5, "user_id": 1}, table=ORDERS)
    )
    assert same == [Evict("user:1:orders", "r", 7)]


def test_delete_under_refresh_rule_evicts() -> None:
    r = rule()
    assert r.actions_for(change(Op.DELETE, before={"id": 3})) == [Evict("user:3", "r", 7)]


def test_watch_skips_updates_of_unwatched_columns_but_not_key_moves() -> None:
    r = rule(watch=frozenset({"name"}))
    unwatched = change(
        Op.UPDATE, {"id": 1, "name": "a", "seen": 1}, {"id": 1, "name": "a", "seen": 2}
    )
    assert r.actions_for(unwatched) == []
    watched = change(Op.UPDATE, {"id": 1, "name": "a"}, {"id": 1, "name": "b"})
    assert [a.key for a in r.actions_for(watched)] == ["user:1"]
    moved = change(Op.UPDATE, {"id": 1, "name": "a"}, {"id": 2, "name": "a"})
    assert [(type(a).__name__, a.key) for a in r.actions_for(moved)] == [
        ("Evict", "user:1"),
        ("Refresh", "user:2"),
    ]
    # Inserts and deletes are not filtered by watch.
    assert r.actions_for(change(Op.INSERT, after={"id": 9, "name": "z"}))
    assert r.actions_for(change(Op.DELETE, before={"id": 9, "name": "z"}))


def test_when_filter_enters_and_leaves() -> None:
    r = rule(when={"status": "active"})
    assert r.actions_for(change(Op.INSERT, after={"id": 1, "status": "banned"})) == []
    leave = r.actions_for(
        change(Op.UPDATE, {"id": 1, "status": "active"}, {"id": 1, "status": "banned"})
    )
    assert leave == [Evict("user:1", "r", 7)]
    enter = r.actions_for(
        change(Op.UPDATE, {"id": 1, "status": "banned"}, {"id": 1, "status": "active"})
    )
    assert [type(a) for a in enter] == [Refresh]
    neither = r.actions_for(change(Op.UPDATE, {"id": 1, "status": "x"}, {"id": 1, "status": "y"}))
    assert neither == []


def test_when_matches_types_and_lists() -> None:
    r = rule(when={"active": True, "tier": (1, 2), "price": 9.5})
    row = {"id": 1, "active": 1, "tier": 2, "price": Decimal("9.50")}
    assert r.passes(row)
    assert not r.passes({**row, "active": 0})
    assert not r.passes({**row, "tier": 3})
    assert not r.passes({**row, "price": None})


def test_columns_projection_and_hash_format() -> None:
    r = rule(columns=("id", "name", "gone"), format="hash")
    [action] = r.actions_for(
        change(Op.INSERT, after={"id": 1, "name": "Ann", "secret": "x", "bio": None})
    )
    assert isinstance(action, Refresh)
    assert action.value == (("id", "1"), ("name", "Ann"))


def test_null_key_column_skips_that_key_only() -> None:
    r = rule(keys=(KeyTemplate.parse("user:{id}"), KeyTemplate.parse("user:email:{email}")))
    actions = r.actions_for(change(Op.INSERT, after={"id": 1, "email": None}))
    assert [a.key for a in actions] == ["user:1"]


def test_ttl_jitter_only_shortens_within_bound() -> None:
    r = rule(ttl_ms=100_000, jitter=0.2)
    ttls = {r.ttl_for_write() for _ in range(200)}
    assert all(80_000 <= t <= 100_000 for t in ttls)
    assert len(ttls) > 1


def test_ruleset_routes_by_table_and_reports_missing_columns() -> None:
    users = rule(name="u", index=0)
    orders = rule(
        name="o",
        table=ORDERS,
        keys=(KeyTemplate.parse("user:{usr_id}:orders"),),
        action="evict",
        index=1,
    )
    rs = RuleSet([users, orders])
    assert rs.actions_for(change(Op.INSERT, after={"id": 1}, table=TableRef("shop", "other"))) == []
    assert [a.key for a in rs.actions_for(change(Op.INSERT, after={"id": 1}))] == ["user:1"]
    problems = rs.problems_with_columns({USERS: ["id", "name"], ORDERS: ["id", "user_id"]})
    assert problems == [
        "rules[1].keys[0]: template 'user:{usr_id}:orders' names column 'usr_id', "
        "which table shop.orders does not have"
    ]
    assert rs.problems_with_columns({USERS: None, ORDERS: ["usr_id"]}) == [
        "rules[0].table: table shop.users does not exist (rule 'u')"
    ]


def test_truncate_produces_no_actions() -> None:
    rs = RuleSet([rule()])
    assert rs.actions_for(change(Op.TRUNCATE)) == []


def test_empty_rendered_key_is_skipped() -> None:
    r = rule(keys=(KeyTemplate.parse("{code}"), KeyTemplate.parse("user:{id}")))
    assert [a.key for a in r.actions_for(change(Op.INSERT, after={"id": 1, "code": ""}))] == [
        "user:1"
    ]


def test_unchanged_toast_value_taken_from_old_image_or_evicted() -> None:
    from worker.events import UNCHANGED

    r = rule()
    with_old = RowChange(
        Op.UPDATE, USERS, {"id": 1, "bio": "long"}, {"id": 1, "bio": UNCHANGED}, 7, partial=True
    )
    [action] = r.actions_for(with_old)
    # json format, so the value is the JSON text.
    assert isinstance(action, Refresh) and json.loads(cast(str, action.value)) == {
        "id": 1,
        "bio": "long",
    }

    without_old = RowChange(
        Op.UPDATE, USERS, {"id": 1}, {"id": 1, "bio": UNCHANGED}, 7, partial=True
    )
    assert r.actions_for(without_old) == [Evict("user:1", "r", 7)]
    # A projection that does not store the unchanged column still refreshes.
    narrow = rule(columns=("id",))
    [action] = narrow.actions_for(without_old)
    assert isinstance(action, Refresh) and json.loads(cast(str, action.value)) == {"id": 1}


def test_update_without_old_image_leaving_when_evicts_new_keys() -> None:
    r = rule(when={"status": "active"})
    no_old = RowChange(Op.UPDATE, USERS, None, {"id": 1, "status": "banned"}, 7)
    assert r.actions_for(no_old) == [Evict("user:1", "r", 7)]


def test_column_dropped_by_ddl_is_warned_once() -> None:
    import structlog

    r = rule(
        columns=("id", "name"),
        keys=(KeyTemplate.parse("user:{id}"), KeyTemplate.parse("u:{email}")),
    )
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            actions = r.actions_for(change(Op.INSERT, after={"id": 1}))
            assert [a.key for a in actions] == ["user:1"]
    missing = [e for e in logs if e["event"] == "rule_column_missing"]
    assert [e["columns"] for e in missing] == [["email"], ["name"]]


def test_needed_columns_are_what_the_rules_read_unless_one_stores_whole_rows() -> None:
    evict = rule(
        action="evict",
        keys=(KeyTemplate.parse("user:{id}"), KeyTemplate.parse("email:{email}")),
        when={"active": True},
        watch=frozenset({"name"}),
    )
    listed = rule(name="listed", table=ORDERS, columns=("id", "total"), watch=frozenset({"state"}))
    assert RuleSet([evict, listed]).needed_columns() == {
        USERS: frozenset({"id", "email", "active", "name"}),
        ORDERS: frozenset({"id", "total", "state"}),
    }
    # A refresh without `columns` stores the whole row: that table needs every column.
    whole = rule(name="whole", format="hash")
    assert RuleSet([evict, whole, listed]).needed_columns() == {
        ORDERS: frozenset({"id", "total", "state"})
    }


def test_rules_give_the_same_actions_on_rows_cut_to_the_needed_columns() -> None:
    evict = rule(action="evict", keys=(KeyTemplate.parse("user:{id}"),), when={"active": True})
    listed = rule(name="listed", columns=("id", "name"), watch=frozenset({"name"}))
    rules = RuleSet([evict, listed])
    keep = rules.needed_columns()[USERS]
    before = {"id": 1, "name": "a", "active": 1, "bio": "long", "avatar": b"..."}
    after = {"id": 1, "name": "b", "active": 1, "bio": "longer", "avatar": b"...."}

    def cut(row: Row) -> Row:
        return {k: v for k, v in row.items() if k in keep}

    for op, old, new in (
        (Op.UPDATE, before, after),
        (Op.INSERT, None, after),
        (Op.DELETE, before, None),
    ):
        whole = rules.actions_for(change(op, old, new))
        projected = rules.actions_for(change(op, old and cut(old), new and cut(new)))
        assert projected == whole and whole


def test_plain_evict_rule_evicts_every_old_and_new_key_once_in_order() -> None:
    r = rule(
        action="evict",
        keys=(KeyTemplate.parse("user:{id}"), KeyTemplate.parse("email:{email}")),
    )
    a = {"id": 1, "email": "a@x"}
    b = {"id": 1, "email": "b@x"}
    assert r.actions_for(change(Op.INSERT, None, a)) == [
        Evict("user:1", "r", 7),
        Evict("email:a@x", "r", 7),
    ]
    assert r.actions_for(change(Op.DELETE, a, None)) == [
        Evict("user:1", "r", 7),
        Evict("email:a@x", "r", 7),
    ]
    assert r.actions_for(change(Op.UPDATE, a, b)) == [
        Evict("user:1", "r", 7),
        Evict("email:a@x", "r", 7),
        Evict("email:b@x", "r", 7),
    ]
    # A NULL key column renders no key; the other template still does.
    assert r.actions_for(change(Op.UPDATE, {"id": 2, "email": None}, {"id": 2, "email": None})) == [
        Evict("user:2", "r", 7)
    ]
    # A DELETE's after image (none) and an UPDATE without an old image.
    assert r.actions_for(change(Op.UPDATE, None, b)) == [
        Evict("user:1", "r", 7),
        Evict("email:b@x", "r", 7),
    ]
    # With `when`, the rule takes the general path and filters.
    filtered = rule(action="evict", when={"active": True})
    assert filtered.actions_for(change(Op.INSERT, None, {"id": 3, "active": False})) == []


def test_plain_evict_rule_with_one_template() -> None:
    r = rule(action="evict")
    one, two = {"id": 1}, {"id": 2}
    assert r.actions_for(change(Op.INSERT, None, one)) == [Evict("user:1", "r", 7)]
    assert r.actions_for(change(Op.DELETE, one, None)) == [Evict("user:1", "r", 7)]
    assert r.actions_for(change(Op.UPDATE, one, dict(one))) == [Evict("user:1", "r", 7)]
    assert r.actions_for(change(Op.UPDATE, one, two)) == [
        Evict("user:1", "r", 7),
        Evict("user:2", "r", 7),
    ]
    assert r.actions_for(change(Op.UPDATE, None, two)) == [Evict("user:2", "r", 7)]
    # A NULL key column on one side: the other side's key only (and the skip is counted).
    assert r.actions_for(change(Op.UPDATE, {"id": None}, two)) == [Evict("user:2", "r", 7)]
    assert r.actions_for(change(Op.UPDATE, one, {"id": None})) == [Evict("user:1", "r", 7)]
    assert r.actions_for(change(Op.DELETE, {"id": None}, None)) == []
    assert r._null_skips == 3


_KEY_VALUES = [1, -7, 2**70, "a", "", "ü{x}", None, Decimal("1.50"), True, 2.5, b"\x00k"]
_MISSING = object()


def _image(value: object, name: str) -> dict[str, object] | None:
    if value is _MISSING:
        return {"name": name}
    return {"id": value, "name": name}


@pytest.mark.parametrize("template", ["user:{id}", "{id}", "{{u}}:{id}:x}}"])
def test_one_column_template_renders_like_the_general_format(template: str) -> None:
    from worker.encoding import scalar_text

    t = KeyTemplate.parse(template)
    for value in _KEY_VALUES:
        expected = None if value is None else t._format.format(scalar_text(value)) or None
        assert t.render({"id": value}) == expected


@pytest.mark.parametrize("action", ["evict", "refresh"])
@pytest.mark.parametrize("fmt", ["json", "hash"])
@pytest.mark.parametrize("max_value_bytes", [1_000, 30])
def test_plain_shortcuts_give_what_the_general_path_gives(
    action: str, fmt: str, max_value_bytes: int
) -> None:
    # The shortcuts of actions_for skip work the general path does; on every shape of change
    # they must produce exactly its actions (oversize values and unrenderable keys included).
    r = rule(action=action, format=fmt, max_value_bytes=max_value_bytes)
    values = [*_KEY_VALUES, _MISSING]
    checked = 0
    for op in (Op.INSERT, Op.UPDATE, Op.DELETE):
        for old in values if op is not Op.INSERT else [_MISSING]:
            for new in values if op is not Op.DELETE else [_MISSING]:
                for name in ("Ann", "x" * 40):
                    before = _image(old, name) if op is not Op.INSERT else None
                    after = _image(new, name) if op is not Op.DELETE else None
                    c = change(op, before, after)
                    assert r.actions_for(c) == r._general_actions(c), (op, old, new, name)
                    checked += 1
    assert checked == 2 * (12 + 12 * 12 + 12)


def test_old_image_columns_are_keys_when_and_watch_not_stored_columns() -> None:
    rules = RuleSet(
        [
            rule(keys=(KeyTemplate.parse("u:{tenant}:{id}"),), when={"active": True}),
            rule(name="b", columns=("id", "name", "bio"), watch=frozenset({"name"})),
            rule(name="c", table=ORDERS, keys=(KeyTemplate.parse("o:{id}"),), action="evict"),
        ]
    )
    assert rules.needed_old_columns() == {
        USERS: frozenset({"tenant", "id", "active", "name"}),
        ORDERS: frozenset({"id"}),
    }
