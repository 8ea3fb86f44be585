"""One benchmark run's shared state: sizes, seed, chosen parts, scratch directory, the report.

``step`` is how every part runs: a failure is logged and recorded in the report (the exit code
becomes 1) and the run goes on with the next part, so one broken source still leaves the
others' numbers. ``section`` adds a throughput table to the report before its contenders run,
so the ones that finished survive a later failure.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import cpu
from bench.report import MachineLoad, Report, Result, Section
from bench.sizes import Sizes
from bench.workload import CHANGES_PER_TRANSACTION

PARTS = ("mariadb", "memory", "logical", "notify", "lag", "pgbench")


class Run:
    """One benchmark run: its sizes, report, scratch directory and progress log."""

    def __init__(self, sizes: Sizes, seed: int, parts: set[str], work: Path) -> None:
        self.sizes = sizes
        self.seed = seed
        self.parts = parts
        self.work = work
        self.report = Report()
        self.began = time.perf_counter()

    def log(self, message: str) -> None:
        """A progress line on stderr (stdout carries only the report)."""
        print(f"[{time.perf_counter() - self.began:6.1f}s] {message}", file=sys.stderr, flush=True)

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one part; a failure is reported and the run goes on with the next part."""
        self.log(name)
        began, cpu_before = time.perf_counter(), cpu.read()
        try:
            fn()
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            detail = " / ".join(lines[:1] + lines[-3:]) if len(lines) > 1 else "".join(lines)
            self.report.errors.append(f"{name}: {type(exc).__name__}: {detail}")
            self.log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        finally:
            cpu_after = cpu.read()
            load = cpu.shares(cpu_before, cpu_after) if cpu_before and cpu_after else None
            busy, steal = load if load is not None else (None, None)
            seconds = time.perf_counter() - began
            self.report.machine.append(MachineLoad(name, seconds, busy, steal))
            if steal is not None:
                self.log(f"  CPU busy {busy:.0f}%, stolen by the hypervisor {steal:.1f}%")

    def section(self, source: str, workload: str, title: str) -> list[Result]:
        """A new section in the report; its results list fills as contenders finish."""
        section = Section(source, workload, title)
        self.report.sections.append(section)
        return section.results

    def small_title(self, source: str) -> str:
        s = self.sizes
        return (
            f"{source}: small transactions ({s.small_changes:,} row changes in "
            f"{s.small_changes // CHANGES_PER_TRANSACTION:,} transactions of 2 UPDATE + DELETE "
            f"+ INSERT, {s.table_rows:,}-row table)"
        )

    def bulk_title(self, source: str) -> str:
        rows = self.sizes.table_rows
        return (
            f"{source}: bulk statements ({self.sizes.bulk_changes:,} row changes: one "
            f"{rows:,}-row UPDATE, one {rows:,}-row INSERT ... SELECT)"
        )
