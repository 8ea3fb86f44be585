"""The benchmark's Redis CPU reading (``bench.redis_cpu``) against a real Redis: it reads the
server's own process CPU, and work done by Redis shows up in it."""

from __future__ import annotations

from bench import redis_cpu
from tests.services import RedisServer


def test_cpu_seconds_grow_with_work_redis_does(redis_server: RedisServer) -> None:
    before = redis_cpu.cpu_seconds(redis_server)
    assert before is not None and before > 0
    client = redis_server.client()
    try:
        # A few thousand pipelined SETs with expiry: tens of milliseconds of Redis CPU at most,
        # well above the 1 ms granularity of the kernel's accounting after enough of them.
        for _round in range(20):
            pipe = client.pipeline(transaction=False)
            for i in range(2000):
                pipe.set(f"cpu:{i}", "x" * 100, px=60_000)
            pipe.execute()
    finally:
        client.close()
    after = redis_cpu.cpu_seconds(redis_server)
    assert after is not None and after > before
    per_row = redis_cpu.per_row_us(before, after, 40_000)
    assert per_row is not None and per_row > 0
