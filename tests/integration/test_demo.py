"""``make demo`` runs end to end on each source: keys are refreshed and evicted, all is stopped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.harness import SOURCES
from tests.integration.worker_process import REPO


@pytest.mark.parametrize("source", SOURCES)
def test_demo_once_shows_refreshes_and_evictions(source: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.demo", "--source", source, "--once", "--pause", "0.7"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    redis_lines = [line for line in out.splitlines() if line.startswith("  redis  ")]
    assert any("user:1 " in line and "SET" in line and '"Ada"' in line for line in redis_lines)
    assert any("user:email:ada@example.com" in line and "DEL" in line for line in redis_lines)
    assert any("user:email:ada@lovelace.dev" in line and "SET" in line for line in redis_lines)
    assert any("user:2 " in line and "DEL" in line for line in redis_lines)
    assert any("user:1:orders" in line and "DEL" in line for line in redis_lines)
    assert any("user:2:orders" in line and "DEL" in line for line in redis_lines)
    assert "ttl=" in out
    database = "MariaDB" if source == "mysql" else "PostgreSQL"
    assert f"stopped the worker, {database} and Redis." in out
    # Everything it started is gone: no server is left behind under .demo/.
    leftover = subprocess.run(["pgrep", "-f", str(REPO / ".demo")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
