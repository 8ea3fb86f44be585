"""Running the real ``cache-worker`` CLI for the benchmark: configs, processes, their log events.

``write_config`` writes a TOML config (file checkpoint, optionally preset to a position) for any
source kind; ``WorkerProcess`` starts ``cache-worker run`` with JSON logs to a file and, when it
exits, reaps it with ``os.wait4`` so its own peak RSS (``ru_maxrss``) comes back with the exit
code; ``run_until_idle`` turns one ``run --until-idle`` into a ``Result`` whose rate is rows from
the ``stopped`` event over the time from the source connecting (``source_streaming``, or
``outbox_consumer`` for postgres-notify) to ``burst_complete``, i.e. first to last Redis write
with the final checkpoint included (and, given the Redis server, Redis's CPU per row); ``cli``
runs short commands such as ``setup`` and ``teardown``. ``streaming_window`` is the pure part,
kept separate for the unit tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import redis_cpu
from bench.report import Result
from tests.services import RedisServer
from worker.checkpoint import encode_checkpoint
from worker.events import Position

CLI = str(Path(sys.executable).with_name("cache-worker"))
# The events that mark "the source is connected and reading": the first Redis write follows
# within one batch. The run loop's own "streaming" comes before the source connects.
BEGIN_EVENTS = ("source_streaming", "outbox_consumer")
_REAP_POLL_S = 0.02


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    # JSON numbers, strings and lists of them are valid TOML too.
    return json.dumps(value)


def write_config(
    directory: Path,
    name: str,
    source: dict[str, Any],
    redis_url: str,
    rules: Sequence[dict[str, Any]],
    checkpoint: Position | None = None,
    progress_interval: str = "1s",
) -> Path:
    """A config with a file checkpoint (preset to ``checkpoint`` if given); returns its path."""
    checkpoint_path = directory / f"{name}.checkpoint.json"
    checkpoint_path.unlink(missing_ok=True)
    if checkpoint is not None:
        checkpoint_path.write_text(encode_checkpoint(checkpoint))
    lines = [f"name = {_toml(name)}", "", "[source]"]
    lines += [f"{key} = {_toml(value)}" for key, value in source.items()]
    lines += [
        "",
        "[redis]",
        f"url = {_toml(redis_url)}",
        "",
        "[checkpoint]",
        'store = "file"',
        f"path = {_toml(str(checkpoint_path))}",
        "",
        "[log]",
        f"progress_interval = {_toml(progress_interval)}",
        "",
    ]
    for rule in rules:
        lines.append("[[rules]]")
        lines += [f"{key} = {_toml(value)}" for key, value in rule.items()]
        lines.append("")
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def read_events(log_path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a worker (other lines are skipped)."""
    events: list[dict[str, Any]] = []
    if not log_path.exists():
        return events
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _stamp(event: dict[str, Any]) -> float | None:
    text = event.get("timestamp")
    try:
        return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None
    except ValueError:
        return None


def streaming_window(events: list[dict[str, Any]]) -> tuple[int, float] | None:
    """(rows, seconds) from the source connecting to the last batch, if both are logged.

    The first ``BEGIN_EVENTS`` event starts the window (a reconnect logs another one later).
    It ends at ``burst_complete``, logged once the last batch is in Redis and checkpointed and
    the source said it is caught up, or else at the final ``stopped`` event, which comes after
    the source was closed too. Rows are the ``stopped`` event's: every row change applied.
    """
    begin = next((_stamp(e) for e in events if e.get("event") in BEGIN_EVENTS), None)
    stopped = [e for e in events if e.get("event") == "stopped"]
    if begin is None or not stopped:
        return None
    complete = [e for e in events if e.get("event") == "burst_complete"]
    end = _stamp(complete[-1] if complete else stopped[-1])
    if end is None or end <= begin:
        return None
    return int(stopped[-1].get("rows") or 0), end - begin


@dataclass(frozen=True, slots=True)
class Exited:
    """How a worker process ended."""

    code: int
    wall_seconds: float
    peak_rss_mb: float
    events: list[dict[str, Any]]

    def log_tail(self, log_path: Path, lines: int = 20) -> str:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class WorkerProcess:
    """One ``cache-worker run`` child with its JSON log in ``log_path``."""

    def __init__(self, config: Path, log_path: Path, args: Sequence[str] = ()) -> None:
        self.config = config
        self.log_path = log_path
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> WorkerProcess:
        command = [CLI, "run", "--log-format", "json", "--config", str(self.config), *self.args]
        with self.log_path.open("wb") as log_file:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log_path)

    def wait_for_event(self, names: Sequence[str], timeout: float) -> bool:
        """Until one of ``names`` is logged (True), the process exits or ``timeout`` (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") in names for e in self.events()):
                return True
            if self.proc is None or self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def wait(self, timeout: float) -> Exited:
        """Reap the process (SIGKILL after ``timeout``) and return its code and peak RSS."""
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        usage = None
        status = 0
        while True:
            # wait4, not Popen.wait: it returns this one child's resource usage, so ru_maxrss is
            # the worker's own peak, not the maximum over every child the benchmark ever ran.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() >= deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(_REAP_POLL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.started
        # Linux reports ru_maxrss in KiB.
        return Exited(proc.returncode, wall, usage.ru_maxrss / 1024, self.events())

    def stop(self, timeout: float = 20.0) -> Exited:
        """SIGTERM (the worker finishes its batch and checkpoints), then reap."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap, if still running (for ``finally`` blocks)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            self.wait(5.0)


def run_until_idle(
    label: str,
    kind: str,
    config: Path,
    log_path: Path,
    timeout: float,
    expected_rows: int,
    redis_server: RedisServer | None = None,
) -> Result:
    """``cache-worker run --until-idle`` to its exit, as a ``Result`` (see the module doc).

    With ``redis_server`` (the one the config writes to) the result also says how much of that
    server's CPU each row cost over the run.
    """
    cpu_before = redis_cpu.cpu_seconds(redis_server)
    worker = WorkerProcess(config, log_path, ["--until-idle"]).start()
    try:
        exited = worker.wait(timeout)
    finally:
        worker.kill()
    if exited.code != 0:
        # The log lives in a temporary directory removed on the way out: its tail goes into
        # the error itself.
        raise RuntimeError(
            f"{label}: cache-worker exited with {exited.code}; log tail:\n"
            f"{exited.log_tail(log_path)}"
        )
    window = streaming_window(exited.events)
    notes = f"wall {exited.wall_seconds:.2f}s incl. startup"
    if window is None:
        rows, seconds = 0, exited.wall_seconds
        notes += "; no streaming events: rate over wall time"
    else:
        rows, seconds = window
    if rows != expected_rows:
        notes += f"; expected {expected_rows} rows"
    cpu_after = redis_cpu.cpu_seconds(redis_server)
    return Result(
        label,
        rows,
        seconds,
        notes,
        kind=kind,
        wall_seconds=exited.wall_seconds,
        peak_rss_mb=exited.peak_rss_mb,
        redis_cpu_us_per_row=redis_cpu.per_row_us(cpu_before, cpu_after, rows),
    )


def cli(*args: str, configs: Sequence[Path], timeout: float = 120.0) -> None:
    """Run a short CLI command (``setup``, ``teardown``) for each config, side by side.

    Each run mostly waits for its interpreter to import, so running them at once saves that
    much of the benchmark's time; raises with the output of the first that failed.
    """
    procs = [
        subprocess.Popen(
            [CLI, *args, "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for config in configs
    ]
    failures: list[str] = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"exited with {proc.returncode}:\n{output[-2000:]}")
    if failures:
        raise RuntimeError(f"cache-worker {' '.join(args)} {failures[0]}")
