"""The three ports the run loop talks to: ``Source``, ``Sink`` and ``CheckpointStore``.

Adapters in ``connectors/`` implement them against real systems; ``connectors.memory`` holds the
in-memory doubles unit tests use. The core depends on these protocols only, never on a driver.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.actions import CacheAction
from worker.events import Position, SourceItem, TableRef


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of ``cache-worker check``: what was checked, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str = ""
    warning: bool = False


class Source(Protocol):
    """Reads committed changes from a database log, in commit order.

    ``stream`` runs on the source thread and blocks while the log is idle; it yields a
    ``Heartbeat`` when it is caught up so the loop can go idle, and raises ``SourceUnavailable``
    only after its own reconnect attempts failed.
    """

    def initial_position(self) -> Position:
        """Where to start when there is no checkpoint (the ``start`` setting: end or beginning)."""
        ...

    def stream(self, start: Position) -> Iterator[SourceItem]:
        """Yield transactions and heartbeats after ``start`` until closed."""
        ...

    def ack(self, position: Position) -> None:
        """``position`` is durably applied: the source may release what precedes it."""
        ...

    def columns(self, table: TableRef) -> list[str] | None:
        """The table's column names, or ``None`` when the table does not exist."""
        ...

    def checks(self) -> list[CheckResult]:
        """Preflight checks: reachability, log settings, privileges."""
        ...

    def close(self) -> None:
        """Stop streaming and release connections; safe to call from another thread."""
        ...


class Sink(Protocol):
    """Applies cache actions to the cache, all of them or raising."""

    def apply(self, actions: Sequence[CacheAction]) -> None: ...

    def checks(self) -> list[CheckResult]: ...

    def close(self) -> None: ...


class CheckpointStore(Protocol):
    """Durably remembers the last applied position of one source."""

    def load(self) -> Position | None: ...

    def save(self, position: Position) -> None: ...
