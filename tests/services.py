"""Real MariaDB, Redis and Postgres servers for the integration tests, and their whole lifecycle.

For each kind of server independently, ``provide_mariadb``/``provide_redis``/``provide_postgres``
pick the first backend that works: (a) an existing server named by ``CACHE_WORKER_TEST_MYSQL_DSN``,
``CACHE_WORKER_TEST_REDIS_URL`` or ``CACHE_WORKER_TEST_POSTGRES_DSN``; (b) a testcontainers
container when a Docker engine answers; (c) the Debian binaries (``make install``) run as child
processes in temporary directories on free loopback ports. The result is a small frozen dataclass
holding connection info; servers started here (backend ``local``) can also be stopped, started,
killed and restarted so tests can exercise outages. Every server started here is stopped and its
directory removed by ``close()`` or an ``atexit`` hook; if the test process is killed outright,
the kernel still stops its servers (``PR_SET_PDEATHSIG``) and the next run deletes their
directories. A server that cannot be started raises ``ServiceError`` with the tail of its log:
integration tests fail loudly, never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg
import pymysql
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

MYSQL_DSN_ENV = "CACHE_WORKER_TEST_MYSQL_DSN"
REDIS_URL_ENV = "CACHE_WORKER_TEST_REDIS_URL"
POSTGRES_DSN_ENV = "CACHE_WORKER_TEST_POSTGRES_DSN"

MARIADB_IMAGE = "mariadb:10.11"
REDIS_IMAGE = "redis:7"
POSTGRES_IMAGE = "postgres:15"

MARIADB_ROOT_USER = "root"
MARIADB_ROOT_PASSWORD = "rootpw"
POSTGRES_USER = "postgres"
POSTGRES_PASSWORD = "pgpw"

# The settings the binlog source requires; a test that wants a misconfigured server passes an
# overriding flag to ``start_local_mariadb``, which comes later on the command line and so wins.
MARIADB_BINLOG_ARGS: tuple[str, ...] = (
    "--binlog-format=ROW",
    "--binlog-row-image=FULL",
    "--binlog-row-metadata=FULL",
    "--server-id=1",
)
POSTGRES_SERVER_ARGS: tuple[str, ...] = (
    "-c",
    "wal_level=logical",
    "-c",
    "max_replication_slots=10",
    "-c",
    "max_wal_senders=10",
)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

# Seconds each session server took to become ready, and from which backend; printed at the end
# of the run by tests/conftest.py so slow startups are visible.
STARTUP_SECONDS: dict[str, tuple[str, float]] = {}

_INSTALL_HINT = (
    "run `make install` (Debian: mariadb-server mariadb-client redis-server postgresql-15)"
)
_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A test server could not be found, started, stopped or reached."""


# --------------------------------------------------------------------------------------------
# Server handles
# --------------------------------------------------------------------------------------------


class _Handle:
    """Lifecycle methods shared by the three server dataclasses; state lives in ``_control``."""

    _control: _LocalProcess | _Container | None

    @property
    def backend(self) -> str:
        """``local`` (started here from Debian binaries), ``container`` or ``external`` (env)."""
        if isinstance(self._control, _LocalProcess):
            return "local"
        if isinstance(self._control, _Container):
            return "container"
        return "external"

    @property
    def is_local(self) -> bool:
        """True when this process owns the server and may stop, kill or restart it."""
        return isinstance(self._control, _LocalProcess)

    @property
    def running(self) -> bool:
        """Whether a local server's process is alive; other backends are assumed up."""
        if isinstance(self._control, _LocalProcess):
            return self._control.running
        return True

    def _local(self) -> _LocalProcess:
        if not isinstance(self._control, _LocalProcess):
            raise ServiceError(
                f"{self!r} is a {self.backend} server: only servers started by tests/services.py "
                "from local binaries can be stopped, started or killed"
            )
        return self._control

    def start(self) -> None:
        """Start a stopped local server again on the same port and data directory (no-op if up)."""
        self._local().start()

    def stop(self) -> None:
        """Stop a local server cleanly and wait for its process to exit."""
        self._local().stop()

    def restart(self) -> None:
        """Stop then start a local server; same port, same data."""
        control = self._local()
        control.stop()
        control.start()

    def kill(self) -> None:
        """SIGKILL a local server, as a crash would; ``start()`` runs its crash recovery.

        Redis here keeps nothing on disk, so it comes back empty.
        """
        self._local().kill()

    def close(self) -> None:
        """Stop the server if this process started it and delete its files; idempotent."""
        if self._control is not None:
            self._control.close()


@dataclass(frozen=True)
class MariaDBServer(_Handle):
    """A MariaDB server with row-based binlog; ``user``/``password`` are an admin (root) account."""

    host: str
    port: int
    user: str
    password: str
    socket: str | None = None
    datadir: str | None = None
    _control: _LocalProcess | _Container | None = field(default=None, repr=False, compare=False)

    def dsn(self, database: str = "") -> str:
        """``mysql://user:password@host:port/database`` for the admin account."""
        return f"mysql://{_userinfo(self.user, self.password)}@{self.host}:{self.port}/{database}"

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.Connection[Any]:
        """An autocommit admin connection over TCP; ``kwargs`` go to ``pymysql.connect``."""
        options: dict[str, Any] = {"autocommit": True, "connect_timeout": 5, **kwargs}
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            **options,
        )

    def admin_sql(self, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as the admin user and return its rows (empty for non-queries)."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()


@dataclass(frozen=True)
class RedisServer(_Handle):
    """A Redis server; ``password`` is ``None`` when it requires no AUTH."""

    host: str
    port: int
    password: str | None = None
    _control: _LocalProcess | _Container | None = field(default=None, repr=False, compare=False)

    def url(self, db: int = 0) -> str:
        """``redis://[:password@]host:port/db``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client for db 0 unless ``db=`` says otherwise; ``kwargs`` go to ``redis.Redis``."""
        options: dict[str, Any] = {"socket_timeout": 10, **kwargs}
        return redis.Redis(host=self.host, port=self.port, password=self.password, **options)


@dataclass(frozen=True)
class PostgresServer(_Handle):
    """A Postgres server with ``wal_level=logical``; ``user`` is a superuser."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    _control: _LocalProcess | _Container | None = field(default=None, repr=False, compare=False)

    def dsn(self, dbname: str | None = None) -> str:
        """``postgresql://user:password@host:port/dbname``."""
        userinfo = _userinfo(self.user, self.password)
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{dbname or self.dbname}"

    def connect(self, dbname: str | None = None) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit superuser connection over TCP."""
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=5)


def _userinfo(user: str, password: str | None) -> str:
    if not password:
        return quote(user, safe="")
    return f"{quote(user, safe='')}:{quote(password, safe='')}"


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------


def provide_mariadb() -> MariaDBServer:
    """The session MariaDB: from ``CACHE_WORKER_TEST_MYSQL_DSN``, a container, or local binaries."""
    dsn = os.environ.get(MYSQL_DSN_ENV)
    if dsn:
        server = mariadb_from_dsn(dsn)
        _check_reachable(MYSQL_DSN_ENV, lambda: server.admin_sql("SELECT 1"))
        return server
    if docker_available():
        return _container_mariadb()
    return start_local_mariadb()


def provide_redis() -> RedisServer:
    """The session Redis: from ``CACHE_WORKER_TEST_REDIS_URL``, a container, or a local binary."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        server = redis_from_url(url)
        _check_reachable(REDIS_URL_ENV, lambda: _redis_ping(server))
        return server
    if docker_available():
        return _container_redis()
    return start_local_redis()


def provide_postgres() -> PostgresServer:
    """The session Postgres: from ``CACHE_WORKER_TEST_POSTGRES_DSN``, a container, or binaries."""
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if dsn:
        server = postgres_from_dsn(dsn)
        _check_reachable(POSTGRES_DSN_ENV, lambda: server.connect().close())
        return server
    if docker_available():
        return _container_postgres()
    return start_local_postgres()


def mariadb_from_dsn(dsn: str) -> MariaDBServer:
    """Parse ``mysql://user:password@host:port/`` (port defaults to 3306, user to root)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname:
        raise ServiceError(f"{MYSQL_DSN_ENV} must look like mysql://user:password@host:port/")
    return MariaDBServer(
        host=parts.hostname,
        port=parts.port or 3306,
        user=unquote(parts.username or MARIADB_ROOT_USER),
        password=unquote(parts.password or ""),
    )


def redis_from_url(url: str) -> RedisServer:
    """Parse ``redis://[:password@]host:port[/db]``; the db is chosen per use with ``url(db)``."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ServiceError(f"{REDIS_URL_ENV} must look like redis://[:password@]host:port/")
    password = unquote(parts.password) if parts.password else None
    return RedisServer(host=parts.hostname, port=parts.port or 6379, password=password)


def postgres_from_dsn(dsn: str) -> PostgresServer:
    """Parse ``postgresql://user:password@host:port/dbname`` (defaults: 5432, postgres)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ServiceError(f"{POSTGRES_DSN_ENV} must look like postgresql://user:pw@host:port/db")
    return PostgresServer(
        host=parts.hostname,
        port=parts.port or 5432,
        user=unquote(parts.username or POSTGRES_USER),
        password=unquote(parts.password or ""),
        dbname=parts.path.lstrip("/") or "postgres",
    )


def _check_reachable(env: str, probe: Callable[[], object]) -> None:
    try:
        probe()
    except Exception as exc:
        raise ServiceError(f"the server named by {env} does not answer: {exc}") from exc


_docker_answer: bool | None = None


def docker_available() -> bool:
    """Whether a Docker engine answers a ping; asked once per process."""
    global _docker_answer
    if _docker_answer is None:
        try:
            import docker

            client = docker.from_env(timeout=5)
            try:
                _docker_answer = bool(client.ping())
            finally:
                client.close()
        except Exception:
            # No socket, no permission, engine down: all mean "use local binaries instead".
            _docker_answer = False
    return _docker_answer


# --------------------------------------------------------------------------------------------
# testcontainers backend (not exercised on machines without Docker)
# --------------------------------------------------------------------------------------------


class _Container:
    """A started testcontainers container; ``close()`` removes it."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self._closed = False
        _register(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _unregister(self)
        self.container.stop()


def _start_container(container: Any) -> _Container:
    try:
        container.start()
    except Exception:
        # A half-started container would otherwise linger until Ryuk reaps it.
        with contextlib.suppress(Exception):
            container.stop()
        raise
    return _Container(container)


def _container_mariadb() -> MariaDBServer:
    from testcontainers.community.mysql import MySqlContainer

    # The image's entrypoint prepends ``mariadbd`` when the command starts with an option;
    # username root makes the container use ``password`` as the root password.
    container = MySqlContainer(
        MARIADB_IMAGE,
        username=MARIADB_ROOT_USER,
        password=MARIADB_ROOT_PASSWORD,
        dbname="test",
    ).with_command(["--log-bin", *MARIADB_BINLOG_ARGS])
    handle = _start_container(container)
    return MariaDBServer(
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(3306)),
        user=MARIADB_ROOT_USER,
        password=MARIADB_ROOT_PASSWORD,
        _control=handle,
    )


def _container_redis() -> RedisServer:
    from testcontainers.community.redis import RedisContainer

    container = RedisContainer(REDIS_IMAGE)
    handle = _start_container(container)
    return RedisServer(
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(6379)),
        _control=handle,
    )


def _container_postgres() -> PostgresServer:
    from testcontainers.community.postgres import PostgresContainer

    container = PostgresContainer(
        POSTGRES_IMAGE,
        username=POSTGRES_USER,
        password=POSTGRES_PASSWORD,
        dbname="postgres",
        driver=None,
    ).with_command(["postgres", *POSTGRES_SERVER_ARGS])
    handle = _start_container(container)
    return PostgresServer(
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(5432)),
        user=POSTGRES_USER,
        password=POSTGRES_PASSWORD,
        dbname="postgres",
        _control=handle,
    )


# --------------------------------------------------------------------------------------------
# Local binaries backend
# --------------------------------------------------------------------------------------------


def start_local_redis(extra_args: Sequence[str] = ()) -> RedisServer:
    """Start ``redis-server`` in a temp dir on a free loopback port, without persistence.

    ``extra_args`` come last on the command line (e.g. ``--tls-port``); the plain port stays open
    so readiness can be checked the same way.
    """
    binary = _find_binary("redis-server")
    root = _make_root("redis")
    port = free_port()
    # Foreground (not --daemonize) so the process is our child: we know when it dies and the
    # kernel stops it if the test process dies first.
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(root),
        "--daemonize", "no",
        "--pidfile", str(root / "redis.pid"),
        "--logfile", str(root / "redis.log"),
        *extra_args,
    ]  # fmt: skip
    server_holder: list[RedisServer] = []
    control = _LocalProcess(
        name="redis",
        root=root,
        argv=argv,
        logs=[root / "redis.log", root / "stdout.log"],
        ready=lambda: _redis_ping(server_holder[0]),
        stop_signal=signal.SIGTERM,
    )
    server = RedisServer(host="127.0.0.1", port=port, _control=control)
    server_holder.append(server)
    _first_start(control)
    return server


def start_local_mariadb(extra_args: Sequence[str] = ()) -> MariaDBServer:
    """Install and start a fresh MariaDB in a temp dir on a free loopback port.

    The server has a ROW binlog with full images and metadata, and ``root``/``rootpw`` over TCP.
    ``extra_args`` are appended to the ``mariadbd`` command line and so override the defaults,
    e.g. ``["--binlog-format=STATEMENT"]`` for a misconfigured source. The caller owns the
    server: call ``close()`` (the session fixture does; ``atexit`` is the backstop).
    """
    install_db = _find_binary("mariadb-install-db")
    mariadbd = _find_binary("mariadbd")
    root = _make_root("mariadb")
    datadir = root / "data"
    sock = root / "mysql.sock"
    port = free_port()
    as_root = os.geteuid() == 0
    # mariadbd refuses to run as root unless told to, and only root may say --user.
    user_arg = ["--user=root"] if as_root else []
    innodb = ["--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M"]

    install = [
        install_db,
        "--no-defaults",
        f"--datadir={datadir}",
        *user_arg,
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        *innodb,
    ]
    install_log = root / "install.log"
    with install_log.open("wb") as log:
        done = subprocess.run(install, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = _tail([install_log])
        shutil.rmtree(root, ignore_errors=True)
        raise ServiceError(f"mariadb-install-db failed (exit {done.returncode}):\n{tail}")

    argv = [
        mariadbd,
        "--no-defaults",
        *user_arg,
        f"--datadir={datadir}",
        f"--socket={sock}",
        f"--pid-file={root / 'mysql.pid'}",
        f"--port={port}",
        "--bind-address=127.0.0.1",
        "--skip-name-resolve",
        f"--log-error={root / 'mariadbd.err'}",
        f"--log-bin={root / 'binlog'}",
        *MARIADB_BINLOG_ARGS,
        *innodb,
        # Tests do not need crash-safe commits; skipping the fsync per commit keeps them fast.
        "--innodb-flush-log-at-trx-commit=0",
        *extra_args,
    ]
    server_holder: list[MariaDBServer] = []
    control = _LocalProcess(
        name="mariadb",
        root=root,
        argv=argv,
        logs=[root / "mariadbd.err", root / "stdout.log"],
        ready=lambda: _mariadb_alive(server_holder[0]),
        stop_signal=signal.SIGTERM,
    )
    server = MariaDBServer(
        host="127.0.0.1",
        port=port,
        user=MARIADB_ROOT_USER,
        password=MARIADB_ROOT_PASSWORD,
        socket=str(sock),
        datadir=str(datadir),
        _control=control,
    )
    server_holder.append(server)
    _first_start(control)
    try:
        _set_mariadb_root_password(server)
    except Exception as exc:
        tail = control.log_tail()
        control.close()
        raise ServiceError(f"could not set the MariaDB root password: {exc}\n{tail}") from exc
    return server


def start_local_postgres() -> PostgresServer:
    """``initdb`` and start Postgres 15 in a temp dir on a free loopback port, wal_level=logical.

    Postgres refuses to run as root, so when we are root both steps run as the ``postgres``
    user the Debian package creates, in a directory it owns.
    """
    bindir = _postgres_bindir()
    root = _make_root("postgres")
    datadir = root / "data"
    port = free_port()
    run_as = POSTGRES_USER if os.geteuid() == 0 else None
    pwfile = root / "pwfile"
    pwfile.write_text(POSTGRES_PASSWORD + "\n")
    if run_as is not None:
        try:
            shutil.chown(root, user=run_as, group=run_as)
            shutil.chown(pwfile, user=run_as, group=run_as)
        except (LookupError, PermissionError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise ServiceError(
                f"running as root needs the '{run_as}' user to own the Postgres data dir "
                f"({exc}); {_INSTALL_HINT}"
            ) from exc

    # Password auth over TCP (not trust) so a DSN with a wrong password fails as in production.
    initdb = [
        str(bindir / "initdb"),
        "-D", str(datadir),
        "-U", POSTGRES_USER,
        f"--pwfile={pwfile}",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E", "UTF8",
        "--locale=C.UTF-8",
        "--no-sync",
    ]  # fmt: skip
    init_log = root / "initdb.log"
    with init_log.open("wb") as log:
        done = subprocess.run(
            initdb, stdout=log, stderr=subprocess.STDOUT, check=False, **_as_user(run_as)
        )
    if done.returncode != 0:
        tail = _tail([init_log])
        shutil.rmtree(root, ignore_errors=True)
        raise ServiceError(f"initdb failed (exit {done.returncode}):\n{tail}")

    argv = [
        str(bindir / "postgres"),
        "-D", str(datadir),
        "-p", str(port),
        "-k", str(root),
        "-c", "listen_addresses=127.0.0.1",
        *POSTGRES_SERVER_ARGS,
        # Tests do not survive power loss anyway; not syncing makes DDL-heavy tests much faster.
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
    ]  # fmt: skip
    server_holder: list[PostgresServer] = []
    control = _LocalProcess(
        name="postgres",
        root=root,
        argv=argv,
        logs=[root / "stdout.log"],
        ready=lambda: _postgres_alive(server_holder[0]),
        # SIGINT is Postgres' "fast" shutdown; SIGTERM would wait for clients to disconnect.
        stop_signal=signal.SIGINT,
        user=run_as,
    )
    server = PostgresServer(
        host="127.0.0.1",
        port=port,
        user=POSTGRES_USER,
        password=POSTGRES_PASSWORD,
        dbname="postgres",
        _control=control,
    )
    server_holder.append(server)
    _first_start(control)
    return server


_ROOT_PREFIX = "cache-worker-"
_OWNER_FILE = "owner.pid"
_reaped = False


def _make_root(kind: str) -> Path:
    """A fresh temp dir for one server, stamped with our pid so a later run can reap it."""
    global _reaped
    if not _reaped:
        _reaped = True
        _reap_stale_roots()
    root = Path(tempfile.mkdtemp(prefix=f"{_ROOT_PREFIX}{kind}-"))
    (root / _OWNER_FILE).write_text(str(os.getpid()))
    return root


def _reap_stale_roots() -> None:
    # A test process killed outright takes its servers with it (parent-death signal) but cannot
    # delete their directories; the next run does, for owners that are no longer alive.
    for root in Path(tempfile.gettempdir()).glob(f"{_ROOT_PREFIX}*-*"):
        try:
            owner = int((root / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not _pid_alive(owner):
            shutil.rmtree(root, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _find_binary(name: str) -> str:
    # Debian installs server daemons in /usr/sbin, which is not on a normal user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise ServiceError(
            f"`{name}` is not installed and no Docker engine answers; {_INSTALL_HINT}"
        )
    return found


def _postgres_bindir() -> Path:
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    # Other major versions are a fallback; the project targets 15.
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise ServiceError(f"Postgres `initdb`/`postgres` not found; {_INSTALL_HINT}")


def _redis_ping(server: RedisServer) -> bool:
    # No retries: redis-py's default backoff turns one refused connect into seconds of waiting.
    client = server.client(socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    finally:
        client.close()


def _mariadb_alive(server: MariaDBServer) -> bool:
    try:
        server.connect(connect_timeout=2).close()
    except pymysql.err.OperationalError as exc:
        # 1045 (access denied) means the server is up but root has no password yet (first boot).
        if exc.args and exc.args[0] == 1045:
            return True
        raise
    return True


def _postgres_alive(server: PostgresServer) -> bool:
    with psycopg.connect(server.dsn(), connect_timeout=2) as conn:
        conn.execute("SELECT 1")
    return True


def _set_mariadb_root_password(server: MariaDBServer) -> None:
    assert server.socket is not None
    # A fresh install has passwordless root accounts; the socket reaches root@localhost.
    conn = pymysql.connect(unix_socket=server.socket, user=MARIADB_ROOT_USER, autocommit=True)
    try:
        with conn.cursor() as cur:
            # Only these accounts are live: under --skip-name-resolve the install's root@HOSTNAME
            # is ignored, and ALTER USER fails on it.
            cur.execute(
                "SELECT host FROM mysql.user WHERE user = %s AND host IN %s",
                (MARIADB_ROOT_USER, ("localhost", "127.0.0.1", "::1")),
            )
            hosts = [row[0] for row in cur.fetchall()]
            for host in hosts:
                cur.execute(
                    "ALTER USER %s@%s IDENTIFIED BY %s",
                    (MARIADB_ROOT_USER, host, MARIADB_ROOT_PASSWORD),
                )
    finally:
        conn.close()
    server.admin_sql("SELECT 1")


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


_live: dict[int, _LocalProcess | _Container] = {}
_live_lock = threading.Lock()


def _register(thing: _LocalProcess | _Container) -> None:
    with _live_lock:
        _live[id(thing)] = thing


def _unregister(thing: _LocalProcess | _Container) -> None:
    with _live_lock:
        _live.pop(id(thing), None)


@atexit.register
def close_all() -> None:
    """Stop every server this process started and delete its files (also runs at exit)."""
    with _live_lock:
        things = list(_live.values())
    for thing in things:
        with contextlib.suppress(Exception):
            thing.close()


def _as_user(user: str | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child after the uid switch (so the kernel keeps it): if the test process
        # is killed outright, atexit never runs, but the kernel still signals the server.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))

    return preexec


class _LocalProcess:
    """One server process run from a local binary, with its own temp dir that ``close`` deletes.

    The parent-death signal fires when the *thread* that started the process exits, so start
    servers from the main thread (as pytest fixtures do), not from short-lived worker threads.
    """

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        argv: list[str],
        logs: list[Path],
        ready: Callable[[], bool],
        stop_signal: int,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self.argv = argv
        self.logs = logs
        self.ready = ready
        self.stop_signal = stop_signal
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None
        self.closed = False
        _register(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.closed:
            raise ServiceError(f"{self.name} was closed; its files are gone")
        if self.running:
            return
        with (self.root / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Own session: a Ctrl-C in the terminal must not kill servers before teardown.
                start_new_session=True,
                preexec_fn=_die_with_parent(self.stop_signal),
                **_as_user(self.user),
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} while starting "
                    f"({' '.join(self.argv)}):\n{self.log_tail()}"
                )
            try:
                if self.ready():
                    return
            except Exception as exc:
                last_error = exc
            time.sleep(0.05)
        self.kill()
        raise ServiceError(
            f"{self.name} did not answer within {READY_TIMEOUT_S:.0f}s "
            f"(last error: {last_error}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.stop()
        finally:
            self.closed = True
            _unregister(self)
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.logs, lines)


def _first_start(control: _LocalProcess) -> None:
    try:
        control.start()
    except BaseException:
        # The error message already carries the log tail; do not leave the temp dir behind.
        control.close()
        raise


def _tail(paths: Sequence[Path], lines: int = 40) -> str:
    chunks = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            tail = "\n".join(text.splitlines()[-lines:])
            chunks.append(f"--- {path.name} (last {lines} lines) ---\n{tail}")
    return "\n".join(chunks) or "(no log output)"
