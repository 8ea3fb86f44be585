"""Integration tests of ``worker.client.CacheClient`` and its Lua scripts against a real Redis.

The client under test uses a ``connect``-built client (bytes replies, as ``from_config`` builds
it); assertions read Redis through the flushed ``redis_client`` fixture (str replies). The
worker's side is the real ``RedisSink``, so the tests also prove that both sides agree on keys,
encodings and companions.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

from connectors.redis import RedisOptions, RedisSink, connect
from tests.integration.redis_reads import get_json
from tests.services import RedisServer, free_port
from worker.actions import Evict
from worker.client import CacheClient
from worker.events import Op, RowChange, TableRef
from worker.keys import lease_key, version_key
from worker.rules import KeyTemplate, Rule, RuleSet

USERS = TableRef("shop", "users")
TTL_MS = 600_000
ROW: dict[str, Any] = {
    "id": 7,
    "name": "Zoë 😀",
    "email": "z@x",
    "balance": Decimal("10.50"),
    "seen_at": dt.datetime(2024, 2, 29, 13, 14, 15, 123456),
    "note": None,
}
COLUMNS = ("id", "name", "balance", "seen_at", "note")


def make_rule(name: str, fmt: str = "json") -> Rule:
    return Rule(
        name=name,
        table=USERS,
        keys=(KeyTemplate.parse(f"{name}:{{id}}"), KeyTemplate.parse(f"{name}:e:{{email}}")),
        format=fmt,  # type: ignore[arg-type]
        columns=COLUMNS,
        ttl_ms=TTL_MS,
        jitter=0.1,
    )


RULES = RuleSet([make_rule("user"), make_rule("huser", "hash")])


@pytest.fixture
def conn(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[redis.Redis]:
    # redis_client is requested for its FLUSHALL.
    built = connect(RedisOptions(redis_server.url(), password=redis_server.password))
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def cache(conn: redis.Redis) -> CacheClient:
    return CacheClient(conn, RULES, wait_ms=100, poll_ms=5)


class Loader:
    def __init__(self, row: dict[str, Any] | None = ROW) -> None:
        self.row = row
        self.calls = 0

    def __call__(self, **columns: Any) -> dict[str, Any] | None:
        self.calls += 1
        return self.row


def test_miss_fills_with_ttl_then_hits(cache: CacheClient, redis_client: redis.Redis) -> None:
    loader = Loader()
    first = cache.get("user", loader, id=7)
    expected = {
        "id": 7,
        "name": "Zoë 😀",
        "balance": "10.50",
        "seen_at": "2024-02-29T13:14:15.123456",
        "note": None,
    }
    assert first == expected and loader.calls == 1
    assert get_json(redis_client, "user:7") == expected
    assert TTL_MS * 0.9 - 1000 <= redis_client.pttl("user:7") <= TTL_MS
    # The lease is gone and no version was written (a missing version is the lowest).
    assert not redis_client.exists(lease_key("user:7"), version_key("user:7"))
    assert cache.get("user", loader, id=7) == expected and loader.calls == 1


def test_hash_format_fills_fields_without_nulls(
    cache: CacheClient, redis_client: redis.Redis
) -> None:
    loader = Loader()
    got = cache.get("huser", loader, email="z@x")
    expected = {
        "id": "7",
        "name": "Zoë 😀",
        "balance": "10.50",
        "seen_at": "2024-02-29T13:14:15.123456",
    }
    assert got == expected
    assert redis_client.hgetall("huser:e:z@x") == expected
    assert 0 < redis_client.pttl("huser:e:z@x") <= TTL_MS
    assert cache.get("huser", loader, email="z@x") == expected and loader.calls == 1


def test_worker_written_values_read_the_same_as_fills(
    conn: redis.Redis, cache: CacheClient
) -> None:
    filled = cache.get("user", Loader(), id=7)
    hfilled = cache.get("huser", Loader(), id=7)
    conn.flushdb()
    change = RowChange(Op.INSERT, USERS, None, ROW, 10)
    RedisSink(conn).apply(RULES.actions_for(change))
    loader = Loader()
    assert cache.get("user", loader, id=7) == filled
    assert cache.get("huser", loader, email="z@x") == hfilled
    assert loader.calls == 0


def test_worker_refresh_after_a_fill_is_not_refused(
    conn: redis.Redis, cache: CacheClient, redis_client: redis.Redis
) -> None:
    cache.get("user", Loader(), id=7)
    newer = {**ROW, "name": "new"}
    sink = RedisSink(conn)
    sink.apply(RULES.rules_for(USERS)[0].actions_for(RowChange(Op.UPDATE, USERS, ROW, newer, 1)))
    assert sink.stale_refusals == 0
    assert get_json(redis_client, "user:7")["name"] == "new"


def test_lease_held_by_another_waits_then_loads_without_filling(
    cache: CacheClient, redis_client: redis.Redis
) -> None:
    redis_client.set(lease_key("user:7"), "other-reader", px=5000)
    loader = Loader()
    began = time.monotonic()
    assert cache.get("user", loader, id=7) is not None
    waited = time.monotonic() - began
    assert loader.calls == 1 and 0.1 <= waited < 1.0
    assert not redis_client.exists("user:7")
    assert redis_client.get(lease_key("user:7")) == "other-reader"


def test_waiting_reader_takes_the_first_readers_fill(
    conn: redis.Redis, redis_client: redis.Redis
) -> None:
    redis_client.set(lease_key("user:7"), "other-reader", px=5000)
    cache = CacheClient(conn, RULES, wait_ms=2000, poll_ms=5)

    def must_not_load(**columns: Any) -> None:
        raise AssertionError("the waiting reader should have used the other reader's fill")

    # The "other reader" fills from a second client after a moment.
    timer = threading.Timer(0.05, lambda: redis_client.set("user:7", '{"id":7,"name":"x"}'))
    timer.start()
    try:
        assert cache.get("user", must_not_load, id=7) == {"id": 7, "name": "x"}
    finally:
        timer.join()


def test_lease_deleted_during_load_drops_the_fill(
    cache: CacheClient, redis_client: redis.Redis
) -> None:
    def loader(**columns: Any) -> dict[str, Any]:
        # What the worker does when it applies a change to the key meanwhile.
        assert redis_client.exists(lease_key("user:7"))
        redis_client.delete(lease_key("user:7"))
        return ROW

    assert cache.get("user", loader, id=7) is not None
    assert not redis_client.exists("user:7", lease_key("user:7"))


def test_worker_evict_during_load_drops_the_fill(
    conn: redis.Redis, cache: CacheClient, redis_client: redis.Redis
) -> None:
    def loader(**columns: Any) -> dict[str, Any]:
        RedisSink(conn).apply([Evict("huser:7", "huser", 11)])
        return ROW

    assert cache.get("huser", loader, id=7) is not None
    assert not redis_client.exists("huser:7", lease_key("huser:7"))


def test_lease_taken_over_after_expiry_drops_the_fill(
    conn: redis.Redis, redis_client: redis.Redis
) -> None:
    cache = CacheClient(conn, RULES, lease_ms=20)

    def slow_loader(**columns: Any) -> dict[str, Any]:
        time.sleep(0.1)
        redis_client.set(lease_key("user:7"), "second-reader", px=5000)
        return ROW

    assert cache.get("user", slow_loader, id=7) is not None
    assert not redis_client.exists("user:7")
    assert redis_client.get(lease_key("user:7")) == "second-reader"


def test_loader_none_releases_the_lease_and_caches_nothing(
    cache: CacheClient, redis_client: redis.Redis
) -> None:
    assert cache.get("user", Loader(row=None), id=7) is None
    assert not redis_client.exists("user:7", lease_key("user:7"))
    # Not negatively cached: the next read asks the database again.
    loader = Loader()
    assert cache.get("user", loader, id=7) is not None and loader.calls == 1


def test_loader_exception_releases_the_lease(cache: CacheClient, redis_client: redis.Redis) -> None:
    def failing(**columns: Any) -> dict[str, Any]:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        cache.get("user", failing, id=7)
    assert not redis_client.exists("user:7", lease_key("user:7"))


def test_release_leaves_someone_elses_lease(conn: redis.Redis, redis_client: redis.Redis) -> None:
    cache = CacheClient(conn, RULES, lease_ms=20)

    def slow_none(**columns: Any) -> None:
        time.sleep(0.1)
        redis_client.set(lease_key("user:7"), "second-reader", px=5000)
        return None

    assert cache.get("user", slow_none, id=7) is None
    assert redis_client.get(lease_key("user:7")) == "second-reader"


def test_redis_outage_falls_back_to_the_loader() -> None:
    down = connect(RedisOptions(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5))
    cache = CacheClient(down, RULES)
    loader = Loader()
    assert cache.get("user", loader, id=7) == {
        "id": 7,
        "name": "Zoë 😀",
        "balance": "10.50",
        "seen_at": "2024-02-29T13:14:15.123456",
        "note": None,
    }
    assert loader.calls == 1
    down.close()
