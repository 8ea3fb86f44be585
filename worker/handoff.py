"""The bounded hand-off between the source thread and the apply loop.

A FIFO limited two ways: in items (transactions and heartbeats parsed ahead) and in rows. The
item limit alone let a backlog of bulk statements, each chunked into thousands of rows, queue
hundreds of megabytes of decoded rows while Redis was the slower side; the row limit keeps the
worker's memory flat whatever the transaction sizes. One item larger than the row limit still
passes when the queue is empty, so a huge chunk cannot stall the stream.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

_T = TypeVar("_T")


class Handoff(Generic[_T]):
    """Put from one thread, get from another; both sides wait with timeouts, never forever.

    One producer and one consumer. Neither takes a lock while it need not wait: a lock per put
    and per get, contended by the other thread at every switch of the interpreter lock, cost
    more than the rest of the hand-off of a 1-row transaction. The deque's append and popleft
    are atomic, and each row counter has one writer (``_put_rows`` the producer, ``_got_rows``
    the consumer). A side that must wait registers itself under the condition's lock and then
    looks again; the other side changes the queue first and then looks for a waiter, taking the
    lock only to wake one, so a wake-up cannot be lost between the look and the wait.
    """

    def __init__(self, max_items: int, max_rows: int) -> None:
        self._items: deque[tuple[_T, int]] = deque()
        self._put_rows = 0
        self._got_rows = 0
        self._max_items = max(1, max_items)
        self._max_rows = max(1, max_rows)
        self._changed = threading.Condition(threading.Lock())
        self._putters = 0
        self._getters = 0

    def put(self, item: _T, rows: int, timeout: float) -> bool:
        """Append ``item`` (carrying ``rows`` rows); False if it did not fit within ``timeout``."""
        if self._full(rows):
            with self._changed:
                self._putters += 1
                try:
                    if not self._changed.wait_for(lambda: not self._full(rows), timeout):
                        return False
                finally:
                    self._putters -= 1
        self._items.append((item, rows))
        self._put_rows += rows
        if self._getters:
            with self._changed:
                self._changed.notify_all()
        return True

    def get(self, timeout: float) -> _T | None:
        """The oldest item, waiting up to ``timeout`` (0: not at all); None if there is none."""
        if not self._items:
            if timeout <= 0:
                return None
            with self._changed:
                self._getters += 1
                try:
                    if not self._changed.wait_for(lambda: bool(self._items), timeout):
                        return None
                finally:
                    self._getters -= 1
        item, rows = self._items.popleft()
        self._got_rows += rows
        if self._putters:
            with self._changed:
                self._changed.notify_all()
        return item

    def _full(self, rows: int) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self._max_items or self.rows + rows > self._max_rows

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    @property
    def rows(self) -> int:
        return self._put_rows - self._got_rows
