"""In-memory doubles of the core's ports, for unit tests of the run loop and rules.

``MemorySource`` replays a scripted list of transactions and heartbeats, ``MemorySink`` keeps a
dict that behaves like the Redis sink's versioned writes (a lower version never overwrites), and
``MemoryCheckpointStore`` remembers one position. They are doubles of our own interfaces, not of
Redis or a database: integration tests use the real servers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from worker.actions import CacheAction, Evict, Refresh
from worker.errors import SinkUnavailable
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
    """A dict cache with versioned refreshes; can be told to fail the next N applies."""

    values: dict[str, object] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    applied: list[list[CacheAction]] = field(default_factory=list)
    fail_next: int = 0
    stale_refusals: int = 0

    def apply(self, actions: Sequence[CacheAction]) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SinkUnavailable("memory sink told to fail")
        self.applied.append(list(actions))
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
