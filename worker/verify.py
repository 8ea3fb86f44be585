"""The staleness inspector behind ``cache-worker verify``: its ports, the comparison, the report.

For every refresh rule it pages through the rule's table in primary-key order (or takes a random
sample), computes what the worker would store for each row (``Rule.passes``, ``Rule.keys_of``,
``Rule.payload``), reads those keys through a ``CacheReader`` and sorts each key into *fresh* (it
holds that value), *missing* (absent: a cold key is allowed) or *stale* (it holds something else,
or exists although the row is outside ``when``). Values are compared decoded, so JSON spacing and
key order or hash field order never count as differences. Because the worker may be running, a
stale candidate is checked once more, at least the worker's lag after its row was read, by
reading the key and then the row again; it counts stale only if the row held still and the key
still disagrees (``RuleVerifier``). Rows come through a ``RowReader`` whose values must be the
Python values the rule's source would produce from its log; the adapters in
``connectors/mysql_rows.py`` and ``connectors/postgres_rows.py`` do that. No I/O happens here
beyond those two ports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import structlog

from worker.errors import SchemaError
from worker.events import Row, TableRef
from worker.rules import Format, Rule

log = structlog.get_logger("cache_worker.verify")

Status = Literal["fresh", "missing", "stale"]


@dataclass(frozen=True, slots=True)
class WrongType:
    """A key that holds another Redis type than the rule's format (a list where JSON belongs)."""

    redis_type: str


CachedValue = str | dict[str, str] | WrongType | None
"""What a key holds: JSON text (GET), a hash (HGETALL; empty is absent), another type, or None."""


class RowReader(Protocol):
    """Reads a table's current rows as the rule's source would decode them from its log."""

    def primary_key(self, table: TableRef) -> list[str]:
        """Columns that identify a row (primary key, else a NOT NULL unique key); [] if none."""
        ...

    def estimate_rows(self, table: TableRef) -> int | None:
        """A cheap row count estimate for the progress bar, or None when unknown."""
        ...

    def scan(self, table: TableRef, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
        """Up to ``limit`` rows whose key is greater than ``after`` (None: from the start), in
        key order."""
        ...

    def sample(self, table: TableRef, n: int) -> list[Row]:
        """Up to ``n`` rows picked at random."""
        ...

    def fetch(self, table: TableRef, keys: Sequence[tuple[Any, ...]]) -> list[Row]:
        """The rows whose primary-key values are among ``keys`` (those that still exist)."""
        ...

    def close(self) -> None: ...


class CacheReader(Protocol):
    """Reads cache keys in one round trip: GET for json keys, HGETALL for hash keys."""

    def read(self, keys: Sequence[tuple[str, Format]]) -> list[CachedValue]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    """How much to read and how much to show."""

    chunk: int = 1000
    sample: int | None = None
    examples: int = 5
    # How long a stale candidate waits between the read of its row and its re-check: at least
    # the worker's lag, so the worker has applied whatever the row read saw. Only candidates
    # wait, and scanning goes on meanwhile.
    recheck_delay_s: float = 1.0
    example_chars: int = 300


@dataclass(frozen=True, slots=True)
class StaleExample:
    """One stale key, for the report: why, and both sides as text (truncated)."""

    key: str
    row: dict[str, Any]
    reason: str
    expected: str | None
    actual: str
    fields: tuple[str, ...] = ()


@dataclass(slots=True)
class RuleReport:
    """The counts of one rule's verification, and its first stale examples."""

    rule: str
    table: str
    format: Format = "json"
    sampled: bool = False
    skipped: str | None = None
    rows: int = 0
    outside_when: int = 0
    unencodable: int = 0
    keys: int = 0
    fresh: int = 0
    missing: int = 0
    stale: int = 0
    rechecked: int = 0
    unsettled: int = 0
    examples: list[StaleExample] = field(default_factory=list)
    unencodable_example: str | None = None


# ------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Absent:
    """The key should not exist, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Expected:
    """The value the worker would write: the encoded text and its decoded form."""

    text: str
    value: Any


@dataclass(frozen=True, slots=True)
class _Item:
    """One key of one row, with what it should hold according to that row."""

    row: Row
    row_id: tuple[Any, ...] | None
    key: str
    expected: Expected | Absent


@dataclass(frozen=True, slots=True)
class Verdict:
    """A key's judgement, with why it is stale and which fields differ (hash or JSON object)."""

    status: Status
    reason: str = ""
    fields: tuple[str, ...] = ()


_FIELDS_SHOWN = 8
_OUTSIDE_WHEN = "the key exists but the row is outside `when` (it should have been evicted)"
_ROW_GONE = "the key exists but its row no longer does (it should have been evicted)"
_KEY_MOVED = "the key exists but the row no longer renders it (it should have been evicted)"
_TOO_LARGE = "the key exists but its value is over max_value_bytes (it should have been evicted)"


def expected_for(rule: Rule, row: Row) -> Expected | Absent:
    """What the worker leaves for ``row`` (which passes ``when``) under each of its keys.

    Raises TypeError/ValueError for a value the encoder rejects, as the worker's rule does.
    """
    payload = rule.payload(row)
    # The worker evicts instead of writing a value over the rule's limit (worker.rules).
    limit = getattr(rule, "max_value_bytes", None)
    if isinstance(payload, str):
        if limit and len(payload.encode("utf-8")) > limit:
            return Absent(_TOO_LARGE)
        return Expected(payload, json.loads(payload))
    if limit and sum(len(f.encode("utf-8")) + len(v.encode("utf-8")) for f, v in payload) > limit:
        return Absent(_TOO_LARGE)
    as_dict = dict(payload)
    return Expected(_canonical(as_dict), as_dict)


def same(a: Any, b: Any) -> bool:
    """Decoded JSON equality: numbers by value (1 == 1.0), but a boolean is never a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _differing_fields(expected: Any, actual: Any) -> tuple[str, ...]:
    if not isinstance(expected, dict) or not isinstance(actual, dict):
        return ()
    names = list(expected) + [k for k in actual if k not in expected]
    return tuple(
        n for n in names if n not in expected or n not in actual or not same(expected[n], actual[n])
    )


def judge(expected: Expected | Absent, actual: CachedValue, fmt: Format) -> Verdict:
    """Fresh, missing or stale, for one key whose expectation and Redis value are known."""
    if actual is None:
        if isinstance(expected, Expected) and fmt == "hash" and expected.value == {}:
            # A row whose stored columns are all NULL gives an empty hash, which Redis does not
            # keep: absent is exactly what the worker leaves.
            return Verdict("fresh")
        return Verdict("missing")
    if isinstance(expected, Absent):
        return Verdict("stale", expected.reason)
    if isinstance(actual, WrongType):
        return Verdict("stale", f"the key holds a {actual.redis_type}, not {fmt}")
    if isinstance(actual, dict):
        decoded: Any = actual
    else:
        try:
            decoded = json.loads(actual)
        except ValueError:
            return Verdict("stale", "the key does not hold JSON")
    if same(expected.value, decoded):
        return Verdict("fresh")
    return Verdict("stale", "the value differs", _differing_fields(expected.value, decoded))


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _actual_text(actual: CachedValue) -> str:
    if isinstance(actual, WrongType):
        return f"<{actual.redis_type}>"
    if isinstance(actual, dict):
        return _canonical(actual)
    return actual if actual is not None else "<absent>"


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (+{len(text) - limit} chars)"


def _same_expectation(a: Expected | Absent, b: Expected | Absent) -> bool:
    if isinstance(a, Absent) or isinstance(b, Absent):
        return isinstance(a, Absent) and isinstance(b, Absent)
    return same(a.value, b.value)


def _freeze(value: Any) -> Any:
    # Key values are matched in a dict; a Postgres array key decodes to an (unhashable) list.
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


# ------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------


class RuleVerifier:
    """Verifies one refresh rule against the rows and the cache, filling a ``RuleReport``.

    A key that disagrees with its row on the first read is a *candidate*. Candidates wait until
    ``recheck_delay_s`` has passed since their row was read (scanning goes on meanwhile), then
    their key is read again and, after that, their row. The worker applies a change within its
    lag, so a key read that long after the row must reflect the row, unless the row changed in
    between: when both reads of the row agree and the key does not, the key is stale; when the
    row changed and the key does not match its second read either, the key may hold a version
    in between and is counted *unsettled*, not stale.
    """

    def __init__(
        self,
        rule: Rule,
        rows: RowReader,
        cache: CacheReader,
        options: VerifyOptions,
        progress: Callable[[int], object] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rule = rule
        self.rows = rows
        self.cache = cache
        self.options = options
        self.progress = progress
        self.sleep = sleep
        self.clock = clock
        self.report = RuleReport(
            rule.name, str(rule.table), rule.format, options.sample is not None
        )
        self.pk: list[str] = []
        self._pending: list[_Item] = []
        self._pending_read_at = 0.0

    def run(self) -> RuleReport:
        table = self.rule.table
        self.pk = self.rows.primary_key(table)
        if self.options.sample is not None:
            picked = self.rows.sample(table, self.options.sample)
            read_at = self.clock()
            for start in range(0, len(picked), self.options.chunk):
                self._check(picked[start : start + self.options.chunk], read_at)
            self._recheck()
            return self.report
        if not self.pk:
            self.report.skipped = (
                "the table has no primary key or NOT NULL unique key to page by; use --sample"
            )
            return self.report
        after: tuple[Any, ...] | None = None
        while True:
            page = self.rows.scan(table, after, self.options.chunk)
            read_at = self.clock()
            if not page:
                break
            self._check(page, read_at)
            last = self._row_id(page[-1])
            if last == after:
                # Only a key whose decoded value compares differently from the stored one (a
                # FLOAT key) can do this; going on would read the same rows forever.
                raise SchemaError(
                    f"{table}: paging by ({', '.join(self.pk)}) made no progress after "
                    f"{last!r}; use --sample"
                )
            after = last
            if len(page) < self.options.chunk:
                break
        self._recheck()
        return self.report

    def _row_id(self, row: Row) -> tuple[Any, ...]:
        return tuple(row.get(c) for c in self.pk)

    def _items(self, row: Row) -> list[_Item]:
        """The keys ``row`` renders, each with what it should hold."""
        rule = self.rule
        row_id = self._row_id(row) if self.pk else None
        expected = expected_for(rule, row) if rule.passes(row) else Absent(_OUTSIDE_WHEN)
        return [_Item(row, row_id, key, expected) for key in dict.fromkeys(rule.keys_of(row))]

    def _expectation(self, row: Row | None, key: str) -> Expected | Absent:
        """What ``key`` should hold now that its row reads ``row`` (None: deleted)."""
        if row is None:
            return Absent(_ROW_GONE)
        if not self.rule.passes(row):
            return Absent(_OUTSIDE_WHEN)
        if key not in self.rule.keys_of(row):
            return Absent(_KEY_MOVED)
        return expected_for(self.rule, row)

    def _check(self, rows: Sequence[Row], read_at: float) -> None:
        report = self.report
        items: list[_Item] = []
        for row in rows:
            report.rows += 1
            if not self.rule.passes(row):
                report.outside_when += 1
            try:
                items.extend(self._items(row))
            except (TypeError, ValueError) as exc:
                # The worker cannot encode this row either (it dead-letters it): there is no
                # value to compare with, so the row is counted apart rather than judged.
                self._unencodable(row, exc)
        actual = self.cache.read([(item.key, self.rule.format) for item in items])
        for item, value in zip(items, actual, strict=True):
            report.keys += 1
            verdict = judge(item.expected, value, self.rule.format)
            if verdict.status == "stale":
                self._pending.append(item)
                self._pending_read_at = read_at
            else:
                self._count(verdict.status)
        if len(self._pending) >= self.options.chunk:
            self._recheck()
        if self.progress is not None:
            self.progress(len(rows))

    def _unencodable(self, row: Row, exc: Exception) -> None:
        self.report.unencodable += 1
        if self.report.unencodable_example is None:
            self.report.unencodable_example = truncate(
                f"{self._describe_row(row)}: {exc}", self.options.example_chars
            )

    def _count(self, status: Status) -> None:
        if status == "fresh":
            self.report.fresh += 1
        elif status == "missing":
            self.report.missing += 1
        else:
            self.report.stale += 1

    def _recheck(self) -> None:
        """Judge the pending candidates again: key first, then row (see the class docstring)."""
        candidates, self._pending = self._pending, []
        if not candidates:
            return
        wait = self._pending_read_at + self.options.recheck_delay_s - self.clock()
        if wait > 0:
            self.sleep(wait)
        actual = self.cache.read([(c.key, self.rule.format) for c in candidates])
        current: dict[Any, Row] = {}
        if self.pk:
            ids = {_freeze(c.row_id): c.row_id for c in candidates if c.row_id is not None}
            found = self.rows.fetch(self.rule.table, list(ids.values()))
            current = {_freeze(self._row_id(row)): row for row in found}
        self.report.rechecked += len(candidates)
        for candidate, value in zip(candidates, actual, strict=True):
            if self.pk:
                row = current.get(_freeze(candidate.row_id))
                try:
                    now = self._expectation(row, candidate.key)
                except (TypeError, ValueError) as exc:
                    self._unencodable(candidate.row, exc)
                    continue
            else:
                # Without a key the row cannot be read again: the key alone is re-read.
                now = candidate.expected
            verdict = judge(now, value, self.rule.format)
            if verdict.status != "stale":
                self._count(verdict.status)
            elif not _same_expectation(candidate.expected, now):
                # The row changed while we looked: the key may hold a version in between.
                self.report.unsettled += 1
            else:
                self._count("stale")
                self._example(replace(candidate, expected=now), value, verdict)
        log.debug("recheck", rule=self.rule.name, candidates=len(candidates))

    def _example(self, item: _Item, actual: CachedValue, verdict: Verdict) -> None:
        if len(self.report.examples) >= self.options.examples:
            return
        limit = self.options.example_chars
        expected = item.expected
        self.report.examples.append(
            StaleExample(
                key=item.key,
                row=dict(zip(self.pk, item.row_id or (), strict=False)),
                reason=verdict.reason,
                expected=truncate(expected.text, limit) if isinstance(expected, Expected) else None,
                actual=truncate(_actual_text(actual), limit),
                fields=verdict.fields,
            )
        )

    def _describe_row(self, row: Row) -> str:
        if self.pk:
            return ", ".join(f"{c}={row.get(c)!r}" for c in self.pk)
        return "a row"


def verify_rule(
    rule: Rule,
    rows: RowReader,
    cache: CacheReader,
    options: VerifyOptions,
    progress: Callable[[int], object] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RuleReport:
    """Verify one rule; evict rules are reported as skipped (their keys hold readers' fills)."""
    if rule.action != "refresh":
        return RuleReport(
            rule.name,
            str(rule.table),
            rule.format,
            skipped="an evict rule: its keys hold what readers fill, not what the worker writes",
        )
    return RuleVerifier(rule, rows, cache, options, progress, sleep, clock).run()


class Progress(Protocol):
    """A progress display for one rule (``tqdm`` fits): told how many rows were checked."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


def verify_rules(
    rules: Sequence[Rule],
    rows: RowReader,
    cache: CacheReader,
    options: VerifyOptions,
    on_report: Callable[[RuleReport], None],
    progress: Callable[[Rule, int | None], Progress] | None = None,
) -> list[RuleReport]:
    """Verify every rule in turn, handing each report to ``on_report`` as soon as it is done."""
    reports = []
    for rule in rules:
        bar: Progress | None = None
        if progress is not None and rule.action == "refresh":
            total = options.sample if options.sample is not None else None
            if total is None:
                total = rows.estimate_rows(rule.table)
            bar = progress(rule, total)
        try:
            report = verify_rule(rule, rows, cache, options, bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        log.info(
            "verify_rule_done",
            rule=rule.name,
            table=str(rule.table),
            skipped=report.skipped,
            rows=report.rows,
            keys=report.keys,
            fresh=report.fresh,
            missing=report.missing,
            stale=report.stale,
        )
        on_report(report)
        reports.append(report)
    return reports


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_report(report: RuleReport) -> list[str]:
    """The report's lines: one summary line, then the stale examples indented."""
    head = f"{report.rule} ({report.table}"
    if report.skipped is not None:
        return [f"skip   {head}): {report.skipped}"]
    status = "STALE " if report.stale else "ok    "
    what = f"sample of {_n(report.rows, 'row')}" if report.sampled else _n(report.rows, "row")
    line = (
        f"{status} {head}, {report.format}): {what}, {_n(report.keys, 'key')}: "
        f"{report.fresh} fresh, {report.missing} missing, {report.stale} stale"
    )
    extras = []
    if report.outside_when:
        extras.append(f"{_n(report.outside_when, 'row')} outside `when`")
    if report.unencodable:
        extras.append(f"{_n(report.unencodable, 'row')} the worker cannot encode")
    if report.rechecked:
        extras.append(f"{_n(report.rechecked, 'key')} re-checked")
    if report.unsettled:
        extras.append(f"{_n(report.unsettled, 'key')} whose row changed during the re-check")
    if extras:
        line += f" ({'; '.join(extras)})"
    lines = [line]
    for example in report.examples:
        where = ", ".join(f"{k}={v!r}" for k, v in example.row.items())
        reason = example.reason
        if example.fields:
            shown = ", ".join(example.fields[:_FIELDS_SHOWN])
            more = len(example.fields) - _FIELDS_SHOWN
            reason += f" in {shown}" + (f" (+{more} more)" if more > 0 else "")
        lines.append(
            f"       stale {example.key}" + (f" [{where}]" if where else "") + f": {reason}"
        )
        if example.expected is not None:
            lines.append(f"         expected: {example.expected}")
        lines.append(f"         actual:   {example.actual}")
    if report.unencodable_example is not None:
        lines.append(f"       cannot encode {report.unencodable_example}")
    return lines


def format_totals(reports: Sequence[RuleReport]) -> str:
    """The closing line: totals over the rules that were verified."""
    checked = [r for r in reports if r.skipped is None]
    keys = sum(r.keys for r in checked)
    fresh = sum(r.fresh for r in checked)
    missing = sum(r.missing for r in checked)
    stale = sum(r.stale for r in checked)
    skipped = len(reports) - len(checked)
    return (
        f"{_n(len(checked), 'rule')} verified"
        + (f", {skipped} skipped" if skipped else "")
        + f": {_n(keys, 'key')}, {fresh} fresh, {missing} missing, {stale} stale"
    )


def any_stale(reports: Iterable[RuleReport]) -> bool:
    return any(r.stale for r in reports)
