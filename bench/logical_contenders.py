"""The postgres-logical contenders: stock pg_recvlogical readers and the worker on slots.

Per workload two fresh baseline slots are created before it is written: ``pg_recvlogical``
receiving the pgoutput stream into /dev/null (the server's decoding ceiling) and the tutorial
baseline, ``pg_recvlogical`` with ``test_decoding`` piped into one unpipelined Redis DEL per row.
The workers (evict and json refresh rule) each have their own slot, made by ``cache-worker
setup`` once for all workloads; the slot is the checkpoint, so no preset is needed.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

from bench import rules
from bench.postgres_common import (
    Connection,
    SourceBench,
    flush,
    pg_tool,
    sample_note,
    tool_env,
    write_workload,
)
from bench.report import Result
from bench.worker_run import cli
from tests.services import PostgresServer, RedisServer

RECV_SLOT = "bench_recv"
NAIVE_SLOT = "bench_naive"
RECV_PUBLICATION = "bench_recv"
# test_decoding prints "table <schema>.<name>: <OP>: id[integer]:<id> ..." per row change.
_TEST_DECODING_ROW = re.compile(rb"^table [^:]+: (?:INSERT|UPDATE|DELETE): id\[integer\]:(\d+)")


def _recvlogical(pg: PostgresServer, slot: str, end_lsn: str, options: list[str]) -> list[str]:
    return [
        pg_tool("pg_recvlogical"),
        "--start",
        "--no-loop",
        "-S", slot,
        "-E", end_lsn,
        "-d", f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}",
        *options,
    ]  # fmt: skip


def recv_only(pg: PostgresServer, end_lsn: str, expected_rows: int, timeout: float) -> Result:
    """Stock pg_recvlogical receiving pgoutput up to ``end_lsn`` into /dev/null."""
    command = _recvlogical(
        pg,
        RECV_SLOT,
        end_lsn,
        [
            "-P", "pgoutput",
            "-o", "proto_version=1",
            "-o", f"publication_names={RECV_PUBLICATION}",
            "-f", "/dev/null",
        ],
    )  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        command, env=tool_env(pg), capture_output=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({done.returncode}): {done.stderr[-2000:]!r}")
    return Result(
        "pg_recvlogical receive-only (pgoutput)",
        expected_rows,
        seconds,
        "rows: the workload's count (the stream is not parsed); process wall time",
        kind="parse",
    )


def naive_recv(
    pg: PostgresServer, redis_server: RedisServer, end_lsn: str, max_rows: int, timeout: float
) -> Result:
    """pg_recvlogical with test_decoding, one unpipelined ``DEL item:<id>`` per row.

    Stops after ``max_rows`` rows: its rate is steady, and the whole range would cost minutes.
    """
    command = _recvlogical(pg, NAIVE_SLOT, end_lsn, ["-P", "test_decoding", "-f", "-"])
    client = redis_server.client()
    rows = 0
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        command,
        env=tool_env(pg),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _TEST_DECODING_ROW.match(line)
            if match is not None:
                client.delete(rules.item_key(int(match.group(1))))
                rows += 1
                if rows >= max_rows:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive pg_recvlogical reader took more than {timeout}s")
        seconds = time.perf_counter() - started
        if rows >= max_rows:
            proc.kill()
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code != 0 and rows < max_rows:
            stderr = proc.stderr.read() if proc.stderr is not None else b""
            raise RuntimeError(f"pg_recvlogical failed ({code}): {stderr[-2000:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        client.close()
    return Result(
        "naive DEL per row (pg_recvlogical test_decoding)",
        rows,
        seconds,
        sample_note(rows, max_rows),
        kind="naive",
    )


def _baseline_slots(pg: PostgresServer, table: str, create: bool) -> None:
    """Drop the two baseline slots and their publication; with ``create``, make them anew."""
    with pg.connect() as conn:
        for slot in (RECV_SLOT, NAIVE_SLOT):
            exists = conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if exists:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f"DROP PUBLICATION IF EXISTS {RECV_PUBLICATION}")
        if create:
            conn.execute(f"CREATE PUBLICATION {RECV_PUBLICATION} FOR TABLE {table}")
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (RECV_SLOT,))
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (NAIVE_SLOT,)
            )


class LogicalBench(SourceBench):
    """postgres-logical: the workers' slots (``setup``) and two baseline slots per workload."""

    prefix = "logical"
    # The slot is polled this often when the worker is caught up (default 1 s); the lag test
    # needs a short one, or a commit arriving just after an empty peek waits a whole interval.
    poll_interval = "10ms"

    def source(self, kind: str) -> dict[str, Any]:
        return {
            "kind": "postgres-logical",
            "dsn": self.pg.dsn(),
            "poll_interval": self.poll_interval,
        }

    def setup(self) -> None:
        # One at a time: creating a slot waits for every running transaction, another
        # setup's included.
        for _label, _kind, config in self.configs:
            cli("setup", configs=[config])

    def teardown(self) -> None:
        # Slots keep WAL and make every later peek decode more: never leave one behind.
        try:
            _baseline_slots(self.pg, self.table, create=False)
        finally:
            super().teardown()

    def run(
        self,
        write: Callable[[Connection], None],
        expected_rows: int,
        naive_rows: int,
        into: list[Result],
    ) -> None:
        """Fresh baseline slots, the workload, then every contender; appends to ``into``."""
        _baseline_slots(self.pg, self.table, create=True)
        self.log("  writing ...")
        end_lsn = write_workload(self.pg, write)
        flush(self.redis_server)
        self.log("  pg_recvlogical receive-only ...")
        into.append(recv_only(self.pg, end_lsn, expected_rows, self.timeout))
        flush(self.redis_server)
        self.log("  naive ...")
        into.append(naive_recv(self.pg, self.redis_server, end_lsn, naive_rows, self.timeout))
        self._workers(expected_rows, into)
