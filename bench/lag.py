"""The lag test: commit -> key visible in Redis, at a fixed offered load, for one source.

A running ``cache-worker run`` (not burst mode) follows the source; the benchmark process then
commits one INSERT per transaction into the lag table at a fixed rate and records when each
commit returned, while a separate reader process, subscribed to the bench Redis's keyspace
notifications for ``lag:*``, records when each key was first written. Both use the system-wide
monotonic clock. The reader is its own process so neither the writer's pacing nor the GIL delays
its timestamps. Everything is bounded: the writer stops at its count or at a deadline, the
reader once it saw every key or at its own deadline, and the worker is stopped in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import keyspace_reader
from bench.report import LagResult
from bench.stats import summarize_lag
from bench.worker_run import BEGIN_EVENTS, WorkerProcess
from tests.services import RedisServer

# A writer: (insert row i and return after its commit, close).
Writer = tuple[Callable[[int], None], Callable[[], None]]

WORKER_READY_TIMEOUT_S = 60.0
# After the source connects, a moment for the worker's first batch and caches to settle.
WARMUP_S = 0.5
READER_READY_TIMEOUT_S = 30.0
# How long after the last commit the reader may still wait for keys.
DRAIN_TIMEOUT_S = 15.0
# How far behind schedule the writer may catch up at full speed (see write_paced).
MAX_CATCH_UP_S = 0.02


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


def write_paced(
    insert: Callable[[int], None], count: int, rate: float, deadline: float
) -> dict[int, float]:
    """Insert ids 1..count, the i-th due at start + (i-1)/rate; commit times by id.

    A writer that fell behind (a commit stalled) catches up by at most ``MAX_CATCH_UP_S`` of
    transactions, then moves its schedule: a stall followed by a burst at full speed would
    measure how the worker drains a burst, not its lag at the offered rate. The achieved rate
    is reported beside the offered one. Stops at ``deadline`` (monotonic) whatever the count.
    """
    commits: dict[int, float] = {}
    start = time.monotonic()
    for i in range(1, count + 1):
        due = start + (i - 1) / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > MAX_CATCH_UP_S:
            start += now - due - MAX_CATCH_UP_S
        insert(i)
        commits[i] = now = time.monotonic()
        if now > deadline:
            break
    return commits


def achieved_rate(commits: dict[int, float]) -> float:
    """Transactions per second between the first and the last commit."""
    if len(commits) < 2:
        return 0.0
    span = max(commits.values()) - min(commits.values())
    return (len(commits) - 1) / span if span > 0 else 0.0


def measure(
    source: str,
    config: Path,
    redis_server: RedisServer,
    open_writer: Callable[[], Writer],
    rate: int,
    seconds: float,
    work: Path,
    log: Callable[[str], None],
    notes: str = "",
) -> LagResult:
    """Run the lag test for one source whose worker config has the lag rule."""
    count = int(rate * seconds)
    out_path, ready_path = work / f"lag-{source}.json", work / f"lag-{source}.ready"
    out_path.unlink(missing_ok=True)
    ready_path.unlink(missing_ok=True)
    admin = redis_server.client()
    # An empty cache: another source's lag test wrote the same keys, with versions from its
    # own log that this source's writes could never beat (they would be refused as stale).
    admin.flushdb()
    admin.config_set("notify-keyspace-events", keyspace_reader.KEYSPACE_EVENTS)
    writer_seconds = 3 * seconds + 10
    env = dict(os.environ)
    if redis_server.password:
        env[keyspace_reader.PASSWORD_ENV] = redis_server.password
    # The reader and the worker start side by side: both take a moment to import.
    reader = subprocess.Popen(
        [
            sys.executable, "-m", "bench.keyspace_reader",
            "--host", redis_server.host,
            "--port", str(redis_server.port),
            "--expected", str(count),
            "--max-seconds", str(WORKER_READY_TIMEOUT_S + writer_seconds + DRAIN_TIMEOUT_S),
            "--ready", str(ready_path),
            "--out", str(out_path),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    commits: dict[int, float] = {}
    worker = WorkerProcess(config, work / f"lag-{source}.log").start()
    try:
        if not worker.wait_for_event(BEGIN_EVENTS, WORKER_READY_TIMEOUT_S):
            tail = "\n".join(json.dumps(e) for e in worker.events()[-10:])
            raise RuntimeError(f"the lag worker for {source} did not start streaming:\n{tail}")
        if not _wait_for_file(ready_path, reader, READER_READY_TIMEOUT_S):
            raise RuntimeError("the keyspace reader did not subscribe in time")
        time.sleep(WARMUP_S)
        log(f"  writing {count} transactions at {rate}/s ...")
        insert, close = open_writer()
        try:
            commits = write_paced(insert, count, rate, time.monotonic() + writer_seconds)
        finally:
            close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reader.wait(DRAIN_TIMEOUT_S)
    finally:
        if reader.poll() is None:
            reader.terminate()  # it writes what it saw and exits
            try:
                reader.wait(5)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait(5)
        exited = worker.stop()
        worker.kill()
        admin.config_set("notify-keyspace-events", "")
        admin.close()
    seen = keyspace_reader.read_stamps(out_path)
    # The raw samples stay beside the reader's for a closer look (``--keep``).
    (work / f"lag-{source}.commits.json").write_text(json.dumps(commits))
    problems = [notes]
    if exited.code != 0:
        problems.append(f"worker exited {exited.code}")
    stopped = [e for e in exited.events if e.get("event") == "stopped"]
    refused = stopped[-1].get("stale_refusals") if stopped else None
    if refused:
        problems.append(f"{refused} writes refused as stale")
    notes = "; ".join(filter(None, problems))
    summary = summarize_lag(commits, seen)
    return LagResult(
        source=source,
        offered_tx_per_s=rate,
        achieved_tx_per_s=achieved_rate(commits),
        transactions=len(commits),
        seen=sum(1 for i in commits if i in seen),
        p50_ms=summary.p50_ms if summary else None,
        p99_ms=summary.p99_ms if summary else None,
        max_ms=summary.max_ms if summary else None,
        notes=notes,
    )
