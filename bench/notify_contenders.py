"""The postgres-notify contenders: reading the outbox, and the worker consuming its own.

The triggers (``cache-worker setup`` once for all workloads) fill one outbox; both workers
(evict and json refresh rule) consume the same rows in turn. The baselines read the outbox in id
order without consuming it, before the workers run: parsing its JSON images only (the ceiling of
reading that table), and with one unpipelined Redis DEL per row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from bench import rules
from bench.postgres_common import Connection, SourceBench, flush, sample_note, write_workload
from bench.report import Result
from bench.worker_run import cli
from tests.services import PostgresServer

OUTBOX_READ_BATCH = 1000


def outbox_read(
    pg: PostgresServer,
    schema_name: str,
    client: redis.Redis | None,
    max_rows: int | None,
    label: str,
    kind: str,
    timeout: float,
) -> Result:
    """Read the outbox in id order and parse its images; with ``client``, DEL per row.

    Reads without consuming (the worker consumes the same outbox afterwards), up to
    ``max_rows`` rows when given.
    """
    select = (
        f"SELECT id, old::text, new::text FROM {schema_name}.outbox "
        "WHERE id > %s ORDER BY id LIMIT %s"
    )
    rows = 0
    last = 0
    started = time.perf_counter()
    limit = max_rows if max_rows is not None else float("inf")
    deadline = time.monotonic() + timeout
    with pg.connect() as conn:
        while rows < limit:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading the outbox took more than {timeout:.0f}s")
            batch = conn.execute(select, (last, OUTBOX_READ_BATCH)).fetchall()
            if not batch:
                break
            for outbox_id, old, new in batch:
                before = json.loads(old) if old is not None else None
                after = json.loads(new) if new is not None else None
                image = after if after is not None else before
                if client is not None and image is not None:
                    client.delete(rules.item_key(image["id"]))
                rows += 1
                last = outbox_id
                if rows >= limit:
                    break
    note = sample_note(rows, max_rows) if max_rows is not None else ""
    return Result(label, rows, time.perf_counter() - started, note, kind=kind)


class NotifyBench(SourceBench):
    """postgres-notify: one outbox, filled once by the triggers, consumed by each worker.

    The triggers are what makes writing slow (see the pgbench part), so the workload is
    captured once, by the triggers of the refresh worker's config (whose rules name both
    tables); the evict worker shares its outbox schema. The outbox is copied aside after the
    workload and put back before every worker but the first, since consuming deletes it.
    """

    prefix = "notify"
    schema_name = "cw_bench"

    def source(self, kind: str) -> dict[str, Any]:
        return {
            "kind": "postgres-notify",
            "dsn": self.pg.dsn(),
            "schema_name": self.schema_name,
            "channel": self.schema_name,
        }

    @property
    def _copy(self) -> str:
        return f"{self.table.partition('.')[0]}.outbox_copy"

    def setup(self) -> None:
        cli("setup", configs=[self.lag_config])

    def teardown(self) -> None:
        try:
            with self.pg.connect() as conn:
                conn.execute(f"DROP TABLE IF EXISTS {self._copy}")
        finally:
            cli("teardown", configs=[self.lag_config])

    def before_worker(self, index: int) -> None:
        if index == 0:
            return
        with self.pg.connect() as conn:
            conn.execute(f"INSERT INTO {self.schema_name}.outbox SELECT * FROM {self._copy}")

    def run(
        self,
        write: Callable[[Connection], None],
        expected_rows: int,
        naive_rows: int,
        into: list[Result],
    ) -> None:
        """The workload, the two outbox readers, then the workers on the same outbox rows."""
        self.log("  writing ...")
        write_workload(self.pg, write)
        with self.pg.connect() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {self._copy}")
            conn.execute(f"CREATE TABLE {self._copy} AS SELECT * FROM {self.schema_name}.outbox")
        flush(self.redis_server)
        self.log("  outbox read-only ...")
        into.append(
            outbox_read(
                self.pg,
                self.schema_name,
                None,
                None,
                "outbox SELECT + JSON parse only",
                "parse",
                self.timeout,
            )
        )
        flush(self.redis_server)
        self.log("  naive ...")
        client = self.redis_server.client()
        try:
            into.append(
                outbox_read(
                    self.pg,
                    self.schema_name,
                    client,
                    naive_rows,
                    "naive DEL per row (outbox SELECT)",
                    "naive",
                    self.timeout,
                )
            )
        finally:
            client.close()
        self._workers(expected_rows, into)
