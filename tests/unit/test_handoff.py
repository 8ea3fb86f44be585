"""Unit tests of ``worker.handoff.Handoff``: FIFO order and its item and row limits."""

from __future__ import annotations

import threading

from worker.handoff import Handoff


def test_fifo_and_empty_get_returns_none() -> None:
    handoff: Handoff[str] = Handoff(max_items=10, max_rows=100)
    assert handoff.get(0) is None
    for name in ("a", "b", "c"):
        assert handoff.put(name, 1, timeout=0)
    assert [handoff.get(0), handoff.get(0), handoff.get(0)] == ["a", "b", "c"]
    assert handoff.get(0.01) is None and handoff.empty()


def test_row_limit_blocks_until_rows_are_taken() -> None:
    handoff: Handoff[int] = Handoff(max_items=100, max_rows=10)
    assert handoff.put(1, 6, timeout=0)
    assert not handoff.put(2, 6, timeout=0.01)  # 12 rows > 10
    assert handoff.put(3, 4, timeout=0)  # exactly 10
    assert handoff.rows == 10
    assert handoff.get(0) == 1
    assert handoff.put(2, 6, timeout=0)
    assert handoff.rows == 10 and handoff.qsize() == 2


def test_item_limit_blocks() -> None:
    handoff: Handoff[int] = Handoff(max_items=2, max_rows=1000)
    assert handoff.put(1, 0, timeout=0) and handoff.put(2, 0, timeout=0)
    assert not handoff.put(3, 0, timeout=0.01)


def test_an_item_over_the_row_limit_passes_when_empty() -> None:
    handoff: Handoff[str] = Handoff(max_items=10, max_rows=10)
    assert handoff.put("huge", 5000, timeout=0)
    assert not handoff.put("next", 1, timeout=0.01)
    assert handoff.get(0) == "huge"
    assert handoff.put("next", 1, timeout=0)


def test_a_waiting_put_wakes_when_the_consumer_takes() -> None:
    handoff: Handoff[int] = Handoff(max_items=1, max_rows=10)
    assert handoff.put(1, 1, timeout=0)
    results: list[bool] = []
    producer = threading.Thread(target=lambda: results.append(handoff.put(2, 1, timeout=10)))
    producer.start()
    assert handoff.get(5) == 1
    producer.join(timeout=10)
    assert results == [True]
    assert handoff.get(5) == 2


def test_a_waiting_get_is_woken_by_a_put_long_before_its_timeout() -> None:
    # The put notifies only when a getter waits; a missed wake-up would leave the getter
    # asleep for its whole 60 s timeout, and the join below would give up first.
    handoff: Handoff[str] = Handoff(max_items=4, max_rows=10)
    got: list[str | None] = []
    consumer = threading.Thread(target=lambda: got.append(handoff.get(60)))
    consumer.start()
    while not handoff._getters and consumer.is_alive():  # bounded by the get's own timeout
        threading.Event().wait(0.001)
    assert handoff.put("x", 1, timeout=0)
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert got == ["x"]


def test_a_waiting_put_is_woken_by_a_get_long_before_its_timeout() -> None:
    handoff: Handoff[str] = Handoff(max_items=1, max_rows=10)
    assert handoff.put("a", 1, timeout=0)
    done: list[bool] = []
    producer = threading.Thread(target=lambda: done.append(handoff.put("b", 1, timeout=60)))
    producer.start()
    while not handoff._putters and producer.is_alive():
        threading.Event().wait(0.001)
    assert handoff.get(0) == "a"
    producer.join(timeout=10)
    assert not producer.is_alive()
    assert done == [True]
    assert handoff.get(0) == "b"
