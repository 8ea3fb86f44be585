"""The postgres-notify contenders: reading the outbox, and the worker consuming its own.

Each worker (evict and json refresh rule) has its own outbox schema and channel, filled by its
own triggers (``cache-worker setup`` once for all workloads). The baselines read the evict
worker's outbox in id order without consuming it, before that worker runs: parsing its JSON
images only (the ceiling of reading that table), and with one unpipelined Redis DEL per row.
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
    """postgres-notify: one outbox schema (and channel) per worker, filled by its triggers."""

    prefix = "notify"

    def source(self, kind: str) -> dict[str, Any]:
        schema_name = f"cw_{kind}"
        return {
            "kind": "postgres-notify",
            "dsn": self.pg.dsn(),
            "schema_name": schema_name,
            "channel": schema_name,
        }

    def run(
        self,
        write: Callable[[Connection], None],
        expected_rows: int,
        naive_rows: int,
        into: list[Result],
    ) -> None:
        """The workload, the two outbox readers on the first outbox, then the workers."""
        outbox = str(self.source(self.configs[0][1])["schema_name"])
        self.log("  writing ...")
        write_workload(self.pg, write)
        flush(self.redis_server)
        self.log("  outbox read-only ...")
        into.append(
            outbox_read(
                self.pg,
                outbox,
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
                    outbox,
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
