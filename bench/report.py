"""What a benchmark run measured, and its Markdown and JSON forms.

The records (one throughput ``Result`` per contender grouped in a ``Section`` per source and
workload, ``LagResult``, ``MemoryResult``, ``PgbenchResult``, ``Target``) are filled by the
server-side modules and formatted here. Kept free of servers and timing so the unit tests can
check the formatting; in a section the ratio column is each contender's rows/s divided by the
first result's (the parse-only baseline), which says how much of the raw log-reading speed a
contender keeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Result:
    """One contender's run over one workload.

    ``seconds`` is the interval rows/s is computed over: the reading loop for the stock readers,
    first to last Redis write (the worker's ``source_streaming`` to ``stopped`` events) for
    cache-worker, whose whole process time is ``wall_seconds``. ``kind`` (parse, naive, evict,
    refresh) lets the targets find a contender whatever its label. ``redis_cpu_us_per_row`` is
    the Redis server's CPU over the worker's whole run divided by its rows (see
    ``bench.redis_cpu``).
    """

    contender: str
    rows: int
    seconds: float
    notes: str = ""
    kind: str = ""
    wall_seconds: float | None = None
    peak_rss_mb: float | None = None
    redis_cpu_us_per_row: float | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Section:
    """The contenders of one workload on one source, run on the same log range."""

    source: str
    workload: str
    title: str
    results: list[Result] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LagResult:
    """Commit -> key visible in Redis at a fixed offered load, for one source."""

    source: str
    offered_tx_per_s: int
    achieved_tx_per_s: float
    transactions: int
    seen: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    notes: str = ""


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """Peak RSS of one worker process draining a backlog."""

    source: str
    backlog_rows: int
    rows: int
    seconds: float
    peak_rss_mb: float | None
    notes: str = ""


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    """pgbench's tps for single-row UPDATEs under one trigger variant (``kind``: none, ours,
    naive)."""

    variant: str
    kind: str
    tps: float
    transactions: int
    notes: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    """One goal of issue 5 and whether this run met it (None: not measured, or not enough)."""

    name: str
    goal: str
    measured: str
    met: bool | None


@dataclass(frozen=True, slots=True)
class MachineLoad:
    """How busy the CPUs were during one part, and how much time the hypervisor stole."""

    part: str
    seconds: float
    busy_pct: float | None
    steal_pct: float | None


@dataclass
class Report:
    """Everything one run measured; sections append as they finish."""

    sections: list[Section] = field(default_factory=list)
    lag: list[LagResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)
    pgbench: list[PgbenchResult] = field(default_factory=list)
    notify_drain: Result | None = None
    targets: list[Target] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    machine: list[MachineLoad] = field(default_factory=list)


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "" if value is None else format(value, fmt)


def section_table(section: Section) -> str:
    """A Markdown table of one section; the ratio is relative to its first result."""
    baseline = section.results[0].rows_per_s if section.results else 0.0
    lines = [
        f"### {section.title}",
        "",
        "| contender | rows | seconds | rows/s | ratio to first | peak RSS MB | "
        "Redis CPU µs/row | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in section.results:
        ratio = result.rows_per_s / baseline if baseline > 0 else 0.0
        lines.append(
            f"| {result.contender} | {result.rows} | {result.seconds:.2f} | "
            f"{result.rows_per_s:,.0f} | {ratio:.2f} | {_num(result.peak_rss_mb)} | "
            f"{_num(result.redis_cpu_us_per_row, '.1f')} | {result.notes} |"
        )
    return "\n".join(lines)


def _redis_cpu_note(result: Result) -> str:
    cpu = result.redis_cpu_us_per_row
    return "" if cpu is None else f"; Redis CPU {cpu:.1f} µs/row"


def lag_table(results: list[LagResult]) -> str:
    lines = [
        "### Lag: commit -> key visible in Redis",
        "",
        "| source | offered tx/s | achieved tx/s | transactions | seen | p50 ms | p99 ms | "
        "max ms | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.source} | {r.offered_tx_per_s:,} | {r.achieved_tx_per_s:,.0f} | "
            f"{r.transactions} | {r.seen} | {_num(r.p50_ms, '.1f')} | {_num(r.p99_ms, '.1f')} | "
            f"{_num(r.max_ms, '.1f')} | {r.notes} |"
        )
    return "\n".join(lines)


def memory_table(results: list[MemoryResult]) -> str:
    lines = [
        "### Memory: peak RSS of the worker draining a backlog",
        "",
        "| source | backlog rows | rows | seconds | rows/s | peak RSS MB | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rate = r.rows / r.seconds if r.seconds > 0 else 0.0
        lines.append(
            f"| {r.source} | {r.backlog_rows:,} | {r.rows} | {r.seconds:.2f} | {rate:,.0f} | "
            f"{_num(r.peak_rss_mb)} | {r.notes} |"
        )
    return "\n".join(lines)


def pgbench_table(results: list[PgbenchResult], drain: Result | None) -> str:
    """tps per trigger variant with its cost relative to the no-trigger run."""
    base = next((r.tps for r in results if r.kind == "none"), 0.0)
    lines = [
        "### Postgres write cost: pgbench single-row UPDATE",
        "",
        "| variant | tps | transactions | cost vs no trigger | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        cost = f"{(1 - r.tps / base) * 100:.0f}%" if base > 0 and r.kind != "none" else ""
        lines.append(f"| {r.variant} | {r.tps:,.0f} | {r.transactions} | {cost} | {r.notes} |")
    if drain is not None:
        lines += [
            "",
            f"cache-worker (postgres-notify, json refresh) drained the outbox the runs with "
            f"our triggers left, {drain.rows} rows, at {drain.rows_per_s:,.0f} rows/s "
            f"({drain.notes}{_redis_cpu_note(drain)}).",
        ]
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    lines = [
        "### Targets (issue 5)",
        "",
        "| target | goal | measured | met? |",
        "|---|---|---|---|",
    ]
    for t in targets:
        if t.met is None:
            met = "not judged" if t.measured else "not measured"
        else:
            met = "yes" if t.met else "**no**"
        lines.append(f"| {t.name} | {t.goal} | {t.measured} | {met} |")
    return "\n".join(lines)


# Above this share of stolen CPU time a part's absolute numbers are not comparable between runs.
STEAL_WARNING_PCT = 5.0


def machine_table(loads: list[MachineLoad]) -> str:
    """Per part: its duration, CPU busy share and the share stolen by the hypervisor."""
    lines = [
        "### Machine during the run",
        "",
        "CPU time of all cores while each part ran. Time stolen by the hypervisor (another "
        "guest on the host) slows every contender of the part alike: compare ratios within a "
        f"part; absolute rows/s of a part with more than {STEAL_WARNING_PCT:.0f}% stolen are "
        "from a slower machine.",
        "",
        "| part | seconds | CPU busy % | stolen % |",
        "|---|---:|---:|---:|",
    ]
    for load in loads:
        steal = _num(load.steal_pct, ".1f")
        if load.steal_pct is not None and load.steal_pct > STEAL_WARNING_PCT:
            steal = f"**{steal}**"
        lines.append(
            f"| {load.part} | {load.seconds:.0f} | {_num(load.busy_pct, '.1f')} | {steal} |"
        )
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """The whole report: every section that has results, then the targets and any errors."""
    parts = [section_table(s) for s in report.sections if s.results]
    if report.lag:
        parts.append(lag_table(report.lag))
    if report.memory:
        parts.append(memory_table(report.memory))
    if report.pgbench:
        parts.append(pgbench_table(report.pgbench, report.notify_drain))
    if report.targets:
        parts.append(targets_table(report.targets))
    if report.machine:
        parts.append(machine_table(report.machine))
    if report.errors:
        parts.append("### Errors\n\n" + "\n".join(f"- {e}" for e in report.errors))
    return "\n\n".join(parts)


def _result_dict(result: Result) -> dict[str, Any]:
    return {**asdict(result), "rows_per_s": round(result.rows_per_s, 1)}


def to_document(report: Report, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` and every measurement (with rows/s) as one JSON-able document."""
    return {
        **meta,
        "sections": [
            {
                "source": s.source,
                "workload": s.workload,
                "title": s.title,
                "results": [_result_dict(r) for r in s.results],
            }
            for s in report.sections
        ],
        "lag": [asdict(r) for r in report.lag],
        "memory": [asdict(r) for r in report.memory],
        "pgbench": [asdict(r) for r in report.pgbench],
        "notify_drain": _result_dict(report.notify_drain) if report.notify_drain else None,
        "targets": [asdict(t) for t in report.targets],
        "errors": list(report.errors),
        "machine_load": [asdict(m) for m in report.machine],
        "markdown": markdown(report),
    }


def write_json(path: Path, report: Report, meta: dict[str, Any]) -> None:
    """Write the report as one JSON document (directories created as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_document(report, meta), indent=2, default=str) + "\n")
