"""The bounded hand-off between the source thread and the apply loop.

A FIFO limited two ways: in items (transactions and heartbeats parsed ahead) and in rows. The
item limit alone let a backlog of bulk statements, each chunked into thousands of rows, queue
hundreds of megabytes of decoded rows while Redis was the slower side; the row limit keeps the
worker's memory flat whatever the transaction sizes. One item larger than the row limit still
passes when the queue is empty, so a huge chunk cannot stall the stream.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

_T = TypeVar("_T")


class Handoff(Generic[_T]):
    """Put from one thread, get from another; both sides wait with timeouts, never forever."""

    def __init__(self, max_items: int, max_rows: int) -> None:
        self._items: deque[tuple[_T, int]] = deque()
        self._rows = 0
        self._max_items = max(1, max_items)
        self._max_rows = max(1, max_rows)
        self._changed = threading.Condition(threading.Lock())

    def put(self, item: _T, rows: int, timeout: float) -> bool:
        """Append ``item`` (carrying ``rows`` rows); False if it did not fit within ``timeout``."""
        with self._changed:
            if self._full(rows):
                deadline = time.monotonic() + timeout
                while self._full(rows):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._changed.wait(remaining)
            self._items.append((item, rows))
            self._rows += rows
            self._changed.notify_all()
            return True

    def get(self, timeout: float) -> _T | None:
        """The oldest item, waiting up to ``timeout`` (0: not at all); None if there is none."""
        with self._changed:
            if not self._items:
                if timeout <= 0:
                    return None
                deadline = time.monotonic() + timeout
                while not self._items:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._changed.wait(remaining)
            item, rows = self._items.popleft()
            self._rows -= rows
            self._changed.notify_all()
            return item

    def _full(self, rows: int) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self._max_items or self._rows + rows > self._max_rows

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    @property
    def rows(self) -> int:
        return self._rows
