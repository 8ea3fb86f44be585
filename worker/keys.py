"""Names of the companion keys that sit beside every cache key: its version and its lease.

Both must hash to the same Redis Cluster slot as the key itself so one Lua script can touch all
three. Redis hashes only the part between the first ``{`` and the next ``}`` when that part is
non-empty (the hash tag); a key without a usable tag is hashed whole. So a key that already has a
tag keeps it and gets a suffix, and a key without one is wrapped in braces to become the tag.
The read helper (``worker.client``) and other languages' web tiers use the same names
(``docs/read-protocol.md``).
"""

from __future__ import annotations

VERSION_SUFFIX = ":cw:v"
LEASE_SUFFIX = ":cw:lease"


def hash_tag(key: str) -> str | None:
    """The hash tag Redis Cluster uses for ``key``, or None when the whole key is hashed."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


def _slot_anchor(key: str) -> str:
    if hash_tag(key) is not None:
        return key
    if "}" in key:
        # Wrapping would end the tag at the key's own "}" and hash another slot. Such a key can
        # only come from row data; a single Redis does not care, and on a cluster the script
        # fails for that key alone (its change is dead-lettered) instead of the worker stopping.
        return key
    return "{" + key + "}"


def version_key(key: str) -> str:
    """Where the version of ``key``'s current value is stored."""
    return _slot_anchor(key) + VERSION_SUFFIX


def companion_keys(key: str) -> tuple[str, str]:
    """``(version_key(key), lease_key(key))``, working out the slot anchor once."""
    # The usual key has no braces at all and is wrapped whole; checked inline, as the sink asks
    # for every key it writes.
    anchor = _slot_anchor(key) if "{" in key or "}" in key else "{" + key + "}"
    return anchor + VERSION_SUFFIX, anchor + LEASE_SUFFIX


def lease_key(key: str) -> str:
    """Where a web-tier reader's fill lease for ``key`` is stored."""
    return _slot_anchor(key) + LEASE_SUFFIX


def key_slot(key: str) -> int:
    """The Redis Cluster slot of ``key`` (CRC16/XMODEM of the hash tag or whole key, mod 16384)."""
    tag = hash_tag(key)
    data = (tag if tag is not None else key).encode()
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc % 16384
