"""Poison changes against real servers: Redis refusing some keys, dead letters, ``dlq`` commands.

Redis refuses keys deterministically through an ACL user that may write ``user:*`` and
``cache-worker:*`` (and the ``{user:*`` companions the refresh script touches) but not
``poison:*``: a rule with keys ``user:{id}`` and ``poison:{id}`` then has exactly its poison keys
refused with NOPERM. The worker runs as the real CLI child process on a fresh MariaDB database.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast
from urllib.parse import quote

import pytest
import redis

from connectors.redis import RedisDeadLetterStore, RedisOptions, RedisSink, connect
from tests.integration.harness import SourceHarness
from tests.integration.redis_reads import get_json
from tests.integration.worker_process import WorkerProcess, run_cli, wait_until
from tests.services import MariaDBServer, RedisServer
from worker.actions import CacheAction, Evict, Refresh
from worker.dead_letters import DeadLetter
from worker.errors import PartialApplyError
from worker.keys import version_key

ACL_PASSWORD = "dlq-Pa55:w0rd"
TTL_MS = 60_000


@pytest.fixture
def source(mariadb: MariaDBServer, tmp_path: Path) -> Iterator[SourceHarness]:
    if mariadb.is_local:
        mariadb.start()
    harness = SourceHarness("mysql", mariadb, tmp_path).create()
    try:
        yield harness
    finally:
        harness.drop()


@pytest.fixture
def acl_user(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[str]:
    """An ACL user that may not touch ``poison:*``; the redis:// URL that logs in as it."""
    name = f"cw_{uuid.uuid4().hex[:8]}"
    # redis-py leaves execute_command unannotated (here and below).
    redis_client.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", name, "on", f">{ACL_PASSWORD}", "+@all",
        "~user:*", "~{user:*", "~cache-worker:*",
    )  # fmt: skip
    try:
        yield (
            f"redis://{name}:{quote(ACL_PASSWORD, safe='')}@"
            f"{redis_server.host}:{redis_server.port}/0"
        )
    finally:
        # ACL users outlive FLUSHALL: the session server must not keep this one.
        redis_client.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]


def _acl_name(url: str) -> str:
    return url.split("//", 1)[1].split(":", 1)[0]


def stream_entries(r: redis.Redis, key: str) -> list[dict[str, str]]:
    # A decode_responses client: ids and fields are str (and XRANGE of no stream is [], not None).
    entries = cast(list[tuple[str, dict[str, str]]], r.xrange(key))
    return [dict(fields) for _id, fields in entries]


# ------------------------------------------------------------------------------------------
# The sink and the stream, without a worker
# ------------------------------------------------------------------------------------------


def test_sink_names_refused_actions_and_applies_the_rest(
    acl_user: str, redis_client: redis.Redis
) -> None:
    client = connect(RedisOptions(acl_user))
    sink = RedisSink(client)
    try:
        unencodable = Refresh("user:bad", (("f", None),), TTL_MS, 1)  # type: ignore[arg-type]
        actions: list[CacheAction] = [
            Refresh("user:1", '{"id":1}', TTL_MS, 1),
            Refresh("poison:1", '{"id":1}', TTL_MS, 1),
            unencodable,
            Evict("poison:2"),
            Evict("user:2"),
        ]
        redis_client.set("user:2", "stale")
        with pytest.raises(PartialApplyError, match="3 of 5") as caught:
            sink.apply(actions)
        failed = caught.value.failed
        assert [a.key for a, _ in failed] == ["poison:1", "user:bad", "poison:2"]
        assert failed[0][0] is actions[1]  # the very objects, so callers can map them back
        assert failed[0][1].startswith("NOPERM") and failed[2][1].startswith("NOPERM")
        assert "cannot encode" in failed[1][1]
        assert all(ACL_PASSWORD not in error for _, error in failed)
        assert redis_client.get("user:1") == '{"id":1}'
        assert not redis_client.exists("user:2")
        # The connection is still in step: the next batch works.
        sink.apply([Refresh("user:3", '"ok"', TTL_MS, 1)])
        assert redis_client.get("user:3") == '"ok"'
    finally:
        sink.close()


def test_dead_letter_stream_add_list_delete_purge(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    client = connect(RedisOptions(redis_server.url(), password=redis_server.password))
    store = RedisDeadLetterStore(client, "cache-worker:dlq:t")
    try:
        entries = [
            DeadLetter(f"k{i}", "r", "refresh", i, "NOPERM no", "2024-01-01T00:00:00+00:00",
                       value='{"a":"é"}', format="json", ttl_ms=1000)
            for i in range(5)
        ]  # fmt: skip
        ids = store.add(entries)
        assert len(ids) == 5 and redis_client.xlen("cache-worker:dlq:t") == 5
        listed = store.list(2)
        assert [e.key for e in listed] == ["k0", "k1"] and listed[0].id == ids[0]
        assert listed[0] == entries[0]  # every field survives the round trip (id aside)
        assert [e.key for e in store.list(10, "(" + ids[1])] == ["k2", "k3", "k4"]
        assert store.delete(ids[:2]) == 2
        assert [e.key for e in store.list(10)] == ["k2", "k3", "k4"]
        assert store.purge() == 3
        assert store.list(10) == [] and not redis_client.exists("cache-worker:dlq:t")
    finally:
        client.close()


# ------------------------------------------------------------------------------------------
# The worker and the dlq commands
# ------------------------------------------------------------------------------------------


def test_refused_keys_are_dead_lettered_and_replayed_after_the_grant(
    source: SourceHarness, acl_user: str, redis_client: redis.Redis
) -> None:
    source.create_table("users", "id INT PRIMARY KEY, name VARCHAR(100)")
    cfg = source.config(
        acl_user,
        [
            {
                "name": "profile",
                "table": "DB.users",
                "keys": ["user:{id}", "poison:{id}"],
                "columns": ["id", "name"],
            }
        ],
        extra="\n[batch]\npoison_retries = 2\n",
    )
    stream = f"cache-worker:dlq:{source.db}"
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        source.sql("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b')")
        wait_until(lambda: redis_client.xlen(stream) == 2, what="two dead letters")
        # redis_client decodes responses and these keys are written: GET gives a str.
        assert get_json(redis_client, "user:1") == {"id": 1, "name": "a"}
        assert get_json(redis_client, "user:2") == {"id": 2, "name": "b"}
        entries = stream_entries(redis_client, stream)
        assert [(e["key"], e["rule"], e["action"]) for e in entries] == [
            ("poison:1", "profile", "refresh"),
            ("poison:2", "profile", "refresh"),
        ]
        assert all(e["error"].startswith("NOPERM") for e in entries)
        assert json.loads(entries[0]["value"]) == {"id": 1, "name": "a"}
        assert entries[0]["at"].endswith("+00:00")

        # Still running: later changes are applied as usual.
        source.sql("INSERT INTO users (id, name) VALUES (3, 'c')")
        wait_until(lambda: redis_client.exists("user:3"), what="later change applied")
        wait_until(lambda: redis_client.xlen(stream) == 3, what="third dead letter")
        wait_until(lambda: worker.has_event("progress"), what="progress event")
        assert not worker.exited()
        assert worker.stop() == 0
    lettered = [e for e in worker.events() if e.get("event") == "dead_lettered"]
    assert [e["key"] for e in lettered] == ["poison:1", "poison:2", "poison:3"]
    assert lettered[-1]["dead_letters_total"] == 3 and lettered[-1]["rule"] == "profile"
    assert lettered[-1]["level"] == "warning" and "NOPERM" in lettered[-1]["error"]
    assert any(e.get("dead_letters") == 3 for e in worker.events() if e["event"] == "stopped")
    assert ACL_PASSWORD not in worker.output()

    listed = run_cli(cfg, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines, start=1):
        assert f"  profile  poison:{i}  refresh  NOPERM" in line
    assert ACL_PASSWORD not in listed.stdout + listed.stderr

    # Still forbidden: the replay fails for every entry and keeps them.
    again = run_cli(cfg, "dlq", "replay", "--yes")
    assert again.returncode == 4, again.stdout + again.stderr
    assert "0 replayed, 3 failed, 0 skipped" in again.stdout
    assert redis_client.xlen(stream) == 3

    redis_client.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", _acl_name(acl_user), "~poison:*", "~{poison:*"
    )
    # A change made after the grant writes poison:1 at a newer version than its dead letter.
    source.sql("UPDATE users SET name = 'newer' WHERE id = 1")
    burst = run_cli(cfg, "run", "--until-idle", "--log-format", "json")
    assert burst.returncode == 0, burst.stdout + burst.stderr
    assert get_json(redis_client, "poison:1")["name"] == "newer"

    replayed = run_cli(cfg, "dlq", "replay", "--yes")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "3 replayed, 0 failed, 0 skipped" in replayed.stdout
    assert redis_client.xlen(stream) == 0
    # never moved back
    assert get_json(redis_client, "poison:1")["name"] == "newer"
    assert get_json(redis_client, "poison:2") == {"id": 2, "name": "b"}
    assert get_json(redis_client, "poison:3") == {"id": 3, "name": "c"}
    assert redis_client.get(version_key("poison:2")) is not None
    assert 0 < redis_client.pttl("poison:2") <= 3_600_000

    redis_client.xadd(stream, {"key": "x", "rule": "r", "action": "evict", "version": "1"})
    purged = run_cli(cfg, "dlq", "purge", "--yes")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert "1 dead letters purged" in purged.stdout
    assert not redis_client.exists(stream)


def test_value_larger_than_max_value_bytes_is_evicted(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    source.create_table("users", "id INT PRIMARY KEY, bio TEXT")
    cfg = source.config(
        redis_server.url(),
        [{"name": "bio", "table": "DB.users", "keys": ["bio:{id}"], "max_value_bytes": 200}],
    )
    redis_client.set("bio:1", "stale")
    with WorkerProcess(cfg) as worker:
        worker.wait_streaming()
        source.sql("INSERT INTO users (id, bio) VALUES (1, REPEAT('x', 500)), (2, 'short')")
        wait_until(lambda: redis_client.exists("bio:2"), what="small row written")
        assert not redis_client.exists("bio:1")
        source.sql("UPDATE users SET bio = REPEAT('y', 300) WHERE id = 2")
        wait_until(lambda: not redis_client.exists("bio:2"), what="row grown too large")
        assert worker.stop() == 0
    [warning] = [e for e in worker.events() if e.get("event") == "value_too_large"]
    assert warning["key"] == "bio:1" and warning["rule"] == "bio"
    assert warning["bytes"] == len('{"id":1,"bio":""}') + 500 and warning["limit"] == 200
    assert not redis_client.exists("cache-worker:dlq:" + source.db)
