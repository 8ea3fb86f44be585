"""Chaos on every source: kill -9 the worker at random moments under a write load, ten times.

After the writers stop and a fresh worker catches up, ``cache-worker verify`` must find 0 stale
keys and every row's key must be present (0 lost). Loopback servers only; the load and the kill
loop are bounded in count and in time.
"""

from __future__ import annotations

import random
import threading
import time

import redis

from tests.integration.harness import SourceHarness
from tests.integration.worker_process import WorkerProcess, run_cli, wait_until
from tests.services import RedisServer

ROWS = 300
KILLS = 10


def test_kill_9_ten_times_under_load_then_verify_finds_nothing_stale(
    source: SourceHarness, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    source.create_table("items", "id INT PRIMARY KEY, v INT NOT NULL, note VARCHAR(40)")
    cfg = source.config(
        redis_server.url(), [{"name": "items", "table": "DB.items", "keys": ["item:{id}"]}]
    )
    # The first run saves the start position, so every row written from here on must get a key.
    assert run_cli(cfg, "run", "--until-idle").returncode == 0
    source.executemany(
        "INSERT INTO items (id, v, note) VALUES (%s, 0, 'start')", [(i,) for i in range(ROWS)]
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def write_load(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 60
        try:
            for n in range(4000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                i = rng.randrange(ROWS)
                if n % 50 == 0:
                    source.sql(f"DELETE FROM items WHERE id = {i}")
                    source.sql(f"INSERT INTO items (id, v, note) VALUES ({i}, {n}, 'again')")
                else:
                    source.sql(f"UPDATE items SET v = v + 1, note = 'w{seed}' WHERE id = {i}")
        except BaseException as exc:
            errors.append(exc)

    rng = random.Random(42)
    writers = [threading.Thread(target=write_load, args=(s,)) for s in range(2)]
    worker = WorkerProcess(cfg).start()
    for writer in writers:
        writer.start()
    try:
        for _ in range(KILLS):
            worker.wait_streaming()
            time.sleep(rng.uniform(0.05, 0.8))
            worker.kill()
            worker = WorkerProcess(cfg).start()
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
        assert not errors, errors
        worker.wait_streaming()

        ids = [row[0] for row in source.query("SELECT id FROM items")]

        def all_present_and_verified() -> bool:
            pipe = redis_client.pipeline()
            for i in ids:
                pipe.exists(f"item:{i}")
            if not all(pipe.execute()):
                return False
            return run_cli(cfg, "verify").returncode == 0

        wait_until(all_present_and_verified, timeout=120, interval=1.0, what="0 lost, 0 stale")
        report = run_cli(cfg, "verify")
        assert report.returncode == 0, report.stdout + report.stderr
        assert worker.stop() == 0
    finally:
        stop.set()
        if not worker.exited():
            worker.kill()
