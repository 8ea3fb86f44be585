"""The cache-worker rules the benchmark runs, one place for every source.

The items workloads are measured with an evict rule and a json refresh rule on ``item:{id}``
(the naive contenders delete the same keys); the lag test refreshes ``lag:{id}`` so the lag
reader can wait for exactly those keys. Tables are ``schema.table`` as the rules expect.
"""

from __future__ import annotations

from typing import Any

from bench.keyspace_reader import LAG_KEY_PREFIX

ITEM_KEY = "item:{id}"


def item_key(row_id: object) -> str:
    """The key the item rules (and the naive contenders) use for a row id."""
    return ITEM_KEY.format(id=row_id)


def evict_rule(table: str) -> dict[str, Any]:
    return {"name": "items-evict", "table": table, "keys": [ITEM_KEY], "action": "evict"}


def refresh_rule(table: str) -> dict[str, Any]:
    return {
        "name": "items-json",
        "table": table,
        "keys": [ITEM_KEY],
        "action": "refresh",
        "format": "json",
    }


def lag_rule(table: str) -> dict[str, Any]:
    return {
        "name": "lag-json",
        "table": table,
        "keys": [LAG_KEY_PREFIX + "{id}"],
        "action": "refresh",
        "format": "json",
    }


# The worker contenders of every throughput section: (label, Result.kind, rule builder).
WORKER_CONTENDERS = (
    ("cache-worker evict rule", "evict", evict_rule),
    ("cache-worker json refresh rule", "refresh", refresh_rule),
)
