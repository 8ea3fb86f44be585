"""Command line of the benchmark: ``python -m bench [--quick] [--seed N]``.

Starts MariaDB and Redis from the Debian binaries (never a shared server: the benchmark writes
and flushes freely), loads the workload, runs every contender on the same binlog range, prints a
Markdown table and writes it as JSON under ``bench/results/``. Every server it started is stopped
in a ``finally``, so errors and Ctrl-C leave nothing running.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import contenders
from bench.report import Result, markdown_table, write_json
from bench.workload import CHANGES_PER_TRANSACTION, generate_transactions
from tests import services

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL = {"rows": 100_000, "changes": 200_000}
QUICK = {"rows": 20_000, "changes": 20_000}
EVICT_RULE = {
    "name": "items-evict",
    "table": "bench.items",
    "keys": ["item:{id}"],
    "action": "evict",
}
REFRESH_RULE = {
    "name": "items-json",
    "table": "bench.items",
    "keys": ["item:{id}"],
    "action": "refresh",
    "format": "json",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20k rows / 20k changes")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    try:
        return _run(size["rows"], size["changes"], args.seed, args.quick)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        services.close_all()


def _run(rows: int, changes: int, seed: int, quick: bool) -> int:
    began = time.perf_counter()
    print("starting MariaDB and Redis ...", file=sys.stderr, flush=True)
    mariadb = services.start_local_mariadb()
    redis_server = services.start_local_redis()
    print(f"loading {rows} rows and {changes} row changes ...", file=sys.stderr, flush=True)
    load_started = time.perf_counter()
    rng = contenders.load(mariadb, rows, seed, generate_transactions(rows, changes, seed))
    load_seconds = time.perf_counter() - load_started
    print(f"loaded in {load_seconds:.1f}s; binlog range {rng}", file=sys.stderr, flush=True)

    results: list[Result] = []
    flush = redis_server.client()
    with tempfile.TemporaryDirectory(prefix="cache-worker-bench-") as tmp:
        work = Path(tmp)
        runs = [
            ("parse-only", lambda: contenders.parse_only(mariadb, rng)),
            ("naive", lambda: contenders.naive_delete(mariadb, redis_server, rng)),
            (
                "evict",
                lambda: contenders.run_worker(
                    "cache-worker evict rule",
                    contenders.write_worker_config(
                        work,
                        "bench-evict",
                        mariadb,
                        redis_server,
                        EVICT_RULE,
                        rng,
                    ),
                    work / "evict.log",
                ),
            ),
            (
                "refresh",
                lambda: contenders.run_worker(
                    "cache-worker json refresh rule",
                    contenders.write_worker_config(
                        work,
                        "bench-refresh",
                        mariadb,
                        redis_server,
                        REFRESH_RULE,
                        rng,
                    ),
                    work / "refresh.log",
                ),
            ),
        ]
        for label, run in runs:
            # Every contender starts from an empty cache so none benefits from another's keys.
            flush.flushdb()
            print(f"running {label} ...", file=sys.stderr, flush=True)
            results.append(run())
    flush.close()

    table = markdown_table(results)
    print(table)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.json"
    write_json(
        path,
        results,
        {
            "timestamp": stamp,
            "quick": quick,
            "seed": seed,
            "table_rows": rows,
            "row_changes": changes,
            "transactions": changes // CHANGES_PER_TRANSACTION,
            "binlog": {
                "start": f"{rng.start_file}:{rng.start_pos}",
                "end": f"{rng.end_file}:{rng.end_pos}",
            },
            "load_seconds": round(load_seconds, 2),
            "total_seconds": round(time.perf_counter() - began, 2),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "markdown": table,
        },
    )
    print(f"\nwritten {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
