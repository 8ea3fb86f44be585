"""Unit tests of batch coalescing: last action per key wins, order per key kept."""

from __future__ import annotations

from worker.actions import CacheAction, Evict, Refresh, coalesce


def test_coalesce_keeps_last_action_per_key_in_order_of_last_action() -> None:
    actions: list[CacheAction] = [
        Refresh("a", "1", 1000, 1),
        Refresh("b", "1", 1000, 1),
        Evict("a", version=2),
        Refresh("c", "1", 1000, 2),
        Refresh("b", "2", 1000, 3),
    ]
    assert coalesce(actions) == [
        Evict("a", version=2),
        Refresh("c", "1", 1000, 2),
        Refresh("b", "2", 1000, 3),
    ]


def test_coalesce_empty_and_distinct() -> None:
    assert coalesce([]) == []
    distinct = [Evict(str(i)) for i in range(5)]
    assert coalesce(distinct) == distinct
