"""Unit tests of the benchmark's pure parts: workloads, sizes, statistics, reports and targets.

No servers and no timing asserts: the workloads must be the same for a seed (so every run
replays the same log) and keep their shape, the worker's rate must come from the right log
events, percentiles must be observed values, pgbench's report must parse, the tables must show
what was measured and the targets must judge made-up numbers as the issue states them.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from bench import redis_cpu, targets
from bench.lag import achieved_rate, write_paced
from bench.pgbench import parse_pgbench
from bench.report import (
    LagResult,
    MemoryResult,
    PgbenchResult,
    Report,
    Result,
    Section,
    markdown,
    section_table,
    write_json,
)
from bench.rules import WORKER_CONTENDERS, item_key, lag_rule
from bench.sizes import FULL, QUICK
from bench.stats import percentile, summarize_lag
from bench.worker_run import streaming_window, write_config
from bench.workload import (
    BULK_ID_OFFSET,
    backlog_statements,
    bulk_statements,
    generate_transactions,
    initial_rows,
    render_batch,
    table_ddl,
    transaction_statements,
)
from worker.events import Position
from worker.settings import load_settings

# -- workloads ---------------------------------------------------------------------------------


def test_workload_is_deterministic_for_a_seed() -> None:
    first = list(generate_transactions(100, 400, seed=7))
    assert first == list(generate_transactions(100, 400, seed=7))
    assert first != list(generate_transactions(100, 400, seed=8))
    assert list(initial_rows(10, 7)) == list(initial_rows(10, 7))


def test_every_transaction_is_two_updates_one_delete_one_reinsert() -> None:
    txs = list(generate_transactions(50, 1000, seed=1))
    assert len(txs) == 250
    for tx in txs:
        ids = {tx.updates[0].id, tx.updates[1].id, tx.delete_id}
        assert len(ids) == 3 and all(1 <= i <= 50 for i in ids)
        assert tx.insert.id == tx.delete_id  # the table keeps its size
        kinds = [s.split()[0] for s in transaction_statements(tx)]
        assert kinds == ["UPDATE", "UPDATE", "DELETE", "INSERT"]


def test_batch_wraps_each_transaction_in_its_own_commit() -> None:
    txs = list(islice(generate_transactions(10, 100, seed=3), 3))
    statements = render_batch(txs).split(";")
    assert statements.count("BEGIN") == 3 and statements.count("COMMIT") == 3
    assert len(statements) == 3 * 6


def test_statements_name_the_table_they_are_given() -> None:
    tx = next(generate_transactions(10, 4, seed=3))
    assert all(
        " bench_logical.items " in s for s in transaction_statements(tx, "bench_logical.items")
    )
    assert "bench.items" not in render_batch([tx], "bench_notify.items")


def test_workload_needs_three_ids() -> None:
    with pytest.raises(ValueError):
        list(generate_transactions(2, 4, seed=0))


def test_ddl_differs_only_in_the_timestamp_type() -> None:
    mysql, postgres = table_ddl("s.items", "mysql"), table_ddl("s.items", "postgres")
    assert mysql.startswith("CREATE TABLE s.items (id INT PRIMARY KEY")
    assert "DATETIME(6)" in mysql and "TIMESTAMP(6)" in postgres
    assert mysql.replace("DATETIME(6)", "TIMESTAMP(6)") == postgres


def test_bulk_is_one_update_and_one_insert_select_of_the_seed_rows() -> None:
    update, insert = bulk_statements(1000, "bench.items")
    assert update.startswith("UPDATE bench.items SET qty = qty + 1") and "id <= 1000" in update
    assert insert.startswith("INSERT INTO bench.items") and "SELECT" in insert
    assert f"id + {BULK_ID_OFFSET}" in insert and insert.endswith("WHERE id <= 1000")


def test_backlog_repeats_the_full_table_update() -> None:
    statements = backlog_statements(100_000, 1_000_000)
    assert len(statements) == 10 and len(set(statements)) == 1
    assert "id <= 100000" in statements[0]
    with pytest.raises(ValueError):
        backlog_statements(1000, 10)


def test_quick_is_smaller_than_full_in_every_size() -> None:
    sizes = [f.name for f in dataclasses.fields(FULL) if f.name not in ("mode", "lag_rate")]
    for name in sizes:
        assert getattr(QUICK, name) <= getattr(FULL, name), name
    assert FULL.table_rows == 100_000 and FULL.small_changes == 200_000
    assert FULL.backlog_changes == 1_000_000 and FULL.lag_transactions == 30_000
    assert FULL.bulk_changes == 200_000


# -- statistics ----------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_lag_summary_counts_only_seen_keys_and_never_negative() -> None:
    commits = {1: 10.0, 2: 10.5, 3: 11.0}
    seen = {1: 10.002, 2: 10.49, 9: 1.0}  # 2 was visible before its commit returned
    summary = summarize_lag(commits, seen)
    assert summary is not None
    assert summary.count == 2
    assert summary.max_ms == pytest.approx(2.0)
    assert summary.p50_ms == 0.0
    assert summarize_lag(commits, {}) is None


def test_paced_writer_inserts_every_id_in_order() -> None:
    inserted: list[int] = []
    commits = write_paced(inserted.append, 20, rate=1_000_000.0, deadline=float("inf"))
    assert inserted == list(range(1, 21))
    assert sorted(commits) == inserted
    assert achieved_rate({1: 0.0, 2: 0.5, 3: 1.0}) == 2.0
    assert achieved_rate({1: 0.0}) == 0.0


def test_paced_writer_stops_at_its_deadline() -> None:
    inserted: list[int] = []
    write_paced(inserted.append, 1000, rate=1_000_000.0, deadline=0.0)
    assert inserted == [1]


# -- the worker's log --------------------------------------------------------------------------


def _event(name: str, at: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, "timestamp": f"2026-01-01T00:00:{at}+00:00", **fields}


def _window(events: list[dict[str, Any]]) -> tuple[int, float] | None:
    window = streaming_window(events)
    return None if window is None else (window[0], round(window[1], 3))


def test_streaming_window_runs_from_the_source_connecting_to_burst_complete() -> None:
    events = [
        _event("streaming", "00.000"),
        _event("source_streaming", "01.000"),
        _event("progress", "02.000", rows=100),
        _event("burst_complete", "03.500"),
        _event("stopped", "04.000", rows=400),
    ]
    assert _window(events) == (400, 2.5)
    # Without burst_complete the final stopped event ends it.
    assert _window([e for e in events if e["event"] != "burst_complete"]) == (400, 3.0)


def test_streaming_window_of_the_notify_source_starts_at_outbox_consumer() -> None:
    events = [_event("outbox_consumer", "01.000"), _event("stopped", "02.000", rows=10)]
    assert _window(events) == (10, 1.0)


def test_streaming_window_needs_both_ends() -> None:
    assert streaming_window([_event("stopped", "02.000", rows=10)]) is None
    assert streaming_window([_event("source_streaming", "01.000")]) is None


def test_worker_config_is_a_valid_config_with_the_preset_checkpoint(tmp_path: Path) -> None:
    rules = [rule("bench.items") for _label, _kind, rule in WORKER_CONTENDERS]
    rules.append(lag_rule("bench.lag"))
    path = write_config(
        tmp_path,
        "bench_x",
        {"kind": "postgres-logical", "dsn": "postgresql://u:p@127.0.0.1:5432/db", "max_changes": 9},
        "redis://127.0.0.1:6379/0",
        rules,
        checkpoint=Position(42, {"lsn": "0/2A"}),
    )
    settings = load_settings(path)
    assert settings.source.kind == "postgres-logical" and settings.source.max_changes == 9
    assert [r.name for r in settings.rules] == ["items-evict", "items-json", "lag-json"]
    checkpoint = json.loads(Path(tomllib.loads(path.read_text())["checkpoint"]["path"]).read_text())
    assert checkpoint["version"] == 42
    assert item_key(7) == "item:7"


# -- pgbench -----------------------------------------------------------------------------------

PGBENCH_OUTPUT = """\
pgbench (15.8 (Debian 15.8-0+deb12u1))
transaction type: /tmp/x/pgbench-update.sql
scaling factor: 1
query mode: prepared
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 26176
number of failed transactions: 0 (0.000%)
latency average = 0.458 ms
initial connection time = 5.874 ms
tps = 8731.120997 (without initial connection time)
"""


def test_pgbench_report_parses() -> None:
    out = parse_pgbench(PGBENCH_OUTPUT)
    assert out.tps == pytest.approx(8731.120997) and out.transactions == 26176
    with pytest.raises(ValueError):
        parse_pgbench("pgbench: error: connection refused")


# -- report and targets ------------------------------------------------------------------------


def _section(source: str, workload: str, parse: float, evict: float, refresh: float) -> Section:
    return Section(
        source,
        workload,
        f"{source} {workload}",
        [
            Result("parse", int(parse), 1.0, kind="parse"),
            Result("naive", 10, 1.0, "sampled", kind="naive"),
            Result("evict", int(evict), 1.0, kind="evict", peak_rss_mb=70.4),
            Result("refresh", int(refresh), 1.0, kind="refresh"),
        ],
    )


def test_section_table_has_rates_ratio_to_first_and_rss() -> None:
    section = Section(
        "mariadb",
        "small",
        "MariaDB small",
        [
            Result("parse-only", 1000, 2.0),
            Result("worker", 1000, 1.0, "note", peak_rss_mb=66.6, redis_cpu_us_per_row=17.94),
        ],
    )
    table = section_table(section).splitlines()
    assert table[0] == "### MariaDB small"
    assert table[2] == (
        "| contender | rows | seconds | rows/s | ratio to first | peak RSS MB | "
        "Redis CPU µs/row | notes |"
    )
    assert table[3].count("|") == table[2].count("|")
    assert table[4] == "| parse-only | 1000 | 2.00 | 500 | 1.00 |  |  |  |"
    assert table[5] == "| worker | 1000 | 1.00 | 1,000 | 2.00 | 67 | 17.9 | note |"


def test_redis_cpu_seconds_and_per_row() -> None:
    info = {"used_cpu_sys": 1.25, "used_cpu_user": 24.75, "used_cpu_user_children": 9.0}
    assert redis_cpu.parse_cpu_seconds(info) == 26.0
    assert redis_cpu.cpu_seconds(None) is None  # no server given: no reading
    assert redis_cpu.parse_cpu_seconds({"used_cpu_sys": 1.0}) is None
    assert redis_cpu.parse_cpu_seconds({"used_cpu_sys": "x", "used_cpu_user": 1}) is None
    assert redis_cpu.per_row_us(10.0, 13.6, 200_000) == pytest.approx(18.0)
    # Unknown readings, no rows, or a restarted server (CPU went down) say nothing.
    assert redis_cpu.per_row_us(None, 13.6, 200_000) is None
    assert redis_cpu.per_row_us(10.0, None, 200_000) is None
    assert redis_cpu.per_row_us(10.0, 13.6, 0) is None
    assert redis_cpu.per_row_us(10.0, 9.0, 100) is None


def _report() -> Report:
    return Report(
        sections=[
            _section("mariadb", "small", 1000, 6000, 4000),
            _section("mariadb", "bulk", 1000, 150_000, 120_000),
            _section("postgres-logical", "small", 1000, 200_000, 90_000),
        ],
        lag=[
            LagResult("mariadb", 1000, 990.0, 100, 100, 3.0, 20.0, 30.0),
            LagResult("postgres-logical", 1000, 990.0, 100, 99, 3.0, 20.0, 30.0),
            LagResult("postgres-notify", 1000, 990.0, 100, 100, 3.0, 60.0, 70.0),
        ],
        memory=[MemoryResult("mariadb", 1_000_000, 1_000_000, 10.0, 150.0)],
        pgbench=[
            PgbenchResult("no trigger", "none", 1000.0, 3000),
            PgbenchResult("ours", "ours", 800.0, 2400),
            PgbenchResult("naive", "naive", 500.0, 1500),
            PgbenchResult("naive, listening", "naive-listen", 400.0, 1200),
        ],
        notify_drain=Result(
            "drain", 2400, 2.0, "wall 3s", kind="refresh", redis_cpu_us_per_row=9.96
        ),
    )


def test_targets_judge_the_numbers_as_the_issue_states_them() -> None:
    by_name = {t.name: t for t in targets.evaluate(_report())}
    parse = by_name["MariaDB small tx: cache-worker vs stock parse-only"]
    assert parse.met is False and parse.measured == "evict 6.00x, refresh 4.00x"
    assert by_name["MariaDB bulk statements"].met is True
    assert by_name["postgres-logical small tx"].met is False  # refresh is below 100k
    assert by_name["postgres-logical bulk"].met is None  # not measured
    keeps_up = by_name["postgres-notify keeps up with pgbench (our triggers)"]
    assert keeps_up.met is True and "1,200 rows/s vs 800 tps" in keeps_up.measured
    cost = by_name["Postgres write cost of the notify triggers"]
    assert cost.met is True
    assert cost.measured == "ours 20%, naive 50%, naive with a listener 60%"
    assert by_name["lag p99 on mariadb"].met is True
    assert by_name["lag p99 on postgres-logical"].met is False  # one key never seen
    assert by_name["lag p99 on postgres-notify"].met is False
    assert by_name["peak RSS draining the backlog"].met is True


def test_targets_without_measurements_are_not_measured() -> None:
    assert all(t.met is None for t in targets.evaluate(Report()))


def test_memory_target_needs_the_full_backlog() -> None:
    report = Report(memory=[MemoryResult("mariadb", 20_000, 20_000, 1.0, 70.0)])
    memory = next(t for t in targets.evaluate(report) if t.name.startswith("peak RSS"))
    assert memory.met is None and memory.measured.startswith("70 MB (20,000-row backlog")


def test_markdown_and_json_carry_every_part(tmp_path: Path) -> None:
    report = _report()
    report.targets = targets.evaluate(report)
    report.errors.append("postgres-notify: lag: RuntimeError: boom")
    text = markdown(report)
    for heading in ("### mariadb small", "### Lag", "### Memory", "### Postgres write cost"):
        assert heading in text
    assert "| ours | 800 | 2400 | 20% |" in text
    assert "2400 rows, at 1,200 rows/s (wall 3s; Redis CPU 10.0 µs/row)." in text
    assert "| lag p99 on postgres-notify | <= 50 ms at 1,000 tx/s |" in text
    assert "**no**" in text and "not measured" in text and "- postgres-notify: lag" in text

    path = tmp_path / "out" / "r.json"
    write_json(path, report, {"mode": "quick"})
    document = json.loads(path.read_text())
    assert document["mode"] == "quick"
    assert document["sections"][0]["results"][2]["rows_per_s"] == 6000.0
    assert document["lag"][2]["p99_ms"] == 60.0
    assert document["notify_drain"]["rows_per_s"] == 1200.0
    assert document["markdown"] == text


def test_proc_stat_totals_count_guest_time_once_and_steal_apart() -> None:
    from bench.cpu import CpuTimes, parse_proc_stat

    text = "cpu  100 5 50 800 20 3 2 40 7 0\ncpu0 50 2 25 400 10 1 1 20 3 0\nintr 12345\n"
    assert parse_proc_stat(text) == CpuTimes(busy=160, idle=820, steal=40)
    assert parse_proc_stat("cpu  1 2 3 4\n") == CpuTimes(busy=6, idle=4, steal=0)
    assert parse_proc_stat("intr 1\n") is None


def test_cpu_shares_between_readings() -> None:
    from bench.cpu import CpuTimes, shares

    before = CpuTimes(busy=100, idle=100, steal=0)
    after = CpuTimes(busy=160, idle=120, steal=20)
    assert shares(before, after) == (60.0, 20.0)
    assert shares(after, after) is None


def test_machine_table_marks_parts_with_much_stolen_time() -> None:
    from bench.report import MachineLoad, Report, markdown

    report = Report(
        machine=[
            MachineLoad("mariadb: bulk statements", 12.4, 71.0, 1.2),
            MachineLoad("postgres-notify: small transactions", 30.0, 55.5, 38.0),
            MachineLoad("pgbench", 60.0, None, None),
        ]
    )
    text = markdown(report)
    assert "| mariadb: bulk statements | 12 | 71.0 | 1.2 |" in text
    assert "| postgres-notify: small transactions | 30 | 55.5 | **38.0** |" in text
    assert "| pgbench | 60 |  |  |" in text
