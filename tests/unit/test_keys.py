"""Unit tests of ``worker.keys``: companion key names and their Redis Cluster slots."""

from __future__ import annotations

import pytest
from redis.crc import key_slot as redis_py_key_slot

from worker.keys import (
    LEASE_SUFFIX,
    VERSION_SUFFIX,
    companion_keys,
    hash_tag,
    key_slot,
    lease_key,
    version_key,
)

SAME_SLOT_KEYS = [
    pytest.param("user:42", id="plain"),
    pytest.param("{user:42}:profile", id="hash-tag-first"),
    pytest.param("profile:{user:42}", id="hash-tag-last"),
    pytest.param("a{b}c{d}", id="two-tags-first-wins"),
    pytest.param("foo{bar", id="open-brace-no-close"),
    pytest.param("{foo", id="open-brace-first"),
    pytest.param("foo{", id="open-brace-last"),
    pytest.param("user:é✓", id="non-ascii"),
]


@pytest.mark.parametrize("key", SAME_SLOT_KEYS)
def test_companions_share_the_key_slot(key: str) -> None:
    assert key_slot(version_key(key)) == key_slot(key)
    assert key_slot(lease_key(key)) == key_slot(key)
    # Cross-check with the driver's own CRC16, so a bug shared by key_slot and the names shows.
    slot = redis_py_key_slot(key.encode())
    assert redis_py_key_slot(version_key(key).encode()) == slot
    assert redis_py_key_slot(lease_key(key).encode()) == slot
    assert companion_keys(key) == (version_key(key), lease_key(key))


@pytest.mark.parametrize("key", ["foo{}bar", "{}", "{}foo", "}foo{", "a{}b{c}"])
def test_keys_with_a_close_brace_but_no_usable_tag_keep_their_name(key: str) -> None:
    # Redis hashes such a key whole, and a hash tag cannot contain "}", so no companion name can
    # hash to the key's slot: worker.keys leaves the key as is (documented there). On a single
    # Redis that is harmless; on a cluster only these keys' refreshes fail.
    assert hash_tag(key) is None
    assert version_key(key) == key + VERSION_SUFFIX
    assert lease_key(key) == key + LEASE_SUFFIX
    assert companion_keys(key) == (key + VERSION_SUFFIX, key + LEASE_SUFFIX)
    assert key_slot(key) == redis_py_key_slot(key.encode())


def test_names_are_stable() -> None:
    # Other languages' readers build the same names (docs/read-protocol.md).
    assert version_key("user:42") == "{user:42}:cw:v"
    assert lease_key("user:42") == "{user:42}:cw:lease"
    assert version_key("{user:42}:profile") == "{user:42}:profile:cw:v"
    assert lease_key("foo{bar") == "{foo{bar}:cw:lease"


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        ("foo", 12182),
        ("123456789", 12739),
        ("bar", 5061),
        ("hello", 866),
        ("", 0),
    ],
)
def test_key_slot_matches_known_redis_values(key: str, slot: int) -> None:
    assert key_slot(key) == slot


def test_key_slot_hashes_only_the_tag() -> None:
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == redis_py_key_slot(b"foo{}{bar}")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")


@pytest.mark.parametrize(
    "key",
    ["a", "user:1", "{x}y", "x{}y", "{", "}", "{}", "{{}}", "a{b}{c}", "é", "k" * 300],
)
def test_key_slot_agrees_with_redis_py(key: str) -> None:
    assert key_slot(key) == redis_py_key_slot(key.encode())


def test_hash_tag() -> None:
    assert hash_tag("{a}b") == "a"
    assert hash_tag("x{a}b{c}") == "a"
    assert hash_tag("x{}b{c}") is None
    assert hash_tag("x{b") is None
    assert hash_tag("plain") is None


@pytest.mark.parametrize("key", ["user:1", "{user:1}:profile", "a}b", "{}x", "é:{ü}"])
def test_companion_keys_are_the_version_and_lease_keys(key: str) -> None:
    assert companion_keys(key) == (version_key(key), lease_key(key))
