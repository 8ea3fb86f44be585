"""The servers, the loaded binlog and the contenders of the benchmark, each run on one range.

``load`` creates ``bench.items``, fills it, records the binlog position, writes the workload and
records the end position. Each contender then reads exactly that range: two stock
``pymysqlreplication`` loops (parse only; one unpipelined Redis DEL per row, the tutorial
baseline) and the real ``cache-worker run --until-idle`` CLI with a file checkpoint preset to the
start, timed from process start to exit so its startup cost is included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import pymysql
from pymysql.constants import CLIENT
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from bench.report import Result
from bench.workload import (
    TABLE_DDL,
    Transaction,
    initial_rows,
    insert_rows_sql,
    render_batch,
)
from connectors.mysql import make_position
from tests.services import MariaDBServer, RedisServer
from worker.checkpoint import encode_checkpoint

LOAD_BATCH_ROWS = 2000
TX_PER_BATCH = 200
WORKER_TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class BinlogRange:
    """Where the workload starts and ends in the binlog."""

    start_file: str
    start_pos: int
    end_file: str
    end_pos: int


def _master_status(conn: pymysql.Connection[Any]) -> tuple[str, int]:
    with conn.cursor() as cur:
        cur.execute("SHOW MASTER STATUS")
        row = cur.fetchone()
    if row is None:
        raise RuntimeError("SHOW MASTER STATUS returned nothing: is the binlog enabled?")
    return str(row[0]), int(row[1])


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def load(mariadb: MariaDBServer, rows: int, seed: int, txs: Iterable[Transaction]) -> BinlogRange:
    """Create and fill the table, then write the workload; returns its binlog range."""
    # Multi-statement batches: one round trip per TX_PER_BATCH transactions keeps loading fast,
    # while each transaction still gets its own BEGIN/COMMIT and so its own binlog transaction.
    conn = mariadb.connect(client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE bench")
            cur.execute(TABLE_DDL)
            for batch in _batches(initial_rows(rows, seed), LOAD_BATCH_ROWS):
                cur.execute(insert_rows_sql(batch))
        start = _master_status(conn)
        with conn.cursor() as cur:
            for tx_batch in _batches(txs, TX_PER_BATCH):
                cur.execute(render_batch(tx_batch))
                while cur.nextset():
                    pass
        end = _master_status(conn)
    finally:
        conn.close()
    return BinlogRange(start[0], start[1], end[0], end[1])


def _reader(mariadb: MariaDBServer, rng: BinlogRange, server_id: int) -> BinLogStreamReader:
    return BinLogStreamReader(
        connection_settings={
            "host": mariadb.host,
            "port": mariadb.port,
            "user": mariadb.user,
            "passwd": mariadb.password,
        },
        server_id=server_id,
        blocking=False,
        resume_stream=True,
        log_file=rng.start_file,
        log_pos=rng.start_pos,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
        is_mariadb=False,
    )


def _past_end(stream: BinLogStreamReader, rng: BinlogRange) -> bool:
    file, pos = stream.log_file, stream.log_pos
    return bool(file is not None and pos is not None and (file, pos) >= (rng.end_file, rng.end_pos))


def _stream_rows(
    mariadb: MariaDBServer, rng: BinlogRange, server_id: int, on_row: Callable[[Any], None]
) -> tuple[int, float]:
    started = time.perf_counter()
    stream = _reader(mariadb, rng, server_id)
    count = 0
    try:
        for event in stream:
            for row in event.rows:
                on_row(row)
                count += 1
            # Nothing writes after the workload, so the log's end is the range's end; the check
            # just keeps the loop honest if something ever does.
            if _past_end(stream, rng):
                break
    finally:
        stream.close()
    return count, time.perf_counter() - started


def parse_only(mariadb: MariaDBServer, rng: BinlogRange) -> Result:
    """Stock BinLogStreamReader decoding every row and doing nothing with it."""
    rows, seconds = _stream_rows(mariadb, rng, 9001, lambda _row: None)
    return Result("mysql-replication parse-only", rows, seconds)


def naive_delete(mariadb: MariaDBServer, redis_server: RedisServer, rng: BinlogRange) -> Result:
    """Stock reader plus one unpipelined ``DEL item:<id>`` per row (the tutorial baseline)."""
    client = redis_server.client()
    try:

        def delete(row: Any) -> None:
            values = row.get("values") or row.get("after_values")
            client.delete(f"item:{values['id']}")

        rows, seconds = _stream_rows(mariadb, rng, 9002, delete)
    finally:
        client.close()
    return Result("naive DEL per row", rows, seconds)


def _toml(value: object) -> str:
    return json.dumps(value)  # JSON strings and lists of strings are valid TOML too


def write_worker_config(
    directory: Path,
    name: str,
    mariadb: MariaDBServer,
    redis_server: RedisServer,
    rule: dict[str, Any],
    rng: BinlogRange,
) -> Path:
    """A config and a file checkpoint preset to the range's start; returns the config path."""
    checkpoint = directory / f"{name}.checkpoint.json"
    checkpoint.write_text(encode_checkpoint(make_position(rng.start_file, rng.start_pos, None)))
    lines = [
        f"name = {_toml(name)}",
        "",
        "[source]",
        'kind = "mysql"',
        f"dsn = {_toml(mariadb.dsn())}",
        'resume = "file"',
        "server_id = 9100",
        "",
        "[redis]",
        f"url = {_toml(redis_server.url())}",
        "",
        "[checkpoint]",
        'store = "file"',
        f"path = {_toml(str(checkpoint))}",
        "",
        "[log]",
        'progress_interval = "1s"',
        "",
        "[[rules]]",
        *(f"{key} = {_toml(value)}" for key, value in rule.items()),
        "",
    ]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def _stamp(event: dict[str, Any]) -> float | None:
    text = event.get("timestamp")
    return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None


def run_worker(label: str, config: Path, log_path: Path) -> Result:
    """Run ``cache-worker run --until-idle`` to exit; rows come from its final ``stopped`` event."""
    command = [
        str(Path(sys.executable).with_name("cache-worker")),
        "run",
        "--until-idle",
        "--log-format",
        "json",
        "--config",
        str(config),
    ]
    started = time.perf_counter()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
        try:
            code = proc.wait(timeout=WORKER_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - started
    events = []
    for line in log_path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    if code != 0:
        # The log lives in a temporary directory that is removed on the way out, so its tail
        # goes into the error itself.
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{label}: cache-worker exited with {code}; log tail:\n{tail}")
    stopped = [e for e in events if e.get("event") == "stopped"]
    rows = int(stopped[-1]["rows"]) if stopped else 0
    notes = "wall time incl. startup"
    # From the moment the source streams to the final event: the worker's own steady rate,
    # without interpreter start-up and connection set-up.
    streaming = [e for e in events if e.get("event") == "source_streaming"]
    begin = _stamp(streaming[0]) if streaming else None
    end = _stamp(stopped[-1]) if stopped else None
    if begin is not None and end is not None and end > begin:
        notes += f"; streaming {end - begin:.2f}s = {rows / (end - begin):,.0f} rows/s"
    return Result(label, rows, seconds, notes)
