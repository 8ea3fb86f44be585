"""Results of a benchmark run: the per-contender record, the Markdown table and the JSON file.

Kept free of servers and timing so the unit tests can check the formatting; the ratio column is
each contender's rows/s divided by the parse-only baseline's (the first result), which says how
much of the raw binlog-parsing speed a contender keeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Result:
    """One contender's run: rows it saw, wall seconds, and optional extra notes (JSON-able)."""

    contender: str
    rows: int
    seconds: float
    notes: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def markdown_table(results: list[Result]) -> str:
    """A Markdown table; ratio is relative to the first result (parse-only)."""
    baseline = results[0].rows_per_s if results else 0.0
    lines = [
        "| contender | rows | seconds | rows/s | ratio to parse-only | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        ratio = result.rows_per_s / baseline if baseline > 0 else 0.0
        lines.append(
            f"| {result.contender} | {result.rows} | {result.seconds:.2f} | "
            f"{result.rows_per_s:,.0f} | {ratio:.2f} | {result.notes} |"
        )
    return "\n".join(lines)


def write_json(path: Path, results: list[Result], meta: dict[str, Any]) -> None:
    """Write ``meta`` and the results (with rows/s) as one JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **meta,
        "results": [{**asdict(r), "rows_per_s": round(r.rows_per_s, 1)} for r in results],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
