"""Rules: compiled from settings, they turn one ``RowChange`` into the ``CacheAction``s it implies.

A ``Rule`` knows its table, key templates, action (refresh or evict), payload format, projected
columns, watched columns, TTL with jitter and ``when`` filter. ``RuleSet`` indexes rules by table
so the hot path is one dict lookup per change. No I/O happens here; checking that the columns a
rule names exist is ``RuleSet.problems_with_columns``, fed by the source.

Semantics, per rule:
- INSERT: refresh (or evict) the keys of the new row, when it passes ``when``.
- UPDATE: keys of the old row that the new row no longer has (a key column moved, or the row left
  the ``when`` filter) are evicted; the new row's keys are refreshed (evict rules evict both).
  With ``watch`` set, an UPDATE that changed no watched column and moved no key does nothing.
- DELETE: the old row's keys are evicted, whatever the action.
- A NULL in a key column skips that key with a warning.
- A refresh whose encoded value is larger than the rule's ``max_value_bytes`` evicts its keys
  instead (with a rate-limited ``value_too_large`` warning): Redis would store it, but one huge
  value slows every reader and replica, and the readers can load it from the database.

``RuleSet.evaluate`` never raises for a bad row: a rule that fails on a change (a value the
encoder cannot encode) is reported as a ``RuleFailure`` for the dead-letter stream, together with
evictions of whatever keys of that rule can still be rendered.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import structlog

from worker.actions import CacheAction, Evict, Refresh
from worker.encoding import encode_hash, encode_json, scalar_text
from worker.errors import RuleError
from worker.events import UNCHANGED, Op, Row, RowChange, TableRef

log = structlog.get_logger("cache_worker.rules")

Action = Literal["refresh", "evict"]
Format = Literal["json", "hash"]
WhenValue = str | int | float | bool
_NULL_WARNING_EVERY = 1000
_TOO_LARGE_WARNING_EVERY = 1000
DEFAULT_MAX_VALUE_BYTES = 1_048_576
# A code point is at most 4 bytes of UTF-8: below a quarter of the limit in characters, a value
# cannot be too large and its bytes need not be counted.
_MAX_UTF8_BYTES_PER_CHAR = 4


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """A key template such as ``user:{id}``; ``{{`` and ``}}`` stand for literal braces."""

    text: str
    columns: tuple[str, ...]
    _format: str
    # A one-column template is rendered as prefix + value + suffix: a third of str.format's cost
    # on the hot path of nearly every rule.
    _prefix: str = ""
    _suffix: str = ""

    @classmethod
    def parse(cls, text: str) -> KeyTemplate:
        """Compile ``text``; raises ValueError saying what is wrong with it."""
        if not text:
            raise ValueError("key template is empty")
        columns: list[str] = []
        pieces: list[str] = []
        literals: list[str] = []
        split = 0
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"template {text!r} is malformed: {exc}") from None
        for literal, name, spec, conversion in parsed:
            pieces.append(literal.replace("{", "{{").replace("}", "}}"))
            literals.append(literal)
            if name is None:
                continue
            split = len(literals)  # the one-column case: literals before it are the prefix
            if not name or not _is_column_name(name):
                raise ValueError(
                    f"template {text!r} has {{{name}}}: a placeholder must be a column name"
                )
            if spec or conversion:
                raise ValueError(f"template {text!r}: placeholders take no format or conversion")
            pieces.append("{" + str(len(columns)) + "}")
            columns.append(name)
        if not columns:
            raise ValueError(f"template {text!r} names no column: every row would share one key")
        if len(columns) == 1:
            prefix, suffix = "".join(literals[:split]), "".join(literals[split:])
            return cls(text, tuple(columns), "".join(pieces), prefix, suffix)
        return cls(text, tuple(columns), "".join(pieces))

    def render(self, row: Row) -> str | None:
        """The key for ``row``, or None when a key column is NULL or absent, or the key is empty."""
        if len(self.columns) == 1:
            value = row.get(self.columns[0])
            if value is None or value is UNCHANGED:
                return None
            kind = type(value)
            text = value if kind is str else str(value) if kind is int else scalar_text(value)
            return (self._prefix + text + self._suffix) or None
        parts = []
        for name in self.columns:
            value = row.get(name)
            if value is None or value is UNCHANGED:
                return None
            parts.append(scalar_text(value))
        # An empty key has no hash slot its companions could share, and no web tier asks for it.
        return self._format.format(*parts) or None


def _is_column_name(name: str) -> bool:
    # Attribute or index access ("{a.b}", "{a[0]}") would silently read Python internals.
    return not any(ch in name for ch in ".[]!:")


def parse_when(value: WhenValue | Sequence[WhenValue]) -> frozenset[Any] | Any:
    """A ``when`` value: one value, or a list meaning any of them."""
    return value


def _matches_one(actual: Any, expected: WhenValue) -> bool:
    if actual is None:
        return False
    if isinstance(expected, bool):
        if isinstance(actual, bool | int):
            return bool(actual) is expected
        return scalar_text(actual) == ("true" if expected else "false")
    if isinstance(expected, int | float):
        if isinstance(actual, bool):
            return False
        if isinstance(actual, int | float):
            return actual == expected
        try:
            return Decimal(scalar_text(actual)) == Decimal(str(expected))
        except InvalidOperation:
            return False
    return scalar_text(actual) == expected


@dataclass(slots=True)
class Rule:
    """One declared mapping from a table's rows to cache keys."""

    name: str
    table: TableRef
    keys: tuple[KeyTemplate, ...]
    action: Action = "refresh"
    format: Format = "json"
    columns: tuple[str, ...] | None = None
    watch: frozenset[str] | None = None
    ttl_ms: int = 3_600_000
    jitter: float = 0.1
    when: Mapping[str, WhenValue | tuple[WhenValue, ...]] = field(default_factory=dict)
    index: int = 0
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    _null_skips: int = 0
    _missing_warned: set[str] = field(default_factory=set)
    _too_large: int = 0

    def named_columns(self) -> dict[str, set[str]]:
        """Every column this rule names, by where it names it (for schema checks)."""
        named: dict[str, set[str]] = {}
        for i, template in enumerate(self.keys):
            for column in template.columns:
                named.setdefault(column, set()).add(f"keys[{i}]")
        for column in self.columns or ():
            named.setdefault(column, set()).add("columns")
        for column in self.watch or ():
            named.setdefault(column, set()).add("watch")
        for column in self.when:
            named.setdefault(column, set()).add("when")
        return named

    def needed_columns(self) -> frozenset[str] | None:
        """The columns this rule reads from a row; None when it stores the whole row."""
        if self.action == "refresh" and self.columns is None:
            return None
        return frozenset(self.named_columns())

    def passes(self, row: Row | None) -> bool:
        if row is None:
            return False
        if not self.when:
            return True
        for column, expected in self.when.items():
            actual = row.get(column)
            if isinstance(expected, tuple):
                if not any(_matches_one(actual, e) for e in expected):
                    return False
            elif not _matches_one(actual, expected):
                return False
        return True

    def keys_of(self, row: Row) -> list[str]:
        keys = []
        for template in self.keys:
            key = template.render(row)
            if key is None:
                absent = [c for c in template.columns if c not in row]
                if absent:
                    self._warn_missing_columns(absent, f"keys template {template.text!r}")
                else:
                    self._warn_null_key(template)
                continue
            keys.append(key)
        return keys

    def _warn_null_key(self, template: KeyTemplate) -> None:
        self._null_skips += 1
        # Nullable key columns are common (orders.coupon_id); one line per thousand keeps the
        # warning visible without flooding the log.
        if self._null_skips % _NULL_WARNING_EVERY == 1:
            log.warning(
                "key_skipped_null_column",
                rule=self.name,
                template=template.text,
                columns=list(template.columns),
                skipped_total=self._null_skips,
            )

    def ttl_for_write(self) -> int:
        if self.jitter <= 0:
            return self.ttl_ms
        # Jitter only shortens, so the declared TTL is an upper bound on staleness by expiry.
        return max(1, int(self.ttl_ms * (1.0 - self.jitter * random.random())))

    def _warn_missing_columns(self, columns: list[str], where: str) -> None:
        # A DDL (DROP/RENAME COLUMN) while the worker runs: say so once per column, not per row.
        fresh = [c for c in columns if c not in self._missing_warned]
        if fresh:
            self._missing_warned.update(fresh)
            log.warning(
                "rule_column_missing",
                rule=self.name,
                table=str(self.table),
                columns=fresh,
                where=where,
                hint="the table no longer has these columns; update the rule",
            )

    def payload(self, row: Row) -> str | tuple[tuple[str, str], ...]:
        if self.columns is not None:
            projected = {c: row[c] for c in self.columns if c in row}
            if len(projected) < len(self.columns):
                self._warn_missing_columns([c for c in self.columns if c not in row], "columns")
            row = projected
        return encode_json(row) if self.format == "json" else encode_hash(row)

    def _watched_changed(self, before: Row, after: Row) -> bool:
        assert self.watch is not None
        return any(before.get(c) != after.get(c) for c in self.watch)

    def _plain_evict_actions(self, change: RowChange) -> list[CacheAction]:
        """``actions_for`` of an evict rule without ``when`` or ``watch``, on full images: the
        keys of the old row, then those of the new one, each evicted once."""
        before, after = change.before, change.after
        if after is not None and change.op is Op.DELETE:
            after = None
        name, version = self.name, change.version
        if len(self.keys) == 1:
            # One template: one key per image, so no list building or de-duplication. A row
            # that renders no key goes the long way, which says why.
            render = self.keys[0].render
            old = render(before) if before is not None else None
            new = render(after) if after is not None else None
            if (old is not None or before is None) and (new is not None or after is None):
                if old is None or old == new:
                    return [Evict(new, name, version)] if new is not None else []
                if new is None:
                    return [Evict(old, name, version)]
                return [Evict(old, name, version), Evict(new, name, version)]
        keys = self.keys_of(before) if before is not None else []
        if after is not None:
            keys += self.keys_of(after)
        return [Evict(key, name, version) for key in dict.fromkeys(keys)]

    def _plain_refresh_actions(self, change: RowChange) -> list[CacheAction] | None:
        """``actions_for`` of a one-template refresh rule without ``when`` or ``watch``, on
        full images: evict the old row's key if the new row moved it, refresh the new row's key.
        None when an image renders no key, or the value is too large: the long way says why."""
        before, after = change.before, change.after
        if change.op is Op.DELETE:
            after = None
        render = self.keys[0].render
        old = render(before) if before is not None else None
        new = render(after) if after is not None else None
        if (old is None and before is not None) or (new is None and after is not None):
            return None
        name, version = self.name, change.version
        actions: list[CacheAction] = []
        if old is not None and old != new:
            actions.append(Evict(old, name, version))
        if after is None or new is None:
            return actions
        value = self.payload(after)
        if self._oversize(value) is not None:
            return None
        actions.append(Refresh(new, value, self.ttl_for_write(), version, name))
        return actions

    def actions_for(self, change: RowChange) -> list[CacheAction]:
        if not self.when and self.watch is None and not change.partial:
            if self.action == "evict":
                return self._plain_evict_actions(change)
            if len(self.keys) == 1:
                plain = self._plain_refresh_actions(change)
                if plain is not None:
                    return plain
        return self._general_actions(change)

    def _general_actions(self, change: RowChange) -> list[CacheAction]:
        """``actions_for`` for every rule and change; the plain paths are shortcuts of it."""
        op = change.op
        full_after = _fill_unchanged(change) if change.partial else change.after
        before = change.before if self.passes(change.before) else None
        after = full_after if op is not Op.DELETE and self.passes(full_after) else None
        old_keys = self.keys_of(before) if before is not None else []
        new_keys = self.keys_of(after) if after is not None else []

        if (
            op is Op.UPDATE
            and self.watch is not None
            and change.before is not None
            and full_after is not None
            and old_keys == new_keys
            and (before is None) == (after is None)
            and not self._watched_changed(change.before, full_after)
        ):
            return []

        version = change.version
        actions: list[CacheAction] = []
        if op is Op.UPDATE and change.before is None and after is None and full_after is not None:
            # No old image (Postgres DEFAULT replica identity) and the new row fails `when`: it
            # may have just left the filter, so its keys must not keep the old value.
            return [
                Evict(key, self.name, version) for key in dict.fromkeys(self.keys_of(full_after))
            ]
        if self.action == "evict" or after is None:
            seen: set[str] = set()
            for key in (*old_keys, *new_keys):
                if key not in seen:
                    seen.add(key)
                    actions.append(Evict(key, self.name, version))
            return actions
        new_set = set(new_keys)
        for key in old_keys:
            if key not in new_set:
                actions.append(Evict(key, self.name, version))
        if change.partial and self._misses_values(after):
            # The log left out a value we would store (unchanged TOAST) and the old image has
            # none: a placeholder must never reach Redis, so the readers reload from the database.
            actions.extend(Evict(key, self.name, version) for key in dict.fromkeys(new_keys))
            return actions
        value = self.payload(after)
        size = self._oversize(value)
        if size is not None:
            self._warn_too_large(new_keys, size)
            actions.extend(Evict(key, self.name, version) for key in dict.fromkeys(new_keys))
            return actions
        for key in dict.fromkeys(new_keys):
            actions.append(Refresh(key, value, self.ttl_for_write(), version, self.name))
        return actions

    def _oversize(self, value: str | tuple[tuple[str, str], ...]) -> int | None:
        """The payload's size in bytes when it is over ``max_value_bytes``, else None."""
        limit = self.max_value_bytes
        if isinstance(value, str):
            if len(value) * _MAX_UTF8_BYTES_PER_CHAR <= limit:
                return None
            size = utf8_length(value)
        else:
            chars = sum(len(name) + len(text) for name, text in value)
            if chars * _MAX_UTF8_BYTES_PER_CHAR <= limit:
                return None
            size = sum(utf8_length(name) + utf8_length(text) for name, text in value)
        return size if size > limit else None

    def _warn_too_large(self, keys: Sequence[str], size: int) -> None:
        self._too_large += 1
        # One oversized row tends to be updated often; a line per thousand keeps it visible.
        if self._too_large % _TOO_LARGE_WARNING_EVERY == 1:
            log.warning(
                "value_too_large",
                rule=self.name,
                key=keys[0] if keys else None,
                keys=len(keys),
                bytes=size,
                limit=self.max_value_bytes,
                too_large_total=self._too_large,
            )

    def renderable_keys(self, change: RowChange) -> list[str]:
        """Every key of this rule that the change's rows still render, ignoring ``when``.

        The fallback after the rule failed on the change: evicting a key the rule would not have
        touched costs a cache miss, keeping one it would have touched may serve stale data.
        """
        keys: list[str] = []
        for row in (change.before, change.after):
            if not row:
                continue
            for template in self.keys:
                try:
                    key = template.render(row)
                except Exception:  # the value that broke the rule may break its key too
                    continue
                if key is not None:
                    keys.append(key)
        return list(dict.fromkeys(keys))

    def _misses_values(self, row: Row) -> bool:
        names = self.columns if self.columns is not None else row.keys()
        return any(row.get(name) is UNCHANGED for name in names)


def utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8; a lone surrogate counts as the 3 bytes it would take."""
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """A rule raised on a change: what the dead-letter stream records about it.

    ``evicted`` are the keys the rule could still render, whose evictions ``RuleSet.evaluate``
    returned in place of the rule's actions.
    """

    rule: str
    change: RowChange
    error: str
    evicted: tuple[str, ...] = ()


def _fill_unchanged(change: RowChange) -> Row | None:
    """``after`` with UNCHANGED values taken from ``before`` where the old image has them."""
    after, before = change.after, change.before
    if after is None or not before:
        return after
    return {
        name: (before.get(name, value) if value is UNCHANGED else value)
        for name, value in after.items()
    }


_NO_FAILURES: tuple[RuleFailure, ...] = ()


def _failure(rule: Rule, change: RowChange, exc: Exception) -> RuleFailure:
    return RuleFailure(
        rule=rule.name,
        change=change,
        error=f"{type(exc).__name__}: {exc}",
        evicted=tuple(rule.renderable_keys(change)),
    )


def _evictions(failure: RuleFailure, version: int) -> list[CacheAction]:
    return [Evict(key, failure.rule, version) for key in failure.evicted]


class RuleSet:
    """All rules, indexed by table."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules: list[Rule] = list(rules)
        self._by_table: dict[TableRef, list[Rule]] = {}
        for rule in self.rules:
            self._by_table.setdefault(rule.table, []).append(rule)
        self._truncate_warned: set[TableRef] = set()
        self._last: tuple[TableRef | None, list[Rule] | None] = (None, None)

    @property
    def tables(self) -> list[TableRef]:
        return list(self._by_table)

    def needed_columns(self) -> dict[TableRef, frozenset[str]]:
        """The columns the rules read, for each table whose rules do not store whole rows.

        A source may leave every other column out of the row images it hands over (decoding a
        value nobody reads is most of a source's work on wide rows); a table missing from the
        result needs all its columns.
        """
        needed: dict[TableRef, frozenset[str]] = {}
        for table, rules in self._by_table.items():
            columns: set[str] = set()
            for rule in rules:
                named = rule.needed_columns()
                if named is None:
                    break
                columns |= named
            else:
                needed[table] = frozenset(columns)
        return needed

    def needed_old_columns(self, watch: bool = True) -> dict[TableRef, frozenset[str]]:
        """The columns the rules read from the old row image of an UPDATE or DELETE, per table.

        Key template columns (to evict the old keys), ``when`` columns (to notice a row that
        stopped matching) and, with ``watch``, ``watch`` columns (to skip an update that changed
        none of them): a refreshed value is always the new row's. A source whose old images are
        complete may leave every other column out of them, as it may for ``needed_columns``.
        Without ``watch`` it is what old images must carry for correct keys (a missing watch
        column only costs a refresh that could have been skipped).
        """
        needed: dict[TableRef, frozenset[str]] = {}
        for table, rules in self._by_table.items():
            columns: set[str] = set()
            for rule in rules:
                for template in rule.keys:
                    columns.update(template.columns)
                columns.update(rule.when)
                if watch:
                    columns.update(rule.watch or ())
            needed[table] = frozenset(columns)
        return needed

    def rules_for(self, table: TableRef) -> list[Rule]:
        return self._by_table.get(table, [])

    def actions_for(self, change: RowChange) -> list[CacheAction]:
        """The change's actions; raises RuleError when a rule fails on it (see ``evaluate``)."""
        actions, failures = self.evaluate(change)
        if failures:
            first = failures[0]
            raise RuleError(f"rule {first.rule!r} failed on a change: {first.error}")
        return actions

    def evaluate(self, change: RowChange) -> tuple[list[CacheAction], Sequence[RuleFailure]]:
        """The change's actions and the rules that failed on it, without raising.

        A failing rule contributes evictions of the keys it can still render, so its cache keys
        do not keep a value the change made stale; the other rules of the table are unaffected.
        """
        # Sources hand over one TableRef object per table, so the last lookup usually answers
        # by identity, without hashing and comparing two dataclasses per change.
        last_table, rules = self._last
        if change.table is not last_table:
            rules = self._by_table.get(change.table)
            self._last = (change.table, rules)
        if not rules:
            return [], _NO_FAILURES
        if change.op is Op.TRUNCATE:
            if change.table not in self._truncate_warned:
                self._truncate_warned.add(change.table)
                log.warning(
                    "truncate_not_applied",
                    table=str(change.table),
                    rules=[r.name for r in rules],
                    hint="keys of a truncated table cannot be enumerated; they expire by TTL",
                )
            return [], _NO_FAILURES
        if len(rules) == 1:
            try:
                return rules[0].actions_for(change), _NO_FAILURES
            except Exception as exc:  # data-dependent: one bad row must not stop the worker
                failure = _failure(rules[0], change, exc)
                return _evictions(failure, change.version), (failure,)
        actions: list[CacheAction] = []
        failures: list[RuleFailure] = []
        for rule in rules:
            try:
                actions.extend(rule.actions_for(change))
            except Exception as exc:  # data-dependent: one bad row must not stop the worker
                failure = _failure(rule, change, exc)
                failures.append(failure)
                actions.extend(_evictions(failure, change.version))
        return actions, failures

    def problems_with_columns(self, columns: Mapping[TableRef, Sequence[str] | None]) -> list[str]:
        """One line per rule field that names a table or column the source lacks."""
        problems: list[str] = []
        for rule in self.rules:
            available = columns.get(rule.table)
            if available is None:
                problems.append(
                    f"rules[{rule.index}].table: table {rule.table} does not exist "
                    f"(rule {rule.name!r})"
                )
                continue
            have = set(available)
            for i, template in enumerate(rule.keys):
                for column in template.columns:
                    if column not in have:
                        problems.append(
                            f"rules[{rule.index}].keys[{i}]: template {template.text!r} names "
                            f"column {column!r}, which table {rule.table} does not have"
                        )
            for where, names in (
                ("columns", rule.columns or ()),
                ("watch", sorted(rule.watch or ())),
                ("when", list(rule.when)),
            ):
                for column in names:
                    if column not in have:
                        problems.append(
                            f"rules[{rule.index}].{where}: column {column!r} is not in table "
                            f"{rule.table}"
                        )
        return problems
