"""Static checks of deploy/: the systemd unit, the Dockerfile, the compose file and its config.

Nothing here needs Docker or systemd: the files are parsed and their concrete content asserted,
so a change that drops a sandboxing line, runs the image as root or loses a binlog flag fails.
The compose file's config is also loaded through ``worker.settings`` with compose's environment,
which is what the container will do at start.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys and has no %-interpolation in configparser's sense.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "cache-worker.service").read_text())
    return parser


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    # Join continuation lines, then drop comments and blanks.
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


# --- systemd ----------------------------------------------------------------------------------


def test_unit_has_its_sections() -> None:
    assert {"Unit", "Service", "Install"} <= set(_unit().sections())
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_runs_cache_worker_as_its_own_user() -> None:
    service = _unit()["Service"]
    assert service["User"] == "cache-worker"
    assert "DynamicUser" not in service
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/cache-worker/.venv/bin/cache-worker"
    assert argv[1] == "run"
    assert argv[argv.index("--config") + 1] == "/etc/cache-worker/config.toml"
    assert argv[argv.index("--log-format") + 1] == "json"
    assert service["EnvironmentFile"] == "/etc/cache-worker/secrets.env"


def test_unit_restarts_only_when_restarting_can_help() -> None:
    service = _unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"] == "2"
    # Exit codes from worker.errors.ExitCode: CONFIG, POSITION_LOST, PRECONDITION.
    assert set(service["RestartPreventExitStatus"].split()) == {"3", "5", "6"}
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "30"


def test_restart_prevent_codes_match_the_exit_codes() -> None:
    from worker.errors import ExitCode

    codes = {int(c) for c in _unit()["Service"]["RestartPreventExitStatus"].split()}
    assert codes == {ExitCode.CONFIG, ExitCode.POSITION_LOST, ExitCode.PRECONDITION}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
        ("ReadWritePaths", "/var/lib/cache-worker"),
        ("StateDirectory", "cache-worker"),
    ],
)
def test_unit_is_sandboxed(key: str, value: str) -> None:
    service = _unit()["Service"]
    assert key in service, f"{key}= missing from [Service]"
    assert service[key] == value


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_uses_a_slim_python_base() -> None:
    bases = [rest.split()[0] for keyword, rest in _dockerfile_instructions() if keyword == "FROM"]
    assert bases, "no FROM line"
    # The final stage is what ships.
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", bases[-1]), bases[-1]


def test_dockerfile_runs_cache_worker_unprivileged() -> None:
    instructions = _dockerfile_instructions()
    entrypoints = [i for i, (keyword, _) in enumerate(instructions) if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    last = entrypoints[-1]
    assert json.loads(instructions[last][1]) == ["cache-worker"]
    final_stage = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    users = [rest for keyword, rest in instructions[final_stage:last] if keyword == "USER"]
    assert users, "no USER before ENTRYPOINT in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_dockerfile_default_command_and_stop_signal() -> None:
    instructions = dict(_dockerfile_instructions())
    assert json.loads(instructions["CMD"]) == [
        "run",
        "--config",
        "/etc/cache-worker/config.toml",
        "--log-format",
        "json",
    ]
    assert instructions["STOPSIGNAL"] == "SIGTERM"


def test_dockerfile_copies_only_what_exists_and_installs_it() -> None:
    copies = [rest for keyword, rest in _dockerfile_instructions() if keyword == "COPY"]
    sources = [
        part for rest in copies if not rest.startswith("--from") for part in rest.split()[:-1]
    ]
    assert {"pyproject.toml", "worker", "connectors"} <= set(sources)
    for source in sources:
        if source != "README.md":  # written by the lead; pyproject's readme needs it
            assert (ROOT / source).exists(), f"COPY source {source} missing from the repo"
    runs = " ".join(rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN")
    assert "pip install ." in runs


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".demo", ".services", ".pytest_cache"} <= ignored
    for needed in ("worker", "connectors", "pyproject.toml", "README.md"):
        assert needed not in ignored


# --- docker compose ---------------------------------------------------------------------------


def test_compose_has_the_three_services() -> None:
    assert {"mariadb", "redis", "worker"} <= set(_compose()["services"])


@pytest.mark.parametrize(
    "flag",
    [
        "--log-bin",
        "--binlog-format=ROW",
        "--binlog-row-image=FULL",
        "--binlog-row-metadata=FULL",
        "--server-id=1",
    ],
)
def test_compose_mariadb_writes_a_full_row_binlog(flag: str) -> None:
    mariadb = _compose()["services"]["mariadb"]
    assert mariadb["image"].startswith("mariadb:10.11")
    command = mariadb["command"]
    args = shlex.split(command) if isinstance(command, str) else list(command)
    assert any(arg == flag or arg.startswith(flag + "=") for arg in args), args


def test_compose_mariadb_is_initialised_and_health_checked() -> None:
    mariadb = _compose()["services"]["mariadb"]
    assert "MARIADB_ROOT_PASSWORD" in mariadb["environment"]
    assert "healthcheck" in mariadb
    mounts = [v for v in mariadb["volumes"] if isinstance(v, str)]
    init = [m for m in mounts if "/docker-entrypoint-initdb.d/" in m]
    assert init, mounts
    host_path = init[0].split(":")[0]
    assert (DEPLOY / host_path).resolve() == (DEPLOY / "init.sql").resolve()
    assert "healthcheck" in _compose()["services"]["redis"]


def test_compose_worker_waits_for_healthy_dependencies() -> None:
    worker = _compose()["services"]["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    depends = worker["depends_on"]
    for service in ("mariadb", "redis"):
        assert depends[service]["condition"] == "service_healthy"
    config_mount = [v for v in worker["volumes"] if v.endswith(":/etc/cache-worker/config.toml:ro")]
    assert config_mount == ["./config.docker.toml:/etc/cache-worker/config.toml:ro"]


def test_compose_worker_credentials_match_init_sql() -> None:
    env = _compose()["services"]["worker"]["environment"]
    assert env["CACHE_WORKER_SOURCE__DSN"] == "mysql://cache_worker@mariadb:3306/shop"
    assert env["CACHE_WORKER_REDIS__URL"] == "redis://redis:6379/0"
    sql = (DEPLOY / "init.sql").read_text()
    created = re.search(r"CREATE USER[^;]*'cache_worker'@'%' IDENTIFIED BY '([^']*)'", sql)
    assert created, "init.sql does not create cache_worker"
    assert env["CACHE_WORKER_SOURCE__PASSWORD"] == created.group(1)
    grants = " ".join(re.findall(r"GRANT ([^;]*) TO 'cache_worker'", sql))
    for privilege in ("REPLICATION SLAVE", "REPLICATION CLIENT", "SELECT"):
        assert privilege in grants
    assert re.search(r"CREATE TABLE[^;]*shop\.users", sql)


def test_compose_config_loads_with_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    env = _compose()["services"]["worker"]["environment"]
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = load_settings(DEPLOY / "config.docker.toml")
    assert settings.source.kind == "mysql"
    assert settings.source.dsn == env["CACHE_WORKER_SOURCE__DSN"]
    assert settings.source.resolved_password() == env["CACHE_WORKER_SOURCE__PASSWORD"]
    assert settings.redis.url == env["CACHE_WORKER_REDIS__URL"]
    [rule] = settings.rules
    assert (rule.name, rule.table, rule.keys) == ("user-profile", "shop.users", ["user:{id}"])
    assert (rule.action, rule.format) == ("refresh", "json")
