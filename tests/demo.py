"""``make demo``: cache-worker on a live database and Redis, narrating what happens to each key.

Starts MariaDB (or Postgres, ``--source postgres-notify|postgres-logical``) and Redis as local
processes on free loopback ports under ``.demo/`` (the same machinery the integration tests use),
creates a small ``shop`` schema (and runs ``cache-worker setup`` on Postgres), runs the real
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.services import MariaDBServer, PostgresServer

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / ".demo"
REPL_PASSWORD = "demo-replica-pw"

MYSQL_SCHEMA = [
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

# The same tables in a "shop" schema, so the scripted SQL below runs unchanged on Postgres.
POSTGRES_SCHEMA = [
    "CREATE SCHEMA shop",
    """CREATE TABLE shop.users (
         id INT PRIMARY KEY, name VARCHAR(100), email VARCHAR(200),
         status VARCHAR(20) NOT NULL DEFAULT 'active', balance DECIMAL(10,2),
         updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))""",
    "CREATE TABLE shop.orders (id INT PRIMARY KEY, user_id INT NOT NULL, total DECIMAL(10,2))",
    # Logical decoding then carries whole old rows, so moved keys are evicted too.
    "ALTER TABLE shop.users REPLICA IDENTITY FULL",
    "ALTER TABLE shop.orders REPLICA IDENTITY FULL",
    f"CREATE ROLE cache_worker LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}'",
    "GRANT USAGE, CREATE ON SCHEMA shop TO cache_worker",
    "GRANT SELECT, TRIGGER ON ALL TABLES IN SCHEMA shop TO cache_worker",
    "GRANT CREATE ON DATABASE postgres TO cache_worker",
    "ALTER TABLE shop.users OWNER TO cache_worker",
    "ALTER TABLE shop.orders OWNER TO cache_worker",
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


def demo_config(source: str, port: int, redis_url: str) -> str:
    dsn = (
        f"mysql://cache_worker@127.0.0.1:{port}/shop"
        if source == "mysql"
        else f"postgresql://cache_worker@127.0.0.1:{port}/postgres"
    )
    return f"""\
name = "demo"

[source]
kind = "{source}"
dsn = "{dsn}"
password_file = "{DEMO_DIR / "db-password"}"
heartbeat = "1s"
poll_interval = "1s"

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
        choices=["mysql", "postgres-notify", "postgres-logical"],
        help="which source to demonstrate",
    )
    parser.add_argument("--once", action="store_true", help="exit after the scripted steps")
    parser.add_argument("--pause", type=float, default=1.5, help="seconds between steps")
    args = parser.parse_args(argv)

    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir()
    # The servers' data directories go under .demo/ rather than /tmp.
    tempfile.tempdir = str(DEMO_DIR)
    from tests.services import close_all, start_local_redis

    worker: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    seen: list[str] = []
    database = "MariaDB" if args.source == "mysql" else "PostgreSQL"
    try:
        print(f"starting {database} and Redis under .demo/ ...", flush=True)
        db = DemoDatabase(args.source)
        redis_server = start_local_redis()
        (DEMO_DIR / "db-password").write_text(REPL_PASSWORD)
        config = DEMO_DIR / "config.toml"
        config.write_text(demo_config(args.source, db.port, redis_server.url()))
        if args.source != "mysql":
            setup = subprocess.run(
                [sys.executable, "-m", "worker.cli", "setup", "--config", str(config)],
                capture_output=True, text=True, cwd=REPO, check=False,
            )  # fmt: skip
            if setup.returncode != 0:
                raise SystemExit(f"cache-worker setup failed:\n{setup.stdout}{setup.stderr}")
            print(f"  ran `cache-worker setup`: {len(setup.stdout.splitlines())} SQL statements")
        client = redis_server.client(decode_responses=True)
        client.config_set("notify-keyspace-events", "KA")
        print(f"  {database:<10} 127.0.0.1:{db.port}  ({db.admin_hint})")
        print(f"  Redis      {redis_server.url()}")
        print(f"  config     {config.relative_to(REPO)}\n")

        log_path = DEMO_DIR / "worker.log"
        command = [sys.executable, "-m", "worker.cli", "run", "--config", str(config)]
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(
                [*command, "--log-format", "json"],
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
            print(f"-- {title}\n  {db.prompt}> {statement}", flush=True)
            db.execute(statement)
            time.sleep(args.pause)
        print("\nkeys now in Redis:")
        left = sorted(
            k for k in client.scan_iter() if ":cw:" not in k and not k.startswith("cache-worker:")
        )
        for key in left:
            print("  " + _describe_key(client, key, "get"))
        if not left:
            print("  (none)")
        if args.once:
            return 0 if seen else 1
        print(
            f"\nTry your own SQL:  {db.client_command}\n"
            "and watch the keys change here. Ctrl-C stops everything.",
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
        print(f"\nstopped the worker, {database} and Redis.", flush=True)


class DemoDatabase:
    """The demo's database server with the shop schema, for MySQL or Postgres."""

    mysql: MariaDBServer | None
    postgres: PostgresServer | None

    def __init__(self, source: str) -> None:
        from tests.services import start_local_mariadb, start_local_postgres

        if source == "mysql":
            self.mysql = start_local_mariadb()
            self.port = self.mysql.port
            for statement in MYSQL_SCHEMA:
                self.mysql.admin_sql(statement)
            self.prompt = "mysql"
            self.admin_hint = f"root / {self.mysql.password}"
            self.client_command = (
                f"mariadb -h127.0.0.1 -P{self.port} -uroot -p{self.mysql.password} shop"
            )
            self.postgres = None
        else:
            self.postgres = start_local_postgres()
            self.port = self.postgres.port
            with self.postgres.connect() as conn:
                for statement in POSTGRES_SCHEMA:
                    conn.execute(statement)
            self.prompt = "psql"
            self.admin_hint = f"{self.postgres.user} / {self.postgres.password}"
            self.client_command = f"psql {self.postgres.dsn()}"
            self.mysql = None

    def execute(self, statement: str) -> None:
        if self.mysql is not None:
            self.mysql.admin_sql(statement)
            return
        assert self.postgres is not None
        with self.postgres.connect() as conn:
            conn.execute(statement)


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
