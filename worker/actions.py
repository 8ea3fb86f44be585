"""What the worker does to one cache key (``Evict``, ``Refresh``), and coalescing a batch of them.

Actions are plain values: rules produce them, the sink applies them. ``coalesce`` keeps only the
last action per key in a batch, which preserves per-key order (the last action is the newest) and
lets many transactions share one Redis round trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


# Not frozen, for speed, like RowChange: rules build one per key; treat them as values.
@dataclass(slots=True)
class Evict:
    """Delete ``key`` together with its version and lease companions."""

    key: str
    rule: str = ""
    version: int = 0


@dataclass(slots=True)
class Refresh:
    """Write ``key`` with a value unless Redis already holds a newer ``version``.

    ``value`` is the encoded payload: a JSON string for ``format = "json"``, or the field/value
    pairs of a hash for ``format = "hash"``.
    """

    key: str
    value: str | tuple[tuple[str, str], ...]
    ttl_ms: int
    version: int
    rule: str = ""


CacheAction = Evict | Refresh


def coalesce(actions: Iterable[CacheAction]) -> list[CacheAction]:
    """Keep the last action per key; keys keep the order of their last action."""
    last: dict[str, CacheAction] = {}
    for action in actions:
        # Re-inserting moves the key to the end, so the result is ordered by last action.
        last.pop(action.key, None)
        last[action.key] = action
    return list(last.values())
