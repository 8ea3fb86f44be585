"""Running the real ``cache-worker`` CLI as a child process in integration tests.

``write_config`` writes a TOML config for a test's database and Redis; ``WorkerProcess`` starts
``cache-worker run`` (the console script's module), stops it with SIGTERM or kills it with
SIGKILL, and keeps its JSON log lines for assertions. ``wait_until`` polls a condition with a
bounded deadline, the only way these tests wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def wait_until(
    condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Return the first truthy value of ``condition()``; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)
        last = condition()
    return last


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def write_config(
    path: Path,
    *,
    name: str,
    source_dsn: str,
    redis_url: str,
    rules: Sequence[dict[str, Any]],
    source: dict[str, Any] | None = None,
    extra: str = "",
) -> Path:
    lines = [f"name = {toml_value(name)}", "", "[source]"]
    lines.append(f"dsn = {toml_value(source_dsn)}")
    for key, value in {"kind": "mysql", "heartbeat": "0.2s", **(source or {})}.items():
        lines.append(f"{key} = {toml_value(value)}")
    lines += [
        "",
        "[redis]",
        f"url = {toml_value(redis_url)}",
        "",
        "[log]",
        'progress_interval = "1s"',
        "",
    ]
    for rule in rules:
        lines.append("[[rules]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
        lines.append("")
    path.write_text("\n".join(lines) + extra)
    return path


class WorkerProcess:
    """One ``cache-worker run`` child process with its log captured to a file."""

    def __init__(self, config: Path, args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.config = config
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log_path = config.with_suffix(f".{int(time.time() * 1000)}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, sub: str = "run") -> list[str]:
        return [sys.executable, "-m", "worker.cli", sub, "--config", str(self.config)]

    def start(self) -> WorkerProcess:
        handle = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.command(), "--log-format", "json", *self.args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=self.env,
        )
        handle.close()
        return self

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until the worker logged ``streaming`` (it saved its start position and reads)."""
        wait_until(lambda: self.has_event("streaming") or self.exited(), timeout, what="streaming")
        assert not self.exited(), self.output()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for a clean exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def run_cli(
    config: Path, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short CLI command (check, run --until-idle, ...) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
        env={**os.environ, **(env or {})},
    )
