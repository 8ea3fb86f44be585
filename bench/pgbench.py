"""The Postgres write-cost test: pgbench single-row UPDATE tps under several trigger variants.

A database of its own is initialised with ``pgbench -i`` (scale 1: 100k accounts); each run is
a custom script of one ``UPDATE pgbench_accounts ... WHERE aid = random`` per transaction, with
a few clients for a few seconds, under each variant: no trigger; the notify source's triggers
exactly as ``cache-worker setup`` installs them today (so it measures whatever the trigger code
currently is); a naive row-level ``pg_notify`` trigger with nobody listening, and with one
session draining the notifications (every commit then also signals the listener). The variants
alternate over a few rounds. After them, the outbox holds every UPDATE of the runs with our
triggers, written at pgbench's fastest rate with them; a postgres-notify worker then drains it,
which says whether the worker keeps up with that rate. ``parse_pgbench`` is the pure part.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.postgres_common import pg_tool, tool_env
from bench.report import PgbenchResult, Report
from bench.worker_run import cli, run_until_idle, write_config
from connectors.postgres_notify import installed_triggers
from tests.services import PostgresServer, RedisServer
from worker.events import TableRef

DATABASE = "bench_pgbench"
TABLE = "public.pgbench_accounts"
ACCOUNTS_PER_SCALE = 100_000
SCRIPT = (
    f"\\set aid random(1, {ACCOUNTS_PER_SCALE})\n"
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
)
NAIVE_CHANNEL = "bench_naive"
NAIVE_TRIGGER = "bench_naive_notify"
NAIVE_SQL = [
    "CREATE OR REPLACE FUNCTION bench_naive_notify() RETURNS trigger LANGUAGE plpgsql AS $$\n"
    "BEGIN\n"
    f"  PERFORM pg_notify('{NAIVE_CHANNEL}', json_build_object(\n"
    "    'table', TG_TABLE_NAME, 'op', TG_OP, 'aid', NEW.aid)::text);\n"
    "  RETURN NULL;\n"
    "END $$",
    f"CREATE TRIGGER {NAIVE_TRIGGER} AFTER UPDATE ON pgbench_accounts "
    "FOR EACH ROW EXECUTE FUNCTION bench_naive_notify()",
]
NAIVE_DROP_SQL = [
    f"DROP TRIGGER IF EXISTS {NAIVE_TRIGGER} ON pgbench_accounts",
    "DROP FUNCTION IF EXISTS bench_naive_notify()",
]
_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding) initial connection", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PgbenchOutput:
    tps: float
    transactions: int


def parse_pgbench(output: str) -> PgbenchOutput:
    """tps (without the initial connection time) and transactions from pgbench's report."""
    tps = _TPS.search(output)
    processed = _PROCESSED.search(output)
    if tps is None or processed is None:
        raise ValueError(f"no tps in pgbench output:\n{output[-1000:]}")
    return PgbenchOutput(float(tps.group(1)), int(processed.group(1)))


def _connection_args(pg: PostgresServer) -> list[str]:
    return ["-h", pg.host, "-p", str(pg.port), "-U", pg.user]


def _pgbench(pg: PostgresServer, args: list[str], timeout: float) -> str:
    done = subprocess.run(
        [pg_tool("pgbench"), *_connection_args(pg), *args, DATABASE],
        env=tool_env(pg),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout + done.stderr


def _sql(pg: PostgresServer, statements: list[str]) -> None:
    with pg.connect(DATABASE) as conn:
        for statement in statements:
            conn.execute(statement)


# (label, kind, note) of each variant, in the order every round runs them.
VARIANTS = (
    ("no trigger", "none", ""),
    (
        "cache-worker notify triggers (`cache-worker setup`)",
        "ours",
        "no worker running: the outbox keeps every UPDATE",
    ),
    ("naive per-row pg_notify trigger", "naive", "nobody listening"),
    (
        "naive per-row pg_notify trigger, one LISTEN session",
        "naive-listen",
        "a LISTEN session drains the notifications",
    ),
)
RULE = {
    "name": "accounts-json",
    "table": TABLE,
    "keys": ["account:{aid}"],
    "action": "refresh",
    "format": "json",
}


def _our_triggers(pg: PostgresServer, schema_name: str) -> list[str]:
    """The capture triggers ``cache-worker setup`` put on pgbench_accounts."""
    with pg.connect(DATABASE) as conn:
        installed = installed_triggers(conn, schema_name)
    table = TableRef.parse(TABLE)
    return [trigger.name for trigger in installed if trigger.table == table]


def _enable_only(pg: PostgresServer, triggers: list[str]) -> None:
    statements = [f"ALTER TABLE {TABLE} DISABLE TRIGGER USER"]
    statements += [f'ALTER TABLE {TABLE} ENABLE TRIGGER "{name}"' for name in triggers]
    _sql(pg, statements)


def run(
    pg: PostgresServer,
    redis_server: RedisServer,
    work: Path,
    seconds: int,
    rounds: int,
    clients: int,
    timeout: float,
    report: Report,
    log: Callable[[str], None],
) -> None:
    """Every variant, ``rounds`` times in turn; the results go into ``report``.

    All triggers are installed once and only the variant's own are enabled for its run, so
    the variants can alternate: a machine whose background load changes during the part then
    moves all of them alike, instead of the one that happened to run at a busy moment.
    """
    with pg.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        conn.execute(f"CREATE DATABASE {DATABASE}")
        # As for the workloads (see postgres_common.configure): the default commit.
        conn.execute(f"ALTER DATABASE {DATABASE} SET synchronous_commit = on")
    log("  pgbench -i ...")
    _pgbench(pg, ["-i", "-q", "-s", "1"], timeout)
    script = work / "pgbench-update.sql"
    script.write_text(SCRIPT)
    jobs = min(clients, 2)
    args = ["-n", "-M", "prepared", "-c", str(clients), "-j", str(jobs), "-T", str(seconds)]
    args += ["-f", str(script)]
    config = write_config(
        work,
        "pgbench_notify",
        {"kind": "postgres-notify", "dsn": pg.dsn(DATABASE)},
        redis_server.url(),
        [RULE],
    )
    cli("setup", configs=[config])
    try:
        _sql(pg, NAIVE_SQL)
        ours = _our_triggers(pg, "cache_worker")
        enabled = {
            "none": [],
            "ours": ours,
            "naive": [NAIVE_TRIGGER],
            "naive-listen": [NAIVE_TRIGGER],
        }
        outputs: dict[str, list[PgbenchOutput]] = {kind: [] for _label, kind, _note in VARIANTS}
        # Unmeasured: the first run after `pgbench -i` was the slowest of the no-trigger runs in
        # every full benchmark so far (26k vs 33-41k tps), which understated every variant's
        # cost. One warm-up run puts the first measured run on the footing of the others.
        _enable_only(pg, [])
        _sql(pg, [f"VACUUM {TABLE}", "CHECKPOINT"])
        log("  pgbench warm-up (not measured) ...")
        _pgbench(pg, args, timeout + seconds)
        for round_no in range(1, rounds + 1):
            for label, kind, _note in VARIANTS:
                _enable_only(pg, enabled[kind])
                # Each run starts from a vacuumed table and a fresh checkpoint, so none pays
                # for the previous run's dead rows or dirty pages.
                _sql(pg, [f"VACUUM {TABLE}", "CHECKPOINT"])
                log(f"  pgbench round {round_no}: {label} ...")
                if kind == "naive-listen":
                    # A naive trigger has a consumer in real life: every commit then also
                    # signals the listening backend, which reads the queue.
                    with _Listener(pg, NAIVE_CHANNEL) as listener:
                        out = parse_pgbench(_pgbench(pg, args, timeout + seconds))
                    log(f"  the listener received {listener.received} notifications")
                else:
                    out = parse_pgbench(_pgbench(pg, args, timeout + seconds))
                outputs[kind].append(out)
        for label, kind, note in VARIANTS:
            report.pgbench.append(_result(label, kind, note, outputs[kind], clients, seconds))
        # The worker refuses to start while its triggers are disabled (``check``).
        _enable_only(pg, ours)
        log("  cache-worker drains the outbox ...")
        redis_client = redis_server.client()
        try:
            redis_client.flushdb()
        finally:
            redis_client.close()
        written = sum(out.transactions for out in outputs["ours"])
        report.notify_drain = run_until_idle(
            "cache-worker json refresh rule",
            "refresh",
            config,
            work / "pgbench_notify.log",
            timeout,
            written,
            redis_server,
        )
    finally:
        try:
            _sql(pg, NAIVE_DROP_SQL)
        finally:
            cli("teardown", configs=[config])


def _result(
    label: str, kind: str, note: str, outputs: list[PgbenchOutput], clients: int, seconds: int
) -> PgbenchResult:
    """The variant's mean tps over its rounds; the per-round tps in the notes."""
    tps = sum(out.tps for out in outputs) / len(outputs)
    notes = f"{clients} clients, {len(outputs)} x {seconds}s"
    if len(outputs) > 1:
        notes += " (tps per round: " + " / ".join(f"{out.tps:,.0f}" for out in outputs) + ")"
    if note:
        notes += f"; {note}"
    return PgbenchResult(label, kind, tps, sum(out.transactions for out in outputs), notes)


class _Listener:
    """A session that LISTENs on ``channel`` and drains notifications in a thread."""

    def __init__(self, pg: PostgresServer, channel: str) -> None:
        self._conn = psycopg.connect(pg.dsn(DATABASE), autocommit=True, connect_timeout=10)
        self._conn.execute(f"LISTEN {channel}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="bench-listener", daemon=True)
        self.received = 0

    def _drain(self) -> None:
        while not self._stop.is_set():
            for _ in self._conn.notifies(timeout=0.2):
                self.received += 1

    def __enter__(self) -> _Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
