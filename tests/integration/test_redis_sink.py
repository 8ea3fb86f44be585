"""Integration tests of ``connectors.redis`` against a real redis-server.

The shared session server comes from the ``redis_server``/``redis_client`` fixtures
(tests/conftest.py); tests that stop a server or change its passwords start a private one with
``tests.services.start_local_redis`` so the shared server's state never depends on test order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
from redis.connection import Connection

from connectors.redis import (
    REFRESH_BATCH_SHA,
    RedisCheckpointStore,
    RedisOptions,
    RedisSink,
    connect,
    describe,
)
from tests.integration.redis_reads import get_json
from tests.services import RedisServer, start_local_redis
from worker.actions import CacheAction, Evict, Refresh
from worker.errors import CheckpointError, ConfigError, SinkError, SinkUnavailable
from worker.events import Position
from worker.keys import lease_key, version_key

TTL_MS = 60_000
PASSWORD = "s3cret-Pa55/word"
ACL_USER = "cacheworker"
ACL_PASSWORD = "acl-Pa55:word@x"


@pytest.fixture
def client(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """A client built by ``connect`` (bytes replies) for the flushed session server."""
    # redis_client is requested for its FLUSHALL (and restart of a stopped local server).
    built = connect(RedisOptions(redis_server.url(), password=redis_server.password))
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def sink(client: redis.Redis) -> RedisSink:
    return RedisSink(client)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop or lock with passwords."""
    server = start_local_redis()
    try:
        yield server
    finally:
        server.close()


def refresh(key: str, version: int, value: str = '{"v": 1}', ttl_ms: int = TTL_MS) -> Refresh:
    return Refresh(key, value, ttl_ms, version)


# ------------------------------------------------------------------------------------------
# apply()
# ------------------------------------------------------------------------------------------


def test_refresh_json_writes_value_ttl_and_version(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    sink.apply([refresh("user:1", 10, '{"id": 1, "name": "Ada \u2713"}')])
    assert get_json(redis_client, "user:1") == {"id": 1, "name": "Ada \u2713"}
    assert redis_client.get(version_key("user:1")) == "10"
    for key in ("user:1", version_key("user:1")):
        assert 0 < redis_client.pttl(key) <= TTL_MS
    assert sink.stale_refusals == 0


def test_refresh_hash_writes_fields_and_ttl(sink: RedisSink, redis_client: redis.Redis) -> None:
    redis_client.hset("user:2", mapping={"stale_field": "x"})
    sink.apply([Refresh("user:2", (("id", "2"), ("name", "Grace")), TTL_MS, 5)])
    # The old hash is replaced, not merged.
    assert redis_client.hgetall("user:2") == {"id": "2", "name": "Grace"}
    assert 0 < redis_client.pttl("user:2") <= TTL_MS
    assert redis_client.get(version_key("user:2")) == "5"
    assert 0 < redis_client.pttl(version_key("user:2")) <= TTL_MS


def test_refresh_hash_without_fields_leaves_no_key(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    redis_client.hset("user:3", mapping={"a": "1"})
    sink.apply([Refresh("user:3", (), TTL_MS, 5)])
    assert redis_client.exists("user:3") == 0
    assert redis_client.get(version_key("user:3")) == "5"


def test_refresh_wide_hash(sink: RedisSink, redis_client: redis.Redis) -> None:
    # Wider than one HSET slice in the script (and than Lua's unpack() limit).
    pairs = tuple((f"f{i}", str(i)) for i in range(5000))
    sink.apply([Refresh("wide", pairs, TTL_MS, 1)])
    assert redis_client.hlen("wide") == 5000
    assert redis_client.hget("wide", "f4999") == "4999"


def test_refresh_replaces_a_value_of_another_type(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    sink.apply([Refresh("k", (("a", "1"),), TTL_MS, 1)])
    sink.apply([refresh("k", 2, '"now a string"')])
    assert redis_client.get("k") == '"now a string"'
    sink.apply([Refresh("k", (("b", "2"),), TTL_MS, 3)])
    assert redis_client.hgetall("k") == {"b": "2"}


def test_lower_version_is_refused_and_counted(sink: RedisSink, redis_client: redis.Redis) -> None:
    sink.apply([refresh("user:1", 10, '"v10"')])
    sink.apply([refresh("user:1", 9, '"v9"'), refresh("user:2", 3, '"other"')])
    assert redis_client.get("user:1") == '"v10"'
    assert redis_client.get(version_key("user:1")) == "10"
    assert redis_client.get("user:2") == '"other"'
    assert sink.stale_refusals == 1
    sink.apply([Refresh("user:1", (("f", "v"),), TTL_MS, 2)])
    assert redis_client.get("user:1") == '"v10"'
    assert sink.stale_refusals == 2


def test_equal_and_higher_versions_are_applied(sink: RedisSink, redis_client: redis.Redis) -> None:
    sink.apply([refresh("user:1", 10, '"first"')])
    sink.apply([refresh("user:1", 10, '"replayed"')])
    assert redis_client.get("user:1") == '"replayed"'
    sink.apply([refresh("user:1", 11, '"newer"')])
    assert redis_client.get("user:1") == '"newer"'
    assert redis_client.get(version_key("user:1")) == "11"
    assert sink.stale_refusals == 0


def test_versions_compare_as_integers_beyond_32_bits(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    big = 2**53 - 10
    sink.apply([refresh("k", big, '"big"')])
    sink.apply([refresh("k", big - 1, '"older"')])
    assert redis_client.get("k") == '"big"'
    sink.apply([refresh("k", big + 1, '"newer"')])
    assert redis_client.get("k") == '"newer"'
    assert redis_client.get(version_key("k")) == str(big + 1)
    # "9" > "10" as strings: the comparison must be numeric.
    sink.apply([refresh("n", 10, '"ten"')])
    sink.apply([refresh("n", 9, '"nine"')])
    assert redis_client.get("n") == '"ten"'


def test_evict_removes_key_version_and_lease(sink: RedisSink, redis_client: redis.Redis) -> None:
    sink.apply([refresh("user:1", 10)])
    redis_client.set(lease_key("user:1"), "reader-token")
    sink.apply([Evict("user:1", version=11)])
    assert redis_client.exists("user:1", version_key("user:1"), lease_key("user:1")) == 0
    # Evicting what is not there is fine (replays).
    sink.apply([Evict("user:1", version=11)])


def test_every_action_deletes_an_existing_lease(sink: RedisSink, redis_client: redis.Redis) -> None:
    sink.apply([refresh("stale", 10)])
    for key in ("fresh", "stale", "evicted", "hashed"):
        redis_client.set(lease_key(key), "reader-token", px=TTL_MS)
    actions: list[CacheAction] = [
        refresh("fresh", 1),
        refresh("stale", 9),  # refused as stale, but the lease still goes
        Evict("evicted"),
        Refresh("hashed", (("a", "1"),), TTL_MS, 1),
    ]
    sink.apply(actions)
    assert sink.stale_refusals == 1
    for key in ("fresh", "stale", "evicted", "hashed"):
        assert redis_client.exists(lease_key(key)) == 0, key


def test_ttl_zero_writes_without_expiry(sink: RedisSink, redis_client: redis.Redis) -> None:
    sink.apply([refresh("forever", 1, ttl_ms=0), Refresh("h", (("a", "1"),), 0, 1)])
    for key in ("forever", version_key("forever"), "h", version_key("h")):
        assert redis_client.pttl(key) == -1, key


def test_empty_batch_sends_nothing(sink: RedisSink, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_send(self: Connection, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("sent something for an empty batch")

    monkeypatch.setattr(Connection, "send_packed_command", no_send)
    sink.apply([])


def test_one_apply_is_one_round_trip(
    sink: RedisSink,
    client: redis.Redis,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink.apply([refresh("warm-up", 1)])  # loads the script: not part of what is measured
    redis_client.mset({f"k:{i}": "cached" for i in range(0, 5000, 2)})
    client.config_resetstat()
    events: list[str] = []
    send: Any = Connection.send_packed_command
    read: Any = Connection.read_response

    def counting_send(self: Connection, *args: Any, **kwargs: Any) -> Any:
        events.append("send")
        return send(self, *args, **kwargs)

    def counting_read(self: Connection, *args: Any, **kwargs: Any) -> Any:
        events.append("read")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "send_packed_command", counting_send)
    monkeypatch.setattr(Connection, "read_response", counting_read)
    actions: list[CacheAction] = [
        refresh(f"k:{i}", 1) if i % 2 else Evict(f"k:{i}") for i in range(5000)
    ]
    sink.apply(actions)
    monkeypatch.undo()

    # One round trip: every byte of the batch is written before the first reply is read, and
    # one reply per command is read: the evicts go first (one key each, so order is free), a
    # DEL per 64 evicts, then one script call per 64 refreshes.
    first_read = events.index("read")
    assert "send" not in events[first_read:]
    assert events.count("read") == 40 + 40
    assert 1 <= events.count("send") <= 5000 // 100
    stats = client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 40
    # DELs: one per 64 evicts plus the lease DEL for each refreshed key (commandstats counts
    # both).
    assert stats["cmdstat_del"]["calls"] == 40 + 2500
    assert redis_client.exists(*(f"k:{i}" for i in range(0, 5000, 2))) == 0
    assert redis_client.exists(*(f"k:{i}" for i in range(1, 5000, 2))) == 2500
    assert "cmdstat_script" not in stats  # no SCRIPT EXISTS/LOAD per batch


def test_script_flush_between_applies_reloads_and_retries(
    sink: RedisSink, client: redis.Redis, redis_client: redis.Redis
) -> None:
    sink.apply([refresh("a", 1, '"one"')])
    redis_client.script_flush()
    client.config_resetstat()
    sink.apply([refresh("a", 2, '"two"'), Evict("b"), refresh("c", 1, '"c"')])
    assert redis_client.get("a") == '"two"'
    assert redis_client.get("c") == '"c"'
    assert redis_client.script_exists(REFRESH_BATCH_SHA) == [True]
    stats = client.info("commandstats")
    # The first attempt really hit NOSCRIPT, and the batch went again once (both refreshes
    # travel in one script call).
    assert stats["cmdstat_evalsha"]["failed_calls"] == 1
    assert stats["cmdstat_evalsha"]["calls"] == 2


def test_failed_action_raises_after_the_others_are_applied(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    # A version key of the wrong type makes the script fail for that key alone.
    redis_client.hset(version_key("broken"), mapping={"x": "1"})
    with pytest.raises(SinkError, match="'broken'") as caught:
        sink.apply([refresh("before", 1), refresh("broken", 1), refresh("after", 1)])
    assert not isinstance(caught.value, SinkUnavailable)
    assert "1 of 3" in str(caught.value)
    assert redis_client.exists("before", "after") == 2


def test_unencodable_value_is_a_sink_error_naming_the_key(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    bad = Refresh("bad", (("field", None),), TTL_MS, 1)  # type: ignore[arg-type]
    with pytest.raises(SinkError, match="'bad'"):
        sink.apply([refresh(f"k:{i}", 1) for i in range(300)] + [bad])
    with pytest.raises(SinkError, match="'surrogate'"):
        sink.apply([refresh("surrogate", 1, '"\udc80"')])
    # The sink is still usable: the half-sent batch did not leave replies on a pooled socket.
    sink.apply([refresh("after", 1)])
    assert redis_client.get("after") == '{"v": 1}'


def test_read_only_replica_is_unavailable(private_redis: RedisServer) -> None:
    primary = private_redis.client()
    replica_sink = RedisSink(connect(RedisOptions(private_redis.url())))
    # A replica of an unreachable primary still answers, read-only: as after a failover.
    primary.replicaof("127.0.0.1", "1")
    try:
        with pytest.raises(SinkUnavailable, match="read only replica"):
            replica_sink.apply([Evict("k")])
    finally:
        primary.replicaof("NO", "ONE")
        replica_sink.close()
        primary.close()


# ------------------------------------------------------------------------------------------
# Outages and authentication
# ------------------------------------------------------------------------------------------


def _lock(server: RedisServer) -> None:
    """requirepass for the default user plus an ACL user limited to what the worker needs."""
    admin = server.client()
    admin.acl_setuser(
        ACL_USER,
        enabled=True,
        passwords=[f"+{ACL_PASSWORD}"],
        keys=["*"],
        commands=["+@all", "-config", "-flushall", "-flushdb"],
    )
    admin.config_set("requirepass", PASSWORD)
    admin.close()


def test_redis_stopped_raises_sink_unavailable_without_password(
    private_redis: RedisServer,
) -> None:
    _lock(private_redis)
    url = f"redis://default:{quote(PASSWORD, safe='')}@127.0.0.1:{private_redis.port}/0"
    client = connect(RedisOptions(url))
    sink = RedisSink(client)
    store = RedisCheckpointStore(client, "cache-worker:checkpoint:test")
    sink.apply([refresh("k", 1)])
    private_redis.stop()
    with pytest.raises(SinkUnavailable) as caught:
        sink.apply([refresh("k", 2), Evict("j")])
    assert caught.value.retryable
    message = str(caught.value)
    assert PASSWORD not in message and "Pa55" not in message
    assert f"127.0.0.1:{private_redis.port}" in message
    with pytest.raises(SinkUnavailable) as saving:
        store.save(Position(1))
    assert "Pa55" not in str(saving.value)
    with pytest.raises(SinkUnavailable):
        store.load()
    checks = sink.checks()
    assert [c.ok for c in checks] == [False, False]
    assert all("Pa55" not in c.detail for c in checks)
    # Back up (empty: no persistence): the same sink recovers, script and all.
    private_redis.start()
    _lock(private_redis)
    sink.apply([refresh("k", 3, '"back"')])
    assert client.get("k") == b'"back"'
    client.close()


def test_password_in_url_and_acl_user(private_redis: RedisServer) -> None:
    _lock(private_redis)
    port = private_redis.port
    for url in (
        f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0",
        f"redis://{ACL_USER}:{quote(ACL_PASSWORD, safe='')}@127.0.0.1:{port}/0",
    ):
        client = connect(RedisOptions(url))
        sink = RedisSink(client)
        sink.apply([refresh("k", 1), Evict("j")])
        assert client.get("k") == b'{"v": 1}'
        client.close()


def test_password_and_username_overrides(private_redis: RedisServer) -> None:
    _lock(private_redis)
    port = private_redis.port
    cases = [
        # The override wins over a wrong password left in the URL.
        RedisOptions(f"redis://:wrong@127.0.0.1:{port}/0", password=PASSWORD),
        RedisOptions(f"redis://127.0.0.1:{port}/0", password=PASSWORD),
        RedisOptions(f"redis://127.0.0.1:{port}/0", username=ACL_USER, password=ACL_PASSWORD),
        RedisOptions(f"redis://nobody:wrong@127.0.0.1:{port}/0", ACL_PASSWORD, ACL_USER),
    ]
    for options in cases:
        client = connect(options)
        RedisSink(client).apply([refresh("k", 1)])
        assert client.get(version_key("k")) == b"1"
        client.close()


def test_wrong_password_is_a_sink_error_not_a_retry(private_redis: RedisServer) -> None:
    _lock(private_redis)
    client = connect(RedisOptions(f"redis://127.0.0.1:{private_redis.port}/0", "not-it"))
    with pytest.raises(SinkError) as caught:
        RedisSink(client).apply([refresh("k", 1)])
    assert not caught.value.retryable
    assert "not-it" not in str(caught.value)
    client.close()


def test_describe_and_checks_name_the_server_without_password(
    private_redis: RedisServer,
) -> None:
    _lock(private_redis)
    port = private_redis.port
    client = connect(RedisOptions(f"redis://{ACL_USER}@127.0.0.1:{port}/0", ACL_PASSWORD))
    assert describe(client) == f"redis://{ACL_USER}@127.0.0.1:{port}/0"
    reachable, policy = RedisSink(client).checks()
    assert reachable.name == "redis reachable" and reachable.ok
    assert f"{ACL_USER}@127.0.0.1:{port}" in reachable.detail
    assert "redis 7." in reachable.detail or "redis " in reachable.detail
    # The ACL user may not run CONFIG, as on many managed services.
    assert policy.name == "redis eviction policy"
    assert policy.ok and not policy.warning
    assert policy.detail.startswith("unknown")
    client.close()


# ------------------------------------------------------------------------------------------
# checks()
# ------------------------------------------------------------------------------------------


def test_checks_report_version_and_eviction_policy(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    original = str(redis_client.config_get("maxmemory-policy")["maxmemory-policy"])
    try:
        redis_client.config_set("maxmemory-policy", "noeviction")
        reachable, policy = sink.checks()
        assert reachable.ok and "(redis " in reachable.detail
        # No memory limit: the policy never applies, nothing to warn about.
        assert policy.ok and not policy.warning and "noeviction" in policy.detail
        redis_client.config_set("maxmemory", "1gb")
        policy = sink.checks()[1]
        assert policy.ok and policy.warning and "noeviction" in policy.detail
        for good in ("allkeys-lru", "volatile-ttl"):
            redis_client.config_set("maxmemory-policy", good)
            policy = sink.checks()[1]
            assert policy.ok and not policy.warning and good in policy.detail
    finally:
        redis_client.config_set("maxmemory-policy", original)
        redis_client.config_set("maxmemory", "0")


# ------------------------------------------------------------------------------------------
# connect()
# ------------------------------------------------------------------------------------------


def test_connect_rejects_bad_urls_without_showing_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        connect(RedisOptions("http://user:Pa55@host/0"))
    assert "Pa55" not in str(caught.value)
    # An unencoded "/" in the password: the driver's parser quotes the piece it choked on.
    with pytest.raises(ConfigError) as caught:
        connect(RedisOptions("redis://user:s3cret-Pa55/w0rd@host:6379/0"))
    assert "Pa55" not in str(caught.value) and "w0rd" not in str(caught.value)
    with pytest.raises(ConfigError, match="rediss://"):
        connect(RedisOptions("redis://host:6379/0", ssl_ca_file="/etc/ssl/ca.pem"))


def test_connect_passes_tls_settings_for_rediss() -> None:
    client = connect(
        RedisOptions(
            "rediss://:Pa55@cache.example:6380/2",
            ssl_ca_file="/etc/ssl/ca.pem",
            ssl_cert_file="/etc/ssl/client.pem",
            ssl_key_file="/etc/ssl/client.key",
            socket_timeout_s=2.5,
        )
    )
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert kwargs["ssl_certfile"] == "/etc/ssl/client.pem"
    assert kwargs["ssl_keyfile"] == "/etc/ssl/client.key"
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["socket_timeout"] == 2.5
    assert describe(client) == "rediss://cache.example:6380/2"
    unverified = connect(RedisOptions("rediss://cache.example", ssl_verify=False))
    assert unverified.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"


# ------------------------------------------------------------------------------------------
# RedisCheckpointStore
# ------------------------------------------------------------------------------------------


def test_checkpoint_store_round_trip(client: redis.Redis, redis_client: redis.Redis) -> None:
    key = "cache-worker:checkpoint:main"
    store = RedisCheckpointStore(client, key)
    assert store.load() is None
    position = Position(2**40 + 7, {"file": "mysql-bin.000003", "pos": 1234, "gtid": "0-1-5"})
    store.save(position)
    loaded = store.load()
    assert loaded == position and loaded is not None and loaded.coords == position.coords
    assert redis_client.ttl(key) == -1  # never expires
    stored = get_json(redis_client, key)
    assert "saved_at" in stored
    assert {k: v for k, v in stored.items() if k != "saved_at"} == position.to_dict()
    checkpoint = store.load_checkpoint()
    assert checkpoint is not None and checkpoint.saved_at is not None
    store.save(Position(2**40 + 8, {"pos": 99}))
    assert store.load() == Position(2**40 + 8)
    store.delete()
    assert store.load() is None


def test_checkpoint_store_works_with_a_decoding_client(redis_client: redis.Redis) -> None:
    store = RedisCheckpointStore(redis_client, "cache-worker:checkpoint:decoded")
    store.save(Position(5, {"lsn": "0/1"}))
    assert store.load() == Position(5)


def test_unparsable_checkpoint_names_the_key(
    client: redis.Redis, redis_client: redis.Redis
) -> None:
    key = "cache-worker:checkpoint:broken"
    redis_client.set(key, "{not json")
    with pytest.raises(CheckpointError, match=key):
        RedisCheckpointStore(client, key).load()


def test_checkpoint_key_of_the_wrong_type_is_a_checkpoint_error(
    client: redis.Redis, redis_client: redis.Redis
) -> None:
    key = "cache-worker:checkpoint:hash"
    redis_client.hset(key, mapping={"version": "1"})
    store = RedisCheckpointStore(client, key)
    with pytest.raises(CheckpointError, match="WRONGTYPE"):
        store.load()


def test_batched_refreshes_match_the_one_key_script(
    sink: RedisSink, redis_client: redis.Redis
) -> None:
    # The documented per-key script and the batch script the sink sends must leave Redis in
    # the same state, refusal by refusal, for json and hash payloads, wide and empty hashes.
    from connectors.redis import REFRESH_SCRIPT

    wide = tuple((f"f{i}", str(i)) for i in range(1500))
    cases: list[tuple[str, int, int, str | tuple[tuple[str, str], ...]]] = []
    for i in range(150):
        payload: str | tuple[tuple[str, str], ...] = (
            f'{{"i": {i}, "é": "✓"}}' if i % 3 else ((("a", str(i)), ("b", "x")) if i % 2 else ())
        )
        if i == 7:
            payload = wide
        cases.append((f"case:{i}", 10 + i % 4, TTL_MS if i % 5 else 0, payload))
    single = redis_client.register_script(REFRESH_SCRIPT)
    for prefix in ("one", "batch"):
        for key, _version, _ttl, _payload in cases:
            redis_client.set(version_key(f"{prefix}:{key}"), 12)  # refuses versions 10 and 11
    for key, version, ttl, payload in cases:
        target = f"one:{key}"
        fmt, args = (
            ("json", [payload]) if isinstance(payload, str) else ("hash", list(sum(payload, ())))
        )
        single(
            keys=[target, version_key(target), lease_key(target)], args=[version, ttl, fmt, *args]
        )
    sink.apply(
        [Refresh(f"batch:{key}", payload, ttl, version) for key, version, ttl, payload in cases]
    )

    def state(prefix: str, key: str) -> tuple[object, ...]:
        name = f"{prefix}:{key}"
        kind = redis_client.type(name)
        value = redis_client.get(name) if kind == "string" else redis_client.hgetall(name)
        has_ttl = redis_client.pttl(name) > 0
        return kind, value, redis_client.get(version_key(name)), has_ttl

    for key, *_ in cases:
        assert state("batch", key) == state("one", key), key
    assert sink.stale_refusals == sum(1 for _k, version, _t, _p in cases if version < 12)
