"""The change events that flow from a source to the rules: ``RowChange`` grouped in ``Transaction``.

A ``Position`` is a point in one source's log. Its ``coords`` are source-specific (binlog file and
offset plus GTID; LSN; outbox id) and only the source that made it interprets them; ``version`` is
a monotonic integer the core uses to order positions and to version cache writes, so a replayed
change never moves a Redis key backwards.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]


class _Unchanged:
    """The type of ``UNCHANGED``."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
"""A column value the log did not carry because it did not change (Postgres unchanged TOAST).

Never written to Redis: rules take the value from the old image, or evict instead of refreshing.
"""


class Op(enum.Enum):
    """What a row change did."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"


@dataclass(frozen=True, slots=True)
class TableRef:
    """A table as ``schema.name`` (MySQL database or Postgres schema)."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableRef:
        schema, sep, name = text.partition(".")
        if not sep or not schema or not name or "." in name:
            raise ValueError(f"table {text!r} is not of the form schema.table")
        return cls(schema, name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Position:
    """A point in a source's log; ordered by ``version``.

    ``coords`` must be JSON-serialisable: it is what the checkpoint stores.
    """

    version: int
    coords: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __lt__(self, other: Position) -> bool:
        return self.version < other.version

    def __le__(self, other: Position) -> bool:
        return self.version <= other.version

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, **self.coords}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Position:
        coords = {k: v for k, v in data.items() if k != "version"}
        return cls(version=int(data["version"]), coords=coords)


# Not frozen, though never changed once made: a frozen dataclass sets each field through
# object.__setattr__, which made building one cost five times as much, and sources build one
# per row (as rules build an action per key).
@dataclass(slots=True)
class RowChange:
    """One row changed by one statement; a value, never changed once made.

    ``before``/``after`` map column names to Python values; ``None`` where the log carries no image
    (no ``before`` for INSERT, no ``after`` for DELETE). ``version`` orders the change against other
    changes of the same source (it is the version of the transaction's start).
    """

    op: Op
    table: TableRef
    before: Row | None
    after: Row | None
    version: int
    partial: bool = False
    """``after`` holds ``UNCHANGED`` values (sources set this so rules need not scan every row)."""


@dataclass(frozen=True, slots=True)
class Transaction:
    """What one commit did, or one chunk of a very large commit.

    ``position`` is where to resume after this transaction. It is ``None`` for every chunk of a
    large transaction except the last, because a position may only be checkpointed at a
    transaction boundary.
    """

    changes: list[RowChange]
    position: Position | None
    committed_at: float | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The source passed ``position`` without changes the rules care about.

    ``caught_up`` says the source reached the end of the log and is idle there (burst mode stops
    on it); a heartbeat with ``caught_up=False`` only moves the checkpoint past irrelevant log.
    ``position`` is always a transaction boundary. ``flush`` says the source sends nothing more
    for a moment (it waits for an ack, or for its next read), so the run loop applies its batch
    now instead of waiting for more.
    """

    position: Position | None
    caught_up: bool = False
    flush: bool = False


SourceItem = Transaction | Heartbeat
