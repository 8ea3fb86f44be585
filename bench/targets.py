"""Issue 5's performance targets, judged against one run's ``Report``.

Pure: it only reads the report, so the unit tests can feed it made-up numbers. A target whose
measurement is missing (a section failed or was not run) is ``met=None`` rather than a failure,
and no target ever fails the run: the table says what was met, the lead decides what to do.
Where a target names "cache-worker" both worker contenders (evict and json refresh) must meet
it, so the slower one decides.
"""

from __future__ import annotations

from bench.report import Report, Result, Section, Target

PARSE_RATIO_GOAL = 5.0
BULK_GOAL_ROWS_S = 100_000.0
LOGICAL_GOAL_ROWS_S = 100_000.0
TRIGGER_COST_GOAL = 0.30
LAG_P99_GOAL_MS = 50.0
RSS_GOAL_MB = 200.0
RSS_BACKLOG_ROWS = 1_000_000
WORKER_KINDS = ("evict", "refresh")


def _section(report: Report, source: str, workload: str) -> Section | None:
    return next((s for s in report.sections if s.source == source and s.workload == workload), None)


def _workers(section: Section | None) -> list[Result]:
    if section is None:
        return []
    return [r for r in section.results if r.kind in WORKER_KINDS]


def _rates(results: list[Result]) -> str:
    return ", ".join(f"{r.kind} {r.rows_per_s:,.0f} rows/s" for r in results)


def _parse_ratio(report: Report) -> Target:
    name = "MariaDB small tx: cache-worker vs stock parse-only"
    goal = f">= {PARSE_RATIO_GOAL:.0f}x parse-only rows/s"
    section = _section(report, "mariadb", "small")
    workers = _workers(section)
    parse = next((r for r in section.results if r.kind == "parse"), None) if section else None
    if not workers or parse is None or parse.rows_per_s <= 0:
        return Target(name, goal, "", None)
    ratios = [(r.kind, r.rows_per_s / parse.rows_per_s) for r in workers]
    measured = ", ".join(f"{kind} {ratio:.2f}x" for kind, ratio in ratios)
    return Target(name, goal, measured, min(x for _, x in ratios) >= PARSE_RATIO_GOAL)


def _rate_goal(report: Report, source: str, workload: str, name: str, goal: float) -> Target:
    workers = _workers(_section(report, source, workload))
    text = f">= {goal:,.0f} rows/s end to end"
    if not workers:
        return Target(name, text, "", None)
    return Target(name, text, _rates(workers), min(r.rows_per_s for r in workers) >= goal)


def _notify_keeps_up(report: Report) -> Target:
    name = "postgres-notify keeps up with pgbench (our triggers)"
    goal = "drain rows/s >= pgbench tps with the triggers"
    ours = next((r for r in report.pgbench if r.kind == "ours"), None)
    drain = report.notify_drain
    if ours is None or drain is None:
        return Target(name, goal, "", None)
    measured = f"drain {drain.rows_per_s:,.0f} rows/s vs {ours.tps:,.0f} tps"
    return Target(name, goal, measured, drain.rows_per_s >= ours.tps)


def _trigger_cost(report: Report) -> Target:
    name = "Postgres write cost of the notify triggers"
    goal = f"<= {TRIGGER_COST_GOAL:.0%} of write tps (naive per-row pg_notify: about 50%)"
    by_kind = {r.kind: r for r in report.pgbench}
    base, ours = by_kind.get("none"), by_kind.get("ours")
    if base is None or ours is None or base.tps <= 0:
        return Target(name, goal, "", None)
    cost = 1 - ours.tps / base.tps
    measured = f"ours {cost:.0%}"
    for kind, label in (("naive", "naive"), ("naive-listen", "naive with a listener")):
        naive = by_kind.get(kind)
        if naive is not None:
            measured += f", {label} {1 - naive.tps / base.tps:.0%}"
    return Target(name, goal, measured, cost <= TRIGGER_COST_GOAL)


def _lag(report: Report, source: str) -> Target:
    name = f"lag p99 on {source}"
    goal = f"<= {LAG_P99_GOAL_MS:.0f} ms at 1,000 tx/s"
    result = next((r for r in report.lag if r.source == source), None)
    if result is None or result.p99_ms is None:
        return Target(name, goal, "", None)
    measured = f"p99 {result.p99_ms:.1f} ms at {result.achieved_tx_per_s:,.0f} tx/s"
    complete = result.seen == result.transactions
    if not complete:
        measured += f" ({result.transactions - result.seen} never seen)"
    return Target(name, goal, measured, complete and result.p99_ms <= LAG_P99_GOAL_MS)


def _memory(report: Report) -> Target:
    name = "peak RSS draining the backlog"
    goal = f"<= {RSS_GOAL_MB:.0f} MB under a 1M-row backlog"
    result = report.memory[0] if report.memory else None
    if result is None or result.peak_rss_mb is None:
        return Target(name, goal, "", None)
    measured = f"{result.peak_rss_mb:,.0f} MB ({result.backlog_rows:,}-row backlog)"
    if result.backlog_rows < RSS_BACKLOG_ROWS:
        # A smaller backlog (the quick run) says nothing about the 1M-row one: memory grows
        # with what the worker reads ahead.
        return Target(name, goal, measured + ", too small to judge", None)
    return Target(name, goal, measured, result.peak_rss_mb <= RSS_GOAL_MB)


def evaluate(report: Report) -> list[Target]:
    """Every target of issue 5, in the issue's order."""
    return [
        _parse_ratio(report),
        _rate_goal(report, "mariadb", "bulk", "MariaDB bulk statements", BULK_GOAL_ROWS_S),
        _rate_goal(
            report, "postgres-logical", "small", "postgres-logical small tx", LOGICAL_GOAL_ROWS_S
        ),
        _rate_goal(
            report, "postgres-logical", "bulk", "postgres-logical bulk", LOGICAL_GOAL_ROWS_S
        ),
        _notify_keeps_up(report),
        _trigger_cost(report),
        *(_lag(report, source) for source in ("mariadb", "postgres-logical", "postgres-notify")),
        _memory(report),
    ]
