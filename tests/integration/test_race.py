"""The race that fill leases exist for: cache-aside reads racing writes under the real worker.

MariaDB holds ``items(id, v)``; the real worker evicts ``item:{id}`` on every change (classic
cache-aside). Writer threads increment random rows while reader threads read random ids through
``CacheClient.get``, whose loader sleeps a moment between its SELECT and its return: the window
in which a write can commit and be evicted before a stale row lands in Redis. Once the writers
stop and the worker has caught up, every cached key must equal its row. The same workload then
runs with naive cache-aside (GET, on a miss SELECT then plain SET) on the same keys, and the
stale keys it leaves are reported (printed, ``record_property``, ``race.json`` in the test's tmp
dir) but not asserted: the naive count is the evidence, not the contract.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis
import structlog

from tests.integration.harness import SourceHarness
from tests.integration.worker_process import WorkerProcess, wait_until
from tests.services import MariaDBServer, RedisServer
from worker.client import CacheClient
from worker.rules import Rule
from worker.settings import compile_rules, load_settings

ROWS = 200
WRITERS = 2
READERS = 4
UPDATES_PER_WRITER = 1500
# Each phase stops at this deadline even if the writers have not finished their updates.
PHASE_SECONDS = 12.0
# Between the loader's SELECT and its return. The worker evicts some milliseconds after a commit
# (binlog transfer plus the batch's 5 ms max_delay: about 6-9 ms on an idle loopback), and a
# stale naive SET needs the eviction to land inside this window. At 10 ms the naive phase left
# 0-1 stale keys; at 50 ms it leaves a few on every run (a slow loader's serialisation and
# network hops make such windows in production too).
LOAD_DELAY_S = 0.05
# Between a writer's updates. Unpaced, 3000 updates land in half a second: the worker's lag
# grows past the window and the readers barely overlap the writes.
WRITE_PAUSE_S = 0.001

pytestmark = pytest.mark.timeout(120)


@dataclass
class PhaseStats:
    updates: int = 0
    reads: int = 0
    loads: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


@pytest.fixture
def items_db(mariadb: MariaDBServer, tmp_path: Path) -> Iterator[SourceHarness]:
    if mariadb.is_local:
        mariadb.start()
    db = SourceHarness("mysql", mariadb, tmp_path).create()
    try:
        yield db
    finally:
        db.drop()


def _connect(db: SourceHarness, **kwargs: Any) -> pymysql.Connection[Any]:
    assert isinstance(db.server, MariaDBServer)
    return db.server.connect(db.db, **kwargs)


def _writer(db: SourceHarness, seed: int, stop_at: float, stats: PhaseStats) -> None:
    rng = random.Random(seed)
    conn = _connect(db)
    try:
        with conn.cursor() as cur:
            for _ in range(UPDATES_PER_WRITER):
                if time.monotonic() > stop_at:
                    break
                cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (rng.randrange(ROWS),))
                stats.add(updates=1)
                time.sleep(WRITE_PAUSE_S)
    except Exception as exc:  # reported by the test, which must not hang on a dead thread
        stats.errors.append(f"writer: {exc!r}")
    finally:
        conn.close()


Read = Callable[[int, Callable[..., dict[str, Any] | None]], Any]


def _reader(
    db: SourceHarness, read: Read, seed: int, stop: threading.Event, stats: PhaseStats
) -> None:
    rng = random.Random(seed)
    # autocommit: every SELECT sees the latest committed row, as a web request's would.
    conn = _connect(db, cursorclass=pymysql.cursors.DictCursor)

    def load(id: int) -> dict[str, Any] | None:
        with conn.cursor() as cur:
            cur.execute("SELECT id, v FROM items WHERE id = %s", (id,))
            row = cur.fetchone()
        time.sleep(LOAD_DELAY_S)
        stats.add(loads=1)
        return None if row is None else dict(row)

    try:
        while not stop.is_set():
            read(rng.randrange(ROWS), load)
            stats.add(reads=1)
    except Exception as exc:  # reported by the test, which must not hang on a dead thread
        stats.errors.append(f"reader: {exc!r}")
    finally:
        conn.close()


def _run_phase(db: SourceHarness, read: Read, seed: int) -> PhaseStats:
    stats = PhaseStats()
    stop = threading.Event()
    stop_at = time.monotonic() + PHASE_SECONDS
    writers = [
        threading.Thread(target=_writer, args=(db, seed + i, stop_at, stats))
        for i in range(WRITERS)
    ]
    readers = [
        threading.Thread(target=_reader, args=(db, read, seed + 100 + i, stop, stats))
        for i in range(READERS)
    ]
    for thread in (*readers, *writers):
        thread.start()
    for thread in writers:
        thread.join(timeout=PHASE_SECONDS + 10)
    stop.set()
    for thread in readers:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in (*readers, *writers)), "a workload thread hung"
    assert not stats.errors, stats.errors
    return stats


def _wait_caught_up(db: SourceHarness, r: redis.Redis, phase: int) -> None:
    # The marker row is written after every workload write and the worker applies changes in
    # commit order, so once its key shows this phase, every item eviction has been applied.
    db.sql("UPDATE marker SET n = %s WHERE id = 1", args=(phase,))

    def marker() -> bool:
        raw = r.get("marker:1")
        return raw is not None and json.loads(raw)["n"] == phase

    wait_until(marker, timeout=30, what=f"worker caught up after phase {phase}")


def _stale_keys(db: SourceHarness, r: redis.Redis) -> tuple[int, int]:
    """(cached keys, cached keys whose value differs from the row)."""
    truth = dict(db.query("SELECT id, v FROM items"))
    pipe = r.pipeline(transaction=False)
    for i in range(ROWS):
        pipe.get(f"item:{i}")
    cached = [(i, json.loads(raw)) for i, raw in enumerate(pipe.execute()) if raw is not None]
    stale = [i for i, value in cached if value != {"id": i, "v": truth[i]}]
    return len(cached), len(stale)


def _naive_read(r: redis.Redis, rule: Rule) -> Read:
    def read(id: int, load: Callable[..., dict[str, Any] | None]) -> Any:
        key = f"item:{id}"
        raw = r.get(key)
        if raw is not None:
            return json.loads(raw)
        row = load(id=id)
        if row is not None:
            payload = rule.payload(row)
            assert isinstance(payload, str)
            r.set(key, payload, px=rule.ttl_for_write())
        return row

    return read


def test_leased_fills_leave_no_stale_key_where_naive_cache_aside_does(
    items_db: SourceHarness,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    db = items_db
    db.create_table("items", "id INT PRIMARY KEY, v INT NOT NULL")
    db.create_table("marker", "id INT PRIMARY KEY, n INT NOT NULL")
    db.executemany("INSERT INTO items VALUES (%s, 0)", [(i,) for i in range(ROWS)])
    db.sql("INSERT INTO marker VALUES (1, 0)")
    config = db.config(
        redis_server.url(),
        [
            {"name": "item", "table": "DB.items", "keys": ["item:{id}"], "action": "evict"},
            {"name": "marker", "table": "DB.marker", "keys": ["marker:{id}"]},
        ],
    )
    cache = CacheClient.from_config(config)
    [item_rule] = [r for r in compile_rules(load_settings(config)).rules if r.name == "item"]
    naive_redis = redis_server.client()
    began = time.monotonic()
    try:
        with WorkerProcess(config) as worker:
            worker.wait_streaming()

            def leased(id: int, load: Callable[..., dict[str, Any] | None]) -> Any:
                return cache.get("item", load, id=id)

            with structlog.testing.capture_logs() as logs:
                ours = _run_phase(db, leased, seed=1)
            # Fills the lease check refused because a change reached the key during the load;
            # the naive phase writes these, and those whose row was already old stay stale.
            dropped = sum(1 for e in logs if e["event"] == "cache_fill_dropped")
            _wait_caught_up(db, redis_client, 1)
            ours_cached, ours_stale = _stale_keys(db, redis_client)

            redis_client.delete(*(f"item:{i}" for i in range(ROWS)))
            naive = _run_phase(db, _naive_read(naive_redis, item_rule), seed=2)
            _wait_caught_up(db, redis_client, 2)
            naive_cached, naive_stale = _stale_keys(db, redis_client)
            assert worker.stop() == 0
    finally:
        naive_redis.close()
        if hasattr(cache.redis, "close"):
            cache.redis.close()

    result = {
        "rows": ROWS,
        "load_delay_ms": LOAD_DELAY_S * 1000,
        "seconds": round(time.monotonic() - began, 1),
        "leased": {
            "updates": ours.updates,
            "reads": ours.reads,
            "loads": ours.loads,
            "fills_dropped": dropped,
            "cached": ours_cached,
            "stale": ours_stale,
        },
        "naive": {
            "updates": naive.updates,
            "reads": naive.reads,
            "loads": naive.loads,
            "cached": naive_cached,
            "stale": naive_stale,
        },
    }
    (tmp_path / "race.json").write_text(json.dumps(result, indent=2))
    record_property("leased_stale", ours_stale)
    record_property("naive_stale", naive_stale)
    record_property("race", json.dumps(result))
    print(f"\nrace: {json.dumps(result)}")
    assert ours.updates > 0 and ours.loads > 0
    assert ours_stale == 0, result
