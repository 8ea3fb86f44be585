"""``make demo``: cache-worker on a live MariaDB and Redis, narrating what happens to each key.

Starts MariaDB and Redis as local processes on free loopback ports under ``.demo/`` (the same
machinery the integration tests use), creates a small ``shop`` schema, runs the real
``cache-worker run`` with a demo config, performs a few inserts, updates and deletes, and prints
each key's new value and TTL as Redis reports the change (keyspace notifications). Then it keeps
everything running so you can try your own SQL, until Ctrl-C stops all it started.
``--once`` ends after the scripted steps (the test suite runs the demo that way).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / ".demo"
REPL_PASSWORD = "demo-replica-pw"

SCHEMA = [
    "CREATE DATABASE shop",
    """CREATE TABLE shop.users (
         id INT PRIMARY KEY, name VARCHAR(100), email VARCHAR(200),
         status VARCHAR(20) NOT NULL DEFAULT 'active', balance DECIMAL(10,2),
         updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))""",
    "CREATE TABLE shop.orders (id INT PRIMARY KEY, user_id INT NOT NULL, total DECIMAL(10,2))",
    f"CREATE USER 'cache_worker'@'127.0.0.1' IDENTIFIED BY '{REPL_PASSWORD}'",
    "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'cache_worker'@'127.0.0.1'",
    "GRANT SELECT ON shop.* TO 'cache_worker'@'127.0.0.1'",
]

STEPS = [
    (
        "a new user signs up",
        "INSERT INTO shop.users (id, name, email, balance) "
        "VALUES (1, 'Ada', 'ada@example.com', 10.00)",
    ),
    (
        "a second user",
        "INSERT INTO shop.users (id, name, email, balance) "
        "VALUES (2, 'Linus', 'linus@example.com', 0)",
    ),
    (
        "Ada orders something (evicts her order list)",
        "INSERT INTO shop.orders (id, user_id, total) VALUES (100, 1, 42.50)",
    ),
    (
        "Ada changes her email (the email key moves)",
        "UPDATE shop.users SET email = 'ada@lovelace.dev', balance = balance + 5 WHERE id = 1",
    ),
    (
        "Linus is suspended (leaves the rule's `when` filter: evicted)",
        "UPDATE shop.users SET status = 'suspended' WHERE id = 2",
    ),
    (
        "the order moves to Linus (both users' order lists evicted)",
        "UPDATE shop.orders SET user_id = 2 WHERE id = 100",
    ),
    (
        "Linus is reactivated (enters the filter again: refreshed)",
        "UPDATE shop.users SET status = 'active' WHERE id = 2",
    ),
    ("Ada deletes her account", "DELETE FROM shop.users WHERE id = 1"),
]


def demo_config(mysql_port: int, redis_url: str) -> str:
    return f"""\
name = "demo"

[source]
kind = "mysql"
dsn = "mysql://cache_worker@127.0.0.1:{mysql_port}/shop"
password_file = "{DEMO_DIR / "mysql-password"}"
heartbeat = "1s"

[redis]
url = "{redis_url}"

[log]
progress_interval = "10s"

[[rules]]
name = "user-profile"
table = "shop.users"
keys = ["user:{{id}}", "user:email:{{email}}"]
columns = ["id", "name", "email", "balance", "updated_at"]
ttl = "10m"
when = {{ status = "active" }}

[[rules]]
name = "user-orders"
table = "shop.orders"
keys = ["user:{{user_id}}:orders"]
action = "evict"
"""


def _describe_key(client: Any, key: str, event: str) -> str:
    if event in ("del", "expired", "evicted"):
        return f"{key:<28} {event.upper()}"
    kind = client.type(key)
    if kind == "string":
        value = client.get(key)
    elif kind == "hash":
        value = json.dumps(client.hgetall(key))
    else:
        return f"{key:<28} {event:<8} (gone)"
    ttl = client.pttl(key)
    return f"{key:<28} {'SET':<8} ttl={ttl / 1000:.0f}s  {value}"


def watch_keys(client: Any, stop: threading.Event, out: list[str]) -> None:
    """Print every change to a cache key (not the worker's own companion keys)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("__keyspace@0__:*")
    while not stop.is_set():
        message = pubsub.get_message(timeout=0.2)
        if not message:
            continue
        key = message["channel"].split(":", 1)[1]
        event = message["data"]
        if ":cw:" in key or key.startswith("cache-worker:") or event in ("expire", "pexpire"):
            continue
        line = "  redis  " + _describe_key(client, key, event)
        out.append(line)
        print(line, flush=True)
    pubsub.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument(
        "--source",
        default="mysql",
        choices=["mysql"],
        help="which source to demonstrate (Postgres sources are planned)",
    )
    parser.add_argument("--once", action="store_true", help="exit after the scripted steps")
    parser.add_argument("--pause", type=float, default=1.5, help="seconds between steps")
    args = parser.parse_args(argv)

    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir()
    # The servers' data directories go under .demo/ rather than /tmp.
    tempfile.tempdir = str(DEMO_DIR)
    from tests.services import close_all, start_local_mariadb, start_local_redis

    worker: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    seen: list[str] = []
    try:
        print("starting MariaDB and Redis under .demo/ ...", flush=True)
        mariadb = start_local_mariadb()
        redis_server = start_local_redis()
        for statement in SCHEMA:
            mariadb.admin_sql(statement)
        (DEMO_DIR / "mysql-password").write_text(REPL_PASSWORD)
        config = DEMO_DIR / "config.toml"
        config.write_text(demo_config(mariadb.port, redis_server.url()))
        client = redis_server.client(decode_responses=True)
        client.config_set("notify-keyspace-events", "KA")
        print(f"  MariaDB  127.0.0.1:{mariadb.port}  (root / {mariadb.password})")
        print(f"  Redis    {redis_server.url()}")
        print(f"  config   {config.relative_to(REPO)}\n")

        log_path = DEMO_DIR / "worker.log"
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "run",
                    "--config",
                    str(config),
                    "--log-format",
                    "json",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        _wait_for_event(log_path, "streaming", worker)
        print(f"cache-worker is streaming (its JSON log: {log_path.relative_to(REPO)})\n")

        watcher = threading.Thread(target=watch_keys, args=(client, stop, seen), daemon=True)
        watcher.start()
        # What a web tier's cache-aside reads would have left behind; the worker evicts them.
        for user_id in (1, 2):
            client.set(f"user:{user_id}:orders", "[]", ex=600)
            print(f"  web    user:{user_id}:orders cached by the web tier (cache-aside fill)")
        time.sleep(0.3)
        for title, statement in STEPS:
            print(f"-- {title}\n  mysql> {statement}", flush=True)
            mariadb.admin_sql(statement)
            time.sleep(args.pause)
        print("\nkeys now in Redis:")
        for key in sorted(
            k for k in client.scan_iter() if ":cw:" not in k and not k.startswith("cache-worker:")
        ):
            print("  " + _describe_key(client, key, "get"))
        if args.once:
            return 0 if seen else 1
        print(
            f"\nTry your own SQL:  mariadb -h127.0.0.1 -P{mariadb.port} -uroot -p{mariadb.password}"
            " shop\nand watch the keys change here. Ctrl-C stops everything.",
            flush=True,
        )
        signal.signal(signal.SIGTERM, _interrupt)
        while worker.poll() is None:
            time.sleep(0.5)
        print(f"the worker exited ({worker.returncode}); see {log_path}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop.set()
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
        close_all()
        print("\nstopped the worker, MariaDB and Redis.", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_for_event(log_path: Path, event: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode}):\n{log_path.read_text()}")
        for line in log_path.read_text(errors="replace").splitlines():
            if f'"event": "{event}"' in line:
                return
        time.sleep(0.1)
    raise SystemExit(f"the worker did not start streaming:\n{log_path.read_text()}")


if __name__ == "__main__":
    sys.exit(main())
