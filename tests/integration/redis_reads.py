"""What the integration tests read back from Redis: a key's JSON value, or None when absent.

One helper for every test that checks what the worker (or a reader) stored, so a missing key
reads as ``None`` in the assertion instead of a JSON parse error of ``"None"``.
"""

from __future__ import annotations

import json
from typing import Any

import redis


def get_json(r: redis.Redis, key: str) -> Any:
    """The JSON value stored under ``key``, or None if there is no such key."""
    raw = r.get(key)
    return None if raw is None else json.loads(raw)
