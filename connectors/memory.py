"""In-memory doubles of the core's ports, for unit tests of the run loop and rules.

``MemorySource`` replays a scripted list of transactions and heartbeats, ``MemorySink`` keeps a
dict that behaves like the Redis sink's versioned writes (a lower version never overwrites) and
can refuse chosen keys the way Redis refuses a NOPERM key, ``MemoryCheckpointStore`` remembers one
position and ``MemoryDeadLetterStore`` keeps dead letters in a list. They are doubles of our own
interfaces, not of Redis or a database: integration tests use the real servers.
"""

from __future__ import annotations

import builtins
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from worker.actions import CacheAction, Evict, Refresh
from worker.dead_letters import DeadLetter
from worker.errors import PartialApplyError, SinkError, SinkUnavailable
from worker.events import Heartbeat, Position, SourceItem, TableRef
from worker.interfaces import CheckResult


class MemorySource:
    """Yields scripted items after the start position, then idles until closed."""

    def __init__(
        self,
        items: Sequence[SourceItem],
        columns: dict[TableRef, list[str]] | None = None,
        initial: Position | None = None,
    ) -> None:
        self.items = list(items)
        self.tables = columns or {}
        self.initial = initial or Position(0, {"index": 0})
        self.acked: list[Position] = []
        self.started_from: Position | None = None
        self._closed = threading.Event()

    def initial_position(self) -> Position:
        return self.initial

    def stream(self, start: Position) -> Iterator[SourceItem]:
        self.started_from = start
        for item in self.items:
            if self._closed.is_set():
                return
            position = item.position
            if position is not None and position.version <= start.version:
                continue
            yield item
        last = self.items[-1].position if self.items else start
        yield Heartbeat(last, caught_up=True)
        self._closed.wait()

    def ack(self, position: Position) -> None:
        self.acked.append(position)

    def columns(self, table: TableRef) -> list[str] | None:
        return self.tables.get(table)

    def checks(self) -> list[CheckResult]:
        return [CheckResult("memory source", True)]

    def close(self) -> None:
        self._closed.set()


@dataclass
class MemorySink:
    """A dict cache with versioned refreshes; can be told to fail the next N applies.

    ``refuse`` maps keys to the error every action on them fails with (``refuse_evicts = False``
    refuses only refreshes), as Redis refuses a key the ACL forbids: the rest of the batch is
    applied and ``PartialApplyError`` names the refused actions, which ``refused`` records.
    """

    values: dict[str, object] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    applied: list[list[CacheAction]] = field(default_factory=list)
    fail_next: int = 0
    stale_refusals: int = 0
    refuse: dict[str, str] = field(default_factory=dict)
    refuse_evicts: bool = True
    refused: list[CacheAction] = field(default_factory=list)

    def apply(self, actions: Sequence[CacheAction]) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SinkUnavailable("memory sink told to fail")
        failed: list[tuple[CacheAction, str]] = []
        accepted: list[CacheAction] = []
        for action in actions:
            error = self.refuse.get(action.key)
            if error is not None and (self.refuse_evicts or isinstance(action, Refresh)):
                failed.append((action, error))
            else:
                accepted.append(action)
        self._apply(accepted)
        if failed:
            self.refused.extend(action for action, _ in failed)
            raise PartialApplyError(f"memory sink refused {len(failed)} actions", failed)

    def _apply(self, actions: list[CacheAction]) -> None:
        self.applied.append(actions)
        for action in actions:
            if isinstance(action, Evict):
                self.values.pop(action.key, None)
                self.versions.pop(action.key, None)
            elif isinstance(action, Refresh):
                if self.versions.get(action.key, -1) > action.version:
                    self.stale_refusals += 1
                    continue
                self.values[action.key] = action.value
                self.versions[action.key] = action.version

    def checks(self) -> list[CheckResult]:
        return [CheckResult("memory sink", True)]

    def close(self) -> None:
        pass


@dataclass
class MemoryCheckpointStore:
    """Remembers the last saved position and every save."""

    position: Position | None = None
    saves: list[Position] = field(default_factory=list)

    def load(self) -> Position | None:
        return self.position

    def save(self, position: Position) -> None:
        self.position = position
        self.saves.append(position)


@dataclass
class MemoryDeadLetterStore:
    """Dead letters in a list, with stream-like ids ``"<n>-0"``; can be told to fail adds."""

    entries: builtins.list[DeadLetter] = field(default_factory=builtins.list)
    fail_adds: bool = False
    _next: int = 1

    def add(self, entries: Sequence[DeadLetter]) -> builtins.list[str]:
        if self.fail_adds:
            raise SinkError("memory dead-letter store told to fail")
        ids = []
        for entry in entries:
            entry_id = f"{self._next}-0"
            self._next += 1
            self.entries.append(dataclasses.replace(entry, id=entry_id))
            ids.append(entry_id)
        return ids

    def delete(self, ids: Sequence[str]) -> int:
        before = len(self.entries)
        gone = set(ids)
        self.entries = [e for e in self.entries if e.id not in gone]
        return before - len(self.entries)

    def purge(self) -> int:
        count = len(self.entries)
        self.entries = []
        return count

    def list(self, count: int, start: str = "-") -> builtins.list[DeadLetter]:
        exclusive = start.startswith("(")
        bound = _id_number(start.lstrip("(")) if start != "-" else 0
        chosen = [
            e
            for e in self.entries
            if _id_number(e.id) > bound or (not exclusive and _id_number(e.id) == bound)
        ]
        return chosen[:count]


def _id_number(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])
