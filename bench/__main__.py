"""Command line of the benchmark: ``python -m bench [--quick] [--seed N] [--only PARTS]``.

Starts Redis, MariaDB and Postgres from the Debian binaries (never a shared server: the benchmark
writes and flushes freely), runs every part in turn (``bench.mariadb_parts``,
``bench.postgres_parts``), prints the Markdown report on stdout (progress goes to stderr) and
writes it as JSON under ``bench/results/``. A part that fails is reported and makes the exit code
1 without stopping the others; unmet targets never fail the run. Every server it started is
stopped in a ``finally``, so errors and Ctrl-C leave nothing running.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench import targets
from bench.mariadb_parts import run_mariadb
from bench.postgres_parts import run_postgres
from bench.report import markdown, write_json
from bench.run import PARTS, Run
from bench.sizes import FULL, QUICK
from tests import services

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument("--seed", type=int, default=42, help="workload seed (default 42)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all): {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="write configs, worker logs and raw lag samples here and keep them",
    )
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            return _run(Run(sizes, args.seed, parts, args.keep.resolve()))
        with tempfile.TemporaryDirectory(prefix="cache-worker-bench-") as tmp:
            return _run(Run(sizes, args.seed, parts, Path(tmp)))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        services.close_all()


def _run(run: Run) -> int:
    run.log(f"{run.sizes.mode} run; starting Redis ...")
    redis_server = services.start_local_redis()
    if run.parts & {"mariadb", "memory", "lag"}:
        run_mariadb(run, redis_server)
    if run.parts & {"logical", "notify", "lag", "pgbench"}:
        run_postgres(run, redis_server)
    report = run.report
    report.targets = targets.evaluate(report)
    total = time.perf_counter() - run.began
    text = markdown(report)
    print(text)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.json"
    write_json(
        path,
        report,
        {
            "timestamp": stamp,
            "mode": run.sizes.mode,
            "seed": run.seed,
            "parts": sorted(run.parts),
            "sizes": asdict(run.sizes),
            "total_seconds": round(total, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
        },
    )
    print(f"\n{run.sizes.mode} run took {total:.0f}s; written {path}", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
