"""How busy the machine's CPUs were during a part of the run, and how much time the hypervisor
took from them (steal): read from the kernel's ``/proc/stat`` totals before and after.

On a virtual machine whose host is busy, stolen time slows every contender of a part and
swings absolute numbers by a factor of two or more between runs of the same code; the report
shows it next to the part, so a reader knows which numbers came from a disturbed machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat, in clock ticks."""

    busy: int
    idle: int
    steal: int

    @property
    def total(self) -> int:
        return self.busy + self.idle + self.steal


def parse_proc_stat(text: str) -> CpuTimes | None:
    """The all-CPU totals of a /proc/stat text; None if it has no ``cpu`` line."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
            # already counted in user and nice.
            values = [int(v) for v in fields[1:9]] + [0] * (8 - len(fields[1:9]))
            user, nice, system, idle, iowait, irq, softirq, steal = values
            return CpuTimes(user + nice + system + irq + softirq, idle + iowait, steal)
    return None


def read() -> CpuTimes | None:
    """The current totals; None where there is no /proc/stat (not Linux)."""
    try:
        return parse_proc_stat(PROC_STAT.read_text())
    except OSError:
        return None


def shares(before: CpuTimes, after: CpuTimes) -> tuple[float, float] | None:
    """(busy %, stolen %) of all CPU time between two readings; None if no time passed."""
    total = after.total - before.total
    if total <= 0:
        return None
    return (
        100.0 * (after.busy - before.busy) / total,
        100.0 * (after.steal - before.steal) / total,
    )
