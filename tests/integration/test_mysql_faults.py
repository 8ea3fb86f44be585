"""The daemon under faults: Redis outages, shutdown signals during an outage, TLS to Redis.

Loopback servers only; every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import redis

from tests.integration.redis_reads import get_json
from tests.integration.test_mysql_end_to_end import USERS_DDL, sql
from tests.integration.worker_process import WorkerProcess, run_cli, wait_until, write_config
from tests.services import MariaDBServer, RedisServer, free_port, start_local_redis


def users_config(
    tmp_path: Path, mariadb: MariaDBServer, db: str, redis_url: str, extra: str = ""
) -> Path:
    return write_config(
        tmp_path / "config.toml",
        name=db,
        source_dsn=mariadb.dsn(db),
        redis_url=redis_url,
        rules=[
            {
                "name": "profile",
                "table": f"{db}.users",
                "keys": ["user:{id}"],
                "columns": ["id", "name"],
            }
        ],
        extra=extra,
    )


def file_checkpoint(tmp_path: Path) -> str:
    return f'\n[checkpoint]\nstore = "file"\npath = "{tmp_path / "checkpoint.json"}"\n'


def test_redis_outage_is_retried_and_never_advances_checkpoint(
    tmp_path: Path,
    mariadb: MariaDBServer,
    mysql_db: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    sql(mariadb, mysql_db, USERS_DDL)
    cfg = users_config(tmp_path, mariadb, mysql_db, redis_server.url(), file_checkpoint(tmp_path))
    checkpoint = tmp_path / "checkpoint.json"
    worker = WorkerProcess(cfg).start()
    try:
        worker.wait_streaming()
        sql(mariadb, mysql_db, "INSERT INTO users (id, name) VALUES (1, 'before')")
        wait_until(lambda: redis_client.get("user:1"), what="first write")
        # The write is applied before it is checkpointed (up to checkpoint.interval later), and
        # that save may land during the outage: wait for it, so only the outage's rows remain.
        before_outage = _caught_up(checkpoint, mariadb)

        redis_server.stop()
        outage_began = time.monotonic()
        sql(
            mariadb,
            mysql_db,
            *(f"INSERT INTO users (id, name) VALUES ({i}, 'n{i}')" for i in range(2, 202)),
        )
        wait_until(lambda: worker.has_event("retrying"), timeout=30, what="retry logged")
        # A ten-second outage: long enough for several backoff rounds.
        time.sleep(max(0.0, 10.0 - (time.monotonic() - outage_began)))
        assert not worker.exited(), worker.output()
        assert _position(checkpoint) == before_outage  # nothing applied, nothing checkpointed

        redis_server.start()  # comes back empty: no persistence
        client = redis_server.client(decode_responses=True)
        wait_until(
            lambda: all(client.exists(f"user:{i}") for i in range(2, 202)),
            timeout=60,
            what="catch-up after outage",
        )
        # decode_responses and the key exists (waited for above): GET gives a str.
        assert get_json(client, "user:201") == {"id": 201, "name": "n201"}
        wait_until(lambda: _position(checkpoint) != before_outage, what="checkpoint moves on")
        retries = [e for e in worker.events() if e.get("event") == "retrying"]
        assert all(e["error_class"] == "SinkUnavailable" for e in retries)
        assert len({e["backoff_s"] for e in retries}) > 1  # backoff varies (exponential, jitter)
        assert worker.stop() == 0
    finally:
        redis_server.start()
        if not worker.exited():
            worker.kill()


def test_sigterm_during_outage_exits_within_grace_and_second_signal_at_once(
    tmp_path: Path,
    mariadb: MariaDBServer,
    mysql_db: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    sql(mariadb, mysql_db, USERS_DDL)
    cfg = users_config(tmp_path, mariadb, mysql_db, redis_server.url(), file_checkpoint(tmp_path))
    checkpoint = tmp_path / "checkpoint.json"
    workers: list[WorkerProcess] = []
    try:
        for second_signal in (False, True):
            redis_server.start()
            worker = WorkerProcess(cfg).start()
            workers.append(worker)
            worker.wait_streaming()
            if second_signal:
                # The first round's row was never applied: this worker replays it first.
                client = redis_server.client(decode_responses=True)
                # The default binds this round's client; mypy cannot infer such a lambda.
                wait_until(lambda c=client: c.exists("user:0"), what="replayed first row")  # type: ignore[misc]
            saved = _caught_up(checkpoint, mariadb)
            redis_server.stop()
            sql(
                mariadb,
                mysql_db,
                f"INSERT INTO users (id, name) VALUES ({int(second_signal)}, 'x')",
            )
            # As above: the default binds this round's worker.
            wait_until(lambda w=worker: w.has_event("retrying"), timeout=30, what="retrying")  # type: ignore[misc]
            assert worker.proc is not None
            began = time.monotonic()
            worker.proc.terminate()
            if second_signal:
                time.sleep(0.5)
                worker.proc.terminate()
                assert worker.wait(timeout=10) == 130
                assert worker.has_event("forced_exit")
            else:
                code = worker.wait(timeout=30)
                assert code == 4, worker.output()  # could not apply: says so, does not hang
            assert time.monotonic() - began < 10
            assert _position(checkpoint) == saved
    finally:
        redis_server.start()
        for worker in workers:
            if not worker.exited():
                worker.kill()


def _position(checkpoint: Path) -> dict[str, object]:
    """The saved position, without when it was saved (a re-save of it is no advance)."""
    saved: dict[str, object] = json.loads(checkpoint.read_text())
    saved.pop("saved_at", None)
    return saved


def _caught_up(checkpoint: Path, mariadb: MariaDBServer) -> dict[str, object]:
    """The checkpoint once it holds the server's last transaction: all of it applied and saved."""
    [(server_gtid,)] = mariadb.admin_sql("SELECT @@gtid_binlog_pos")
    wait_until(
        lambda: checkpoint.exists() and _position(checkpoint).get("gtid") == server_gtid,
        timeout=15,
        what=f"checkpoint at {server_gtid}",
    )
    return _position(checkpoint)


def _make_certs(directory: Path) -> dict[str, Path]:
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "redis.key", directory / "redis.csr", directory / "redis.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    commands = [
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=cache-worker test CA",
            "-keyout",
            ca_key,
            "-out",
            ca_crt,
        ],
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            key,
            "-out",
            csr,
        ],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca_crt,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            crt,
        ],
    ]
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=60)
    return {"ca": ca_crt, "key": key, "crt": crt}


def test_rediss_with_generated_certificate_and_acl_password(
    tmp_path: Path, mariadb: MariaDBServer, mysql_db: str
) -> None:
    certs = _make_certs(tmp_path)
    tls_port = free_port()
    server: RedisServer = start_local_redis(
        [
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(certs["crt"]),
            "--tls-key-file",
            str(certs["key"]),
            "--tls-ca-cert-file",
            str(certs["ca"]),
            "--tls-auth-clients",
            "no",
        ]
    )
    try:
        plain = server.client(decode_responses=True)
        # redis-py leaves execute_command unannotated.
        plain.execute_command("ACL", "SETUSER", "cw", "on", ">tls-secret-pw", "~*", "+@all")  # type: ignore[no-untyped-call]
        sql(mariadb, mysql_db, USERS_DDL)
        cfg = users_config(tmp_path, mariadb, mysql_db, f"rediss://cw@127.0.0.1:{tls_port}/0")
        text = cfg.read_text().replace(
            f'url = "rediss://cw@127.0.0.1:{tls_port}/0"',
            f'url = "rediss://cw@127.0.0.1:{tls_port}/0"\nssl_ca = "{certs["ca"]}"',
        )
        cfg.write_text(text)
        env = {"CACHE_WORKER_REDIS__PASSWORD": "tls-secret-pw"}
        worker = WorkerProcess(cfg, env=env).start()
        try:
            worker.wait_streaming()
            sql(mariadb, mysql_db, "INSERT INTO users (id, name) VALUES (1, 'tls')")
            wait_until(lambda: plain.get("user:1"), what="write over TLS")
            # A decode_responses client, and the key was just written: GET gives a str.
            assert get_json(plain, "user:1") == {"id": 1, "name": "tls"}
            assert worker.stop() == 0
        finally:
            if not worker.exited():
                worker.kill()
        assert "tls-secret-pw" not in worker.output()
        assert mariadb.password not in worker.output()

        # Without the CA the server certificate is not trusted: check says so.
        cfg.write_text(text.replace(f'ssl_ca = "{certs["ca"]}"', ""))
        result = run_cli(cfg, "check", env=env)
        assert result.returncode == 7
        [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("FAIL  redis reachable")]
        assert "certificate" in line.lower()
        assert "tls-secret-pw" not in result.stdout
    finally:
        server.close()
