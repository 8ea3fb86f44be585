"""Unit tests of ``worker.verify``: judging keys, re-checks, paging, sampling and the report.

The database is a list of rows behind the ``RowReader`` port and Redis a dict behind the
``CacheReader`` port, so every verdict can be set up exactly, including a worker that changes a
key between verify's first read and its re-check.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest

from worker.errors import SchemaError
from worker.events import Row, TableRef
from worker.rules import Format, KeyTemplate, Rule
from worker.verify import (
    Absent,
    CachedValue,
    RuleReport,
    VerifyOptions,
    WrongType,
    any_stale,
    expected_for,
    format_report,
    format_totals,
    judge,
    same,
    truncate,
    verify_rule,
    verify_rules,
)

USERS = TableRef("shop", "users")


class ListRows:
    """A ``RowReader`` over a list of rows, ordered by ``pk``; records the calls it gets."""

    def __init__(self, rows: list[Row], pk: Sequence[str] = ("id",)) -> None:
        self.rows = rows
        self.pk = list(pk)
        self.scans: list[tuple[Any, ...] | None] = []
        self.fetches: list[list[tuple[Any, ...]]] = []

    def _id(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[c] for c in self.pk)

    def primary_key(self, table: TableRef) -> list[str]:
        return list(self.pk)

    def estimate_rows(self, table: TableRef) -> int | None:
        return len(self.rows)

    def scan(self, table: TableRef, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
        self.scans.append(after)
        ordered = sorted(self.rows, key=self._id)
        return [dict(r) for r in ordered if after is None or self._id(r) > after][:limit]

    def sample(self, table: TableRef, n: int) -> list[Row]:
        return [dict(r) for r in random.Random(1).sample(self.rows, min(n, len(self.rows)))]

    def fetch(self, table: TableRef, keys: Sequence[tuple[Any, ...]]) -> list[Row]:
        self.fetches.append(list(keys))
        wanted = set(keys)
        return [dict(r) for r in self.rows if self._id(r) in wanted]

    def close(self) -> None:
        pass


class DictCache:
    """A ``CacheReader`` over a dict: str values are JSON strings, dict values are hashes.

    ``after_read`` runs after each read, standing in for a worker that acts in between.
    """

    def __init__(self, data: dict[str, str | dict[str, str]] | None = None) -> None:
        self.data: dict[str, str | dict[str, str]] = dict(data or {})
        self.reads = 0
        # Its result is ignored: a lambda may pop a row and return it.
        self.after_read: Callable[[int], object] | None = None

    def read(self, keys: Sequence[tuple[str, Format]]) -> list[CachedValue]:
        out: list[CachedValue] = []
        for key, fmt in keys:
            value = self.data.get(key)
            if value is None:
                out.append(None)
            elif fmt == "json":
                out.append(value if isinstance(value, str) else WrongType("hash"))
            else:
                out.append(dict(value) or None if isinstance(value, dict) else WrongType("string"))
        self.reads += 1
        if self.after_read is not None:
            self.after_read(self.reads)
        return out

    def close(self) -> None:
        pass


def make_rule(**kw: Any) -> Rule:
    defaults: dict[str, Any] = dict(
        name="profile", table=USERS, keys=(KeyTemplate.parse("user:{id}"),), jitter=0.0
    )
    defaults.update(kw)
    return Rule(**defaults)


def warm(rule: Rule, rows: list[Row]) -> DictCache:
    """A cache holding exactly what the worker writes for ``rows``."""
    cache = DictCache()
    for row in rows:
        if not rule.passes(row):
            continue
        payload = rule.payload(row)
        for key in rule.keys_of(row):
            cache.data[key] = payload if isinstance(payload, str) else dict(payload)
    return cache


NO_PAUSE = VerifyOptions(recheck_delay_s=0.0)


def run(
    rule: Rule, rows: ListRows, cache: DictCache, options: VerifyOptions = NO_PAUSE
) -> RuleReport:
    return verify_rule(rule, rows, cache, options, sleep=lambda s: None)


def users(n: int = 5) -> list[Row]:
    return [
        {
            "id": i,
            "name": f"Zoë {i} 😀",
            "balance": Decimal(f"{i}.50"),
            "seen_at": dt.datetime(2024, 2, 29, 12, 0, i, tzinfo=dt.UTC),
            "tags": ["a", "b"],
            "status": "active",
        }
        for i in range(1, n + 1)
    ]


# -- judging ----------------------------------------------------------------------------------


def test_a_warm_cache_is_all_fresh_whatever_the_json_formatting() -> None:
    rule = make_rule(keys=(KeyTemplate.parse("user:{id}"), KeyTemplate.parse("name:{name}")))
    data = users()
    cache = warm(rule, data)
    # Another writer's spacing and key order are not differences.
    text = cache.data["user:1"]
    assert isinstance(text, str)
    cache.data["user:1"] = json.dumps(dict(reversed(list(json.loads(text).items()))), indent=2)
    report = run(rule, ListRows(data), cache)
    assert (report.rows, report.keys, report.fresh, report.missing, report.stale) == (
        5,
        10,
        10,
        0,
        0,
    )
    assert report.examples == [] and not any_stale([report])


def test_missing_keys_are_counted_but_not_stale() -> None:
    rule = make_rule()
    data = users()
    cache = warm(rule, data)
    del cache.data["user:2"], cache.data["user:4"]
    report = run(rule, ListRows(data), cache)
    assert (report.fresh, report.missing, report.stale) == (3, 2, 0)


def test_a_wrong_value_is_stale_with_an_example_naming_the_fields() -> None:
    rule = make_rule(columns=("id", "name", "balance"))
    data = users()
    cache = warm(rule, data)
    cache.data["user:3"] = json.dumps({"id": 3, "name": "old", "balance": "3.50"})
    report = run(rule, ListRows(data), cache)
    assert (report.fresh, report.missing, report.stale) == (4, 0, 1)
    [example] = report.examples
    assert example.key == "user:3"
    assert example.row == {"id": 3}
    assert example.fields == ("name",)
    assert example.expected == '{"id":3,"name":"Zoë 3 😀","balance":"3.50"}'
    assert json.loads(example.actual)["name"] == "old"
    assert any_stale([report])


def test_numbers_compare_by_value_but_booleans_are_not_numbers() -> None:
    assert same({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not same(True, 1) and not same(0, False)
    assert same(float("nan"), float("nan"))
    assert not same({"a": 1}, {"a": 1, "b": None})
    assert not same("1", 1)


def test_a_row_outside_when_must_have_no_key() -> None:
    rule = make_rule(when={"status": "active"})
    data = users(3)
    data[1]["status"] = "banned"
    cache = warm(rule, data)
    report = run(rule, ListRows(data), cache)
    assert (report.outside_when, report.fresh, report.missing, report.stale) == (1, 2, 1, 0)

    # The worker should have evicted it: a key left behind is stale.
    cache.data["user:2"] = json.dumps({"id": 2})
    report = run(rule, ListRows(data), cache)
    assert report.stale == 1
    assert "outside `when`" in report.examples[0].reason
    assert report.examples[0].expected is None


def test_hash_rules_compare_field_dicts() -> None:
    rule = make_rule(format="hash", columns=("id", "name", "balance"))
    data = users(3)
    data[2]["balance"] = None
    cache = warm(rule, data)
    assert cache.data["user:3"] == {"id": "3", "name": "Zoë 3 😀"}
    report = run(rule, ListRows(data), cache)
    assert (report.fresh, report.stale) == (3, 0)

    cache.data["user:1"] = {"id": "1", "name": "Zoë 1 😀", "balance": "1.5"}
    report = run(rule, ListRows(data), cache)
    assert report.stale == 1 and report.examples[0].fields == ("balance",)


def test_an_all_null_row_in_hash_format_is_fresh_when_absent() -> None:
    rule = make_rule(format="hash", columns=("nick",), keys=(KeyTemplate.parse("u:{id}"),))
    report = run(rule, ListRows([{"id": 1, "nick": None}]), DictCache())
    assert (report.fresh, report.missing) == (1, 0)


def test_a_key_of_the_wrong_type_or_not_json_is_stale() -> None:
    rule = make_rule()
    data = users(2)
    cache = warm(rule, data)
    cache.data["user:1"] = {"id": "1"}
    cache.data["user:2"] = "not json"
    report = run(rule, ListRows(data), cache)
    assert report.stale == 2
    reasons = sorted(e.reason for e in report.examples)
    assert reasons == ["the key does not hold JSON", "the key holds a hash, not json"]


def test_a_value_over_max_value_bytes_must_have_no_key() -> None:
    if "max_value_bytes" not in Rule.__dataclass_fields__:
        pytest.skip("rules have no max_value_bytes")
    data = users(2)
    data[1]["name"] = "é" * 100  # 200 bytes of UTF-8
    for fmt in ("json", "hash"):
        rule = make_rule(format=fmt, columns=("id", "name"), max_value_bytes=150)
        cache = warm(rule, data[:1])
        assert run(rule, ListRows(data), cache).missing == 1
        cache.data["user:2"] = json.dumps({"id": 2}) if fmt == "json" else {"id": "2"}
        report = run(rule, ListRows(data), cache)
        assert report.stale == 1 and "over max_value_bytes" in report.examples[0].reason


def test_judge_directly() -> None:
    rule = make_rule()
    [row] = users(1)
    expected = expected_for(rule, row)
    assert not isinstance(expected, Absent)
    assert judge(expected, None, "json").status == "missing"
    assert judge(expected, expected.text, "json").status == "fresh"
    assert judge(expected, "{}", "json").status == "stale"


# -- re-checks --------------------------------------------------------------------------------


def test_a_key_the_worker_fixes_before_the_recheck_is_not_stale() -> None:
    rule = make_rule()
    data = users(3)
    cache = warm(rule, data)
    good = cache.data["user:2"]
    cache.data["user:2"] = json.dumps({"id": 2, "name": "lagging"})

    def worker_catches_up(reads: int) -> None:
        cache.data["user:2"] = good

    cache.after_read = worker_catches_up
    rows = ListRows(data)
    report = run(rule, rows, cache)
    assert (report.fresh, report.stale, report.rechecked) == (3, 0, 1)
    assert rows.fetches == [[(2,)]]


def test_a_row_that_changed_is_judged_on_its_new_value() -> None:
    rule = make_rule(columns=("id", "name"))
    data = users(2)
    cache = warm(rule, data)
    rows = ListRows(data)

    def update_row_and_key(reads: int) -> None:
        # Between verify's SELECT and GET: the row changed and the worker wrote it.
        if reads == 1:
            data[0]["name"] = "new"
            cache.data["user:1"] = json.dumps({"id": 1, "name": "new"})

    cache.after_read = update_row_and_key
    # The first read already sees the new key; the row it compares with is the old one.
    cache.data["user:1"] = json.dumps({"id": 1, "name": "new"})
    report = run(rule, rows, cache)
    assert (report.fresh, report.stale) == (2, 0)


def test_a_row_that_keeps_changing_is_unsettled_not_stale() -> None:
    rule = make_rule(columns=("id", "name"))
    data = users(2)
    cache = warm(rule, data)
    cache.data["user:2"] = json.dumps({"id": 2, "name": "an old version"})
    rows = ListRows(data)

    def update_row(reads: int) -> None:
        # The worker has not caught up with this newer version yet either.
        if reads == 1:
            data[1]["name"] = "newer"

    cache.after_read = update_row
    report = run(rule, rows, cache)
    assert (report.fresh, report.stale, report.unsettled) == (1, 0, 1)
    assert "1 key whose row changed during the re-check" in format_report(report)[0]


def test_a_row_deleted_during_the_check_is_unsettled_or_missing() -> None:
    rule = make_rule()
    data = users(2)
    cache = warm(rule, data)
    cache.data["user:2"] = json.dumps({"id": 2, "name": "x"})
    rows = ListRows(data)
    cache.after_read = lambda reads: rows.rows.pop() if reads == 1 else None
    report = run(rule, rows, cache)
    assert (report.stale, report.unsettled) == (0, 1)

    # ...and once the worker evicted its key, it is only missing.
    data = users(2)
    cache = warm(rule, data)
    cache.data["user:2"] = json.dumps({"id": 2, "name": "x"})
    rows = ListRows(data)

    def delete_and_evict(reads: int) -> None:
        if reads == 1:
            rows.rows.pop()
            del cache.data["user:2"]

    cache.after_read = delete_and_evict
    report = run(rule, rows, cache)
    assert (report.fresh, report.missing, report.stale) == (1, 1, 0)


def test_the_recheck_reads_the_key_before_the_row() -> None:
    # A key read after the row could reflect a change the first row read missed; read first,
    # the key can only be as new as the row (give or take the worker's lag, waited out).
    rule = make_rule()
    data = users(1)
    cache = warm(rule, data)
    cache.data["user:1"] = "{}"
    order: list[str] = []

    class Rows(ListRows):
        def fetch(self, table: TableRef, keys: Sequence[tuple[Any, ...]]) -> list[Row]:
            order.append("row")
            return super().fetch(table, keys)

    cache.after_read = lambda reads: order.append("key")
    report = run(rule, Rows(data), cache)
    assert order == ["key", "key", "row"] and report.stale == 1


def test_candidates_wait_out_the_delay_since_their_row_was_read() -> None:
    rule = make_rule()
    data = users(5)
    cache = warm(rule, data)
    cache.data["user:1"] = cache.data["user:4"] = "{}"
    now = [0.0]
    pauses: list[float] = []

    class Slow(ListRows):
        def scan(self, table: TableRef, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
            now[0] += 0.1
            return super().scan(table, after, limit)

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    def tick(reads: int) -> None:
        now[0] += 0.1

    cache.after_read = tick
    options = VerifyOptions(chunk=3, recheck_delay_s=0.25)
    report = verify_rule(rule, Slow(data), cache, options, sleep=sleep, clock=lambda: now[0])
    # Both candidates are re-checked together once 0.25 s have passed since the newer one's row
    # was read (at 0.3); scanning already took 0.1 of that.
    assert report.stale == 2 and report.rechecked == 2
    assert pauses == [pytest.approx(0.15)]


def test_many_candidates_are_rechecked_a_chunk_at_a_time() -> None:
    rule = make_rule()
    data = users(4)
    cache = DictCache({f"user:{i}": "{}" for i in range(1, 5)})
    rows = ListRows(data)
    report = run(rule, rows, cache, VerifyOptions(chunk=2, recheck_delay_s=0))
    assert report.stale == 4 and len(rows.fetches) == 2


# -- paging, sampling, skipping ---------------------------------------------------------------


def test_full_scan_pages_by_the_primary_key() -> None:
    rule = make_rule(keys=(KeyTemplate.parse("m:{org}:{id}"),))
    data = [{"org": o, "id": i, "v": o * 10 + i} for o in (2, 1) for i in (3, 1, 2)]
    rows = ListRows(data, pk=("org", "id"))
    progress: list[int] = []
    report = verify_rule(
        rule, rows, warm(rule, data), VerifyOptions(chunk=4), progress=progress.append
    )
    assert report.rows == 6 and report.fresh == 6
    assert rows.scans == [None, (2, 1)]
    assert progress == [4, 2]


def test_a_full_last_page_costs_one_empty_scan() -> None:
    data = users(4)
    rows = ListRows(data)
    report = run(make_rule(), rows, warm(make_rule(), data), VerifyOptions(chunk=2))
    assert report.rows == 4 and rows.scans == [None, (2,), (4,)]


def test_sample_checks_n_random_rows() -> None:
    rule = make_rule()
    data = users(10)
    rows = ListRows(data)
    report = run(rule, rows, warm(rule, data), VerifyOptions(sample=4, recheck_delay_s=0))
    assert report.sampled and report.rows == 4 and report.fresh == 4
    assert rows.scans == []


def test_a_table_without_key_is_skipped_unless_sampled() -> None:
    rule = make_rule()
    data = users(3)
    report = run(rule, ListRows(data, pk=()), warm(rule, data))
    assert report.skipped is not None and "--sample" in report.skipped

    # Sampled, a stale candidate is re-read from Redis only.
    cache = warm(rule, data)
    cache.data["user:1"] = "{}"
    rows = ListRows(data, pk=())
    report = run(rule, rows, cache, VerifyOptions(sample=3, recheck_delay_s=0))
    assert report.stale == 1 and rows.fetches == []


def test_evict_rules_are_skipped() -> None:
    rule = make_rule(action="evict")
    report = run(rule, ListRows(users()), DictCache())
    assert report.skipped is not None and "evict" in report.skipped
    assert format_report(report)[0].startswith("skip   profile (shop.users): an evict rule")


def test_paging_that_makes_no_progress_stops() -> None:
    class Stuck(ListRows):
        def scan(self, table: TableRef, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
            return [dict(r) for r in self.rows[:limit]]

    data = users(2)
    with pytest.raises(SchemaError, match="no progress"):
        run(make_rule(), Stuck(data), warm(make_rule(), data), VerifyOptions(chunk=2))


def test_a_row_the_worker_cannot_encode_is_counted_apart() -> None:
    rule = make_rule()
    data = users(2)
    cache = warm(rule, data)
    data[1]["weird"] = object()
    report = run(rule, ListRows(data), cache)
    assert (report.unencodable, report.fresh, report.stale) == (1, 1, 0)
    assert report.unencodable_example is not None
    assert report.unencodable_example.startswith("id=2: cannot encode")


# -- report -----------------------------------------------------------------------------------


def test_examples_are_limited_and_truncated() -> None:
    rule = make_rule()
    data = users(5)
    cache = DictCache({f"user:{i}": json.dumps({"x": "y" * 500}) for i in range(1, 6)})
    report = run(rule, ListRows(data), cache, VerifyOptions(examples=2, example_chars=40))
    assert report.stale == 5 and len(report.examples) == 2
    assert report.examples[0].actual.endswith("chars)") and "…" in report.examples[0].actual
    assert truncate("abc", 3) == "abc" and truncate("abcd", 3) == "abc… (+1 chars)"


def test_a_long_list_of_differing_fields_is_shortened() -> None:
    rule = make_rule()
    row = {"id": 1, **{f"c{i}": i for i in range(10)}}
    cache = DictCache({"user:1": json.dumps({"id": 1})})
    report = run(rule, ListRows([row]), cache)
    assert format_report(report)[1] == (
        "       stale user:1 [id=1]: the value differs in c0, c1, c2, c3, c4, c5, c6, c7 (+2 more)"
    )


def test_report_lines_and_totals() -> None:
    rule = make_rule(when={"status": "active"})
    data = users(3)
    data[2]["status"] = "gone"
    cache = warm(rule, data)
    cache.data["user:1"] = json.dumps({"id": 1})
    del cache.data["user:2"]
    printed: list[RuleReport] = []
    reports = verify_rules(
        [rule, make_rule(name="orders", action="evict")],
        ListRows(data),
        cache,
        NO_PAUSE,
        on_report=printed.append,
    )
    assert printed == reports
    lines = format_report(reports[0])
    assert lines[0] == (
        "STALE  profile (shop.users, json): 3 rows, 3 keys: 0 fresh, 2 missing, 1 stale "
        "(1 row outside `when`; 1 key re-checked)"
    )
    assert lines[1] == (
        "       stale user:1 [id=1]: the value differs in name, balance, seen_at, tags, status"
    )
    assert lines[2].startswith("         expected: {")
    assert lines[3] == '         actual:   {"id": 1}'
    assert format_totals(reports) == (
        "1 rule verified, 1 skipped: 3 keys, 0 fresh, 2 missing, 1 stale"
    )


def test_verify_rules_drives_a_progress_display_per_refresh_rule() -> None:
    opened: list[tuple[str, int | None]] = []
    counted: list[int] = []

    class Bar:
        def update(self, n: int) -> None:
            counted.append(n)

        def close(self) -> None:
            counted.append(-1)

    def progress(rule: Rule, total: int | None) -> Bar:
        opened.append((rule.name, total))
        return Bar()

    data = users(3)
    verify_rules(
        [make_rule(), make_rule(name="e", action="evict")],
        ListRows(data),
        warm(make_rule(), data),
        NO_PAUSE,
        on_report=lambda r: None,
        progress=progress,
    )
    assert opened == [("profile", 3)] and counted == [3, -1]
