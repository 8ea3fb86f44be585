"""The lag test's reader process: when each ``lag:<id>`` key was first written to Redis.

Run as ``python -m bench.keyspace_reader`` (its own small process: it imports only redis, so it
is subscribed within a fraction of a second, and neither the writer's pacing nor the GIL delays
its stamps). It subscribes to the keyspace notifications of ``lag:*`` (the benchmark enables them
on its own Redis), creates the ``--ready`` file, stamps each first ``set`` with the system-wide
monotonic clock the writer also uses, and writes the stamps as JSON to ``--out`` once it saw
``--expected`` keys, got SIGTERM, or reached ``--max-seconds``. The Redis password, if any,
comes from the ``BENCH_REDIS_PASSWORD`` environment variable, never the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import redis

LAG_KEY_PREFIX = "lag:"
KEYSPACE_EVENTS = "K$"  # keyspace channel, string commands (the worker's SET)
PASSWORD_ENV = "BENCH_REDIS_PASSWORD"


def read_stamps(path: Path) -> dict[int, float]:
    """The stamps a reader wrote; empty when it wrote none (killed outright)."""
    raw = json.loads(path.read_text()) if path.exists() else {}
    return {int(k): float(v) for k, v in raw.items()}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.keyspace_reader")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    client = redis.Redis(
        host=args.host, port=args.port, password=os.environ.get(PASSWORD_ENV), socket_timeout=10
    )
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.psubscribe(f"__keyspace@0__:{LAG_KEY_PREFIX}*")
    seen: dict[int, float] = {}
    deadline = time.monotonic() + args.max_seconds
    args.ready.write_text("subscribed\n")
    try:
        while len(seen) < args.expected and not stop.is_set() and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.05)
            now = time.monotonic()
            if message is None:
                continue
            suffix = bytes(message["channel"]).rsplit(b":", 1)[-1]
            if suffix.isdigit():
                seen.setdefault(int(suffix), now)
    finally:
        pubsub.close()
        client.close()
        args.out.write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
