"""Dead letters: the changes the cache kept refusing, recorded for inspection and replay.

A ``DeadLetter`` is one entry of the dead-letter stream: a cache action Redis refused for good
(after the run loop's retries), or a change a rule could not turn into actions. This module owns
the entry's shape and its flat text fields (what the store keeps), building entries from refused
actions and rule failures, turning entries back into actions, and ``replay``, which re-applies a
store's entries through a sink and deletes those that succeed. The store itself is a port
(``worker.interfaces.DeadLetterStore``); the Redis stream lives in ``connectors.redis``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.actions import CacheAction, Evict, Refresh
from worker.encoding import encode_json
from worker.errors import PartialApplyError
from worker.events import UNCHANGED, Row, RowChange
from worker.redact import redact_url
from worker.rules import RuleFailure

if TYPE_CHECKING:
    from worker.interfaces import DeadLetterStore, Sink

# An error text is for a human to read; a whole Lua traceback or a long driver message adds
# nothing and every entry stores it.
_MAX_ERROR_CHARS = 1000
REPLAY_PAGE = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry.

    ``action`` is ``refresh``, ``evict`` or ``rule`` (a rule failed on the change; ``key`` is
    empty and ``value`` describes the change). For a refresh, ``value`` is the payload: the JSON
    text (``format = "json"``) or the JSON of the hash's ``[field, value]`` pairs
    (``format = "hash"``), and ``ttl_ms`` the TTL it was written with. ``at`` is ISO 8601 UTC.
    ``id`` is the store's id, empty until stored.
    """

    key: str
    rule: str
    action: str
    version: int
    error: str
    at: str
    value: str = ""
    format: str = ""
    ttl_ms: int = 0
    id: str = field(default="", compare=False)

    def fields(self) -> dict[str, str]:
        """The entry as flat text fields, the way the store keeps it (``id`` excluded)."""
        return {
            "key": self.key,
            "rule": self.rule,
            "action": self.action,
            "version": str(self.version),
            "value": self.value,
            "format": self.format,
            "ttl_ms": str(self.ttl_ms),
            "error": self.error,
            "at": self.at,
        }

    @classmethod
    def from_fields(cls, entry_id: str, data: Mapping[str, str]) -> DeadLetter:
        """Parse stored fields; a missing or malformed number reads as 0."""
        return cls(
            key=data.get("key", ""),
            rule=data.get("rule", ""),
            action=data.get("action", ""),
            version=_int(data.get("version")),
            error=data.get("error", ""),
            at=data.get("at", ""),
            value=data.get("value", ""),
            format=data.get("format", ""),
            ttl_ms=_int(data.get("ttl_ms")),
            id=entry_id,
        )


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def clean_error(text: str) -> str:
    """The error as it may be stored: URL passwords masked, bounded length."""
    text = redact_url(text)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def from_action(action: CacheAction, error: str, at: str | None = None) -> DeadLetter:
    """The entry for an action the sink kept refusing."""
    at = at or now_iso()
    if isinstance(action, Refresh):
        value = action.value
        if isinstance(value, str):
            text, fmt = value, "json"
        else:
            text, fmt = json.dumps([list(pair) for pair in value], ensure_ascii=False), "hash"
        return DeadLetter(
            key=action.key,
            rule=action.rule,
            action="refresh",
            version=action.version,
            error=clean_error(error),
            at=at,
            value=text,
            format=fmt,
            ttl_ms=action.ttl_ms,
        )
    return DeadLetter(
        key=action.key,
        rule=action.rule,
        action="evict",
        version=action.version,
        error=clean_error(error),
        at=at,
    )


def from_rule_failure(failure: RuleFailure, at: str | None = None) -> DeadLetter:
    """The entry for a change a rule failed on; ``value`` is a JSON description of the change."""
    change = failure.change
    return DeadLetter(
        key="",
        rule=failure.rule,
        action="rule",
        version=change.version,
        error=clean_error(failure.error),
        at=at or now_iso(),
        value=describe_change(change),
    )


def describe_change(change: RowChange) -> str:
    """op, table and both rows as JSON; a value JSON cannot carry is given as its ``repr``."""
    return json.dumps(
        {
            "op": change.op.value,
            "table": str(change.table),
            "before": _json_safe_row(change.before),
            "after": _json_safe_row(change.after),
        },
        ensure_ascii=False,
    )


def _json_safe_row(row: Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    safe: dict[str, Any] = {}
    for name, value in row.items():
        if value is UNCHANGED:
            safe[name] = repr(value)
            continue
        try:
            # The worker's own encoding, so the entry shows what a refresh would have stored.
            safe[name] = json.loads(encode_json({"v": value}))["v"]
        except (TypeError, ValueError):
            safe[name] = repr(value)
    return safe


def to_action(entry: DeadLetter) -> CacheAction | None:
    """The action that replays ``entry``; None for a rule entry or a malformed one."""
    if entry.action == "evict" and entry.key:
        return Evict(entry.key, entry.rule, entry.version)
    if entry.action != "refresh" or not entry.key or entry.ttl_ms <= 0:
        return None
    if entry.format == "json":
        return Refresh(entry.key, entry.value, entry.ttl_ms, entry.version, entry.rule)
    if entry.format == "hash":
        try:
            pairs = json.loads(entry.value)
            value = tuple((str(name), str(text)) for name, text in pairs)
        except (TypeError, ValueError):
            return None
        return Refresh(entry.key, value, entry.ttl_ms, entry.version, entry.rule)
    return None


@dataclass
class ReplayResult:
    """What ``replay`` did: entries applied (and deleted), refused again, and not replayable."""

    replayed: int = 0
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    skipped: list[DeadLetter] = field(default_factory=list)


def replay(store: DeadLetterStore, sink: Sink, page: int = REPLAY_PAGE) -> ReplayResult:
    """Re-apply every entry of ``store`` through ``sink`` in stream order.

    Refreshes keep their version, so a key Redis holds at a newer version is left alone (and the
    entry counts as replayed). Applied entries are deleted; refused ones stay with their
    original error; rule entries and malformed ones are skipped and stay. ``SinkUnavailable``
    and other sink errors propagate, after deleting what was applied before them.
    """
    result = ReplayResult()
    start = "-"
    while True:
        entries = list(store.list(page, start))
        if not entries:
            return result
        # Exclusive range: entries refused again stay put and must not be read twice.
        start = "(" + entries[-1].id
        actions: list[CacheAction] = []
        owners: dict[int, DeadLetter] = {}
        for entry in entries:
            action = to_action(entry)
            if action is None:
                result.skipped.append(entry)
                continue
            actions.append(action)
            owners[id(action)] = entry
        refused: dict[int, str] = {}
        if actions:
            try:
                sink.apply(actions)
            except PartialApplyError as exc:
                refused = {id(action): error for action, error in exc.failed}
        done: list[str] = []
        for action in actions:
            entry = owners[id(action)]
            if id(action) in refused:
                result.failed.append((entry, refused[id(action)]))
            else:
                done.append(entry.id)
        if done:
            store.delete(done)
            result.replayed += len(done)
        if len(entries) < page:
            return result


def entries_for(
    refused: Sequence[tuple[CacheAction, str]], failures: Sequence[RuleFailure]
) -> list[DeadLetter]:
    """The entries for one batch: its rule failures, then its refused actions."""
    at = now_iso()
    return [
        *(from_rule_failure(failure, at) for failure in failures),
        *(from_action(action, error, at) for action, error in refused),
    ]
