"""The ports the run loop talks to: ``Source``, ``Sink``, ``CheckpointStore``, ``DeadLetterStore``.

Adapters in ``connectors/`` implement them against real systems; ``connectors.memory`` holds the
in-memory doubles unit tests use. The core depends on these protocols only, never on a driver.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.actions import CacheAction
from worker.dead_letters import DeadLetter
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
    """Applies cache actions to the cache.

    ``apply`` returns when every action was applied (a refresh refused as stale counts as
    applied). It raises ``SinkUnavailable`` when the cache cannot be reached (nothing or anything
    may have been applied; every action is idempotent, so the caller sends them all again), and
    ``PartialApplyError`` naming the actions the cache refused for good when the others were
    applied.
    """

    def apply(self, actions: Sequence[CacheAction]) -> None: ...

    def checks(self) -> list[CheckResult]: ...

    def close(self) -> None: ...


class CheckpointStore(Protocol):
    """Durably remembers the last applied position of one source."""

    def load(self) -> Position | None: ...

    def save(self, position: Position) -> None: ...


class DeadLetterStore(Protocol):
    """Keeps dead-letter entries in arrival order, each under an id the store assigns.

    Ids order like the entries; ``list``'s ``start`` is an id to start at (inclusive), ``-`` for
    the oldest, or ``(`` followed by an id to start after it.
    """

    def add(self, entries: Sequence[DeadLetter]) -> Sequence[str]:
        """Append the entries; their new ids, in order."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove the entries with these ids; how many existed."""
        ...

    def purge(self) -> int:
        """Remove every entry; how many there were."""
        ...

    def list(self, count: int, start: str = "-") -> Sequence[DeadLetter]:
        """Up to ``count`` entries from ``start`` on, oldest first."""
        ...
