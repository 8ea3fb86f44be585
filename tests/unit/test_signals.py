"""Unit tests of ``worker.signals``: stop signals never run work inside a signal handler.

The signals are sent in a child process, so a regression hangs (and is killed with) the child,
not the test run. The child's log stream lets a signal arrive at the worst moment: while its
main thread is inside a log call, holding structlog's write lock.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from worker.signals import StopSignals

REPO = Path(__file__).resolve().parents[2]

# The child: logging configured as the CLI does, to a stream whose write() of the "trigger"
# event signals the process itself and then stays inside the write (so inside the log lock).
CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import structlog
    from worker.logs import configure_logging
    from worker.signals import StopSignals

    mode, log_path = sys.argv[1], sys.argv[2]
    stopped = threading.Event()

    class Stream:
        def __init__(self, path):
            self.file = open(path, "w")
        def isatty(self):
            return False
        def flush(self):
            self.file.flush()
        def write(self, text):
            if '"trigger"' in text:
                os.kill(os.getpid(), signal.SIGTERM)
                # Python bytecode: a Python signal handler runs here, with the lock held.
                stopped.wait(10.0)
                if mode == "twice":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(30.0)  # stuck for good, as on a full stdout pipe
            return self.file.write(text)

    configure_logging("info", "json", stream=Stream(log_path))
    with StopSignals(stopped.set, force_exit_code=130):
        structlog.get_logger("test").info("trigger")
        if not stopped.is_set():
            sys.exit(3)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if '"stopping"' in open(log_path).read():
                sys.exit(0)
            time.sleep(0.05)
    sys.exit(4)
    """
)


def _run_child(mode: str, tmp_path: Path) -> tuple[int, str]:
    log_path = tmp_path / "child.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(log_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=25)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the child hung after the signal:\n{out}") from None
    return proc.returncode, out + log_path.read_text()


def test_a_signal_during_a_log_call_requests_the_stop_and_logs_it(tmp_path: Path) -> None:
    # A handler that logged itself waited here for the lock its own thread held, for good.
    code, out = _run_child("once", tmp_path)
    assert code == 0, out
    assert '"signal": "SIGTERM"' in out


def test_a_second_signal_exits_at_once_even_while_the_log_is_stuck(tmp_path: Path) -> None:
    code, out = _run_child("twice", tmp_path)
    assert code == 130, out


def test_uninstall_restores_the_handlers_and_the_wakeup_fd() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signals = StopSignals(lambda: None, force_exit_code=130)
    with signals:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        wakeup = signal.set_wakeup_fd(-1)
        assert wakeup != -1
        signal.set_wakeup_fd(wakeup)
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1
