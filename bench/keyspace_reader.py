"""The lag test's reader process: when each ``lag:<id>`` key was first written to Redis.

Its own small module because it is the target of a spawned process: the child imports only
this and redis, so it is subscribed within a fraction of a second. It subscribes to the
keyspace notifications of ``lag:*`` (the benchmark enables them on its own Redis), stamps each
first ``set`` with the system-wide monotonic clock the writer also uses, and writes the stamps
as JSON when it saw every key, was told to stop, or reached its deadline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

LAG_KEY_PREFIX = "lag:"
KEYSPACE_EVENTS = "K$"  # keyspace channel, string commands (the worker's SET)


def read_stamps(path: Path) -> dict[int, float]:
    """The stamps a reader wrote; empty when it wrote none (killed at its deadline)."""
    raw = json.loads(path.read_text()) if path.exists() else {}
    return {int(k): float(v) for k, v in raw.items()}


def main(
    host: str,
    port: int,
    password: str | None,
    expected: int,
    max_seconds: float,
    out_path: str,
    ready: Any,
    stop: Any,
) -> None:
    """Record the first write of each ``lag:<id>`` key; ``ready``/``stop`` are Events."""
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=10)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.psubscribe(f"__keyspace@0__:{LAG_KEY_PREFIX}*")
    seen: dict[int, float] = {}
    deadline = time.monotonic() + max_seconds
    ready.set()
    try:
        while len(seen) < expected and not stop.is_set() and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.05)
            now = time.monotonic()
            if message is None:
                continue
            suffix = bytes(message["channel"]).rsplit(b":", 1)[-1]
            if suffix.isdigit():
                seen.setdefault(int(suffix), now)
    finally:
        pubsub.close()
        client.close()
        Path(out_path).write_text(json.dumps(seen))
