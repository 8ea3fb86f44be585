"""How big each part of a benchmark run is: the full run (issue 5's numbers) and ``--quick``.

One frozen record per mode, so the sections never hard-code a size and the unit tests can check
that quick stays smaller than full in every dimension. The full sizes are the issue's: a
100k-row table, 200k small-transaction row changes, 100k-row bulk statements, 1,000 tx/s for
30 s of lag, a 1M-row backlog for memory, and 15 s of pgbench per variant (three rounds of 5 s,
after an unmeasured 5 s warm-up).
Quick mode shrinks all of them so the whole run fits in two minutes on two cores; its numbers
are for smoke-testing the benchmark, not for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sizes:
    """Every size knob of one run."""

    mode: str
    table_rows: int
    """Rows in the items table before any workload (also the rows each bulk statement touches)."""
    small_changes: int
    """Row changes of the small-transaction workload (4 per transaction)."""
    lag_rate: int
    """Offered load of the lag test, transactions per second."""
    lag_seconds: float
    """How long the lag writer offers that load."""
    backlog_changes: int
    """Row changes in the memory test's backlog."""
    pgbench_seconds: int
    """Duration of each pgbench run."""
    pgbench_rounds: int
    """How many times every pgbench variant runs (they alternate; tps is the mean)."""
    naive_rows: int
    """Rows the naive DEL-per-row contenders handle before they stop (their rate is steady)."""
    pgbench_clients: int = 4
    worker_timeout_s: float = 600.0
    """Hard limit on one ``cache-worker run --until-idle`` (it normally takes seconds)."""

    @property
    def bulk_changes(self) -> int:
        """The bulk workload: one UPDATE and one INSERT ... SELECT of every seed row."""
        return 2 * self.table_rows

    @property
    def lag_transactions(self) -> int:
        return int(self.lag_rate * self.lag_seconds)


FULL = Sizes(
    mode="full",
    table_rows=100_000,
    small_changes=200_000,
    lag_rate=1000,
    lag_seconds=30.0,
    backlog_changes=1_000_000,
    pgbench_seconds=5,
    pgbench_rounds=3,
    naive_rows=30_000,
)

QUICK = Sizes(
    mode="quick",
    table_rows=4_000,
    small_changes=6_000,
    lag_rate=1000,
    lag_seconds=2.0,
    backlog_changes=20_000,
    pgbench_seconds=2,
    pgbench_rounds=1,
    naive_rows=3_000,
    worker_timeout_s=120.0,
)
