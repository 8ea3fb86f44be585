"""How much of Redis's own CPU a benchmark contender used: ``INFO cpu`` read before and after.

A worker's rate is bounded by whichever of the worker, the database and Redis runs out of time
first. Redis's share shows in its process CPU (user + system seconds, which ``INFO cpu``
reports), so each worker contender's row says how many microseconds of Redis CPU a row cost.
An evict is a slot in a multi-key ``DEL``; a refresh is a versioned, leased, expiring write run
by a Lua script, several times dearer; that difference is what bounds refresh rates on one
Redis core. ``parse_cpu_seconds`` is the pure part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.services import RedisServer


def parse_cpu_seconds(info: Mapping[str, Any]) -> float | None:
    """User + system CPU seconds of the Redis process from an ``INFO cpu`` reply, if given."""
    try:
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except (KeyError, TypeError, ValueError):
        return None


def cpu_seconds(redis_server: RedisServer | None) -> float | None:
    """The Redis server's CPU seconds so far (None if it does not say, or there is no server)."""
    if redis_server is None:
        return None
    client = redis_server.client()
    try:
        return parse_cpu_seconds(client.info("cpu"))
    finally:
        client.close()


def per_row_us(before: float | None, after: float | None, rows: int) -> float | None:
    """Microseconds of Redis CPU per row between two readings (None when unknown)."""
    if before is None or after is None or rows <= 0 or after < before:
        return None
    return (after - before) * 1e6 / rows
