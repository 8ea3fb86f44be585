"""Stop signals: SIGTERM and SIGINT turned into a graceful stop request, a second one into an
immediate exit, without doing any work inside a signal handler.

A Python signal handler runs on the main thread between two bytecodes, wherever that thread
happens to be, including inside a log call that holds structlog's (non-reentrant) write lock. A
handler that logs then waits for a lock its own thread holds: the worker hung for good on
SIGTERM, about one signal in three while its main thread logged in a loop (as it does while
retrying an unreachable Redis), and only SIGKILL ended it. So the handler here does nothing;
``signal.set_wakeup_fd`` has the interpreter write the signal's number to a pipe, and a watcher
thread, an ordinary thread that may wait for any lock, logs and acts on it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any

import structlog

log = structlog.get_logger("cache_worker.signals")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
# How long a forced exit may spend logging: the main thread may hold the log's lock while it
# is stuck writing to a full pipe, and "now" must not wait for it.
FORCED_EXIT_LOG_S = 1.0


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Installed so the signal neither kills the process nor raises KeyboardInterrupt; the
    wakeup fd has already recorded it."""


def _log_stopping(name: str) -> None:
    log.info("stopping", signal=name, hint="finishing the current batch; signal again to force")


class StopSignals:
    """While installed (a context manager on the main thread), the first stop signal logs
    ``stopping`` and calls ``request_stop``; the next one logs ``forced_exit`` and leaves the
    process with ``force_exit_code`` at once, the checkpoint trailing whatever was applied."""

    def __init__(
        self,
        request_stop: Callable[[], None],
        force_exit_code: int,
        signals: Sequence[signal.Signals] = STOP_SIGNALS,
    ) -> None:
        self._request_stop = request_stop
        self._force_exit_code = force_exit_code
        self._signals = tuple(signals)
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._received = 0

    def install(self) -> None:
        read_fd, write_fd = os.pipe()
        # The interpreter writes with a non-blocking call and drops the byte if the pipe is
        # full; a stop signal is never lost that way, as one byte already waits unread.
        os.set_blocking(write_fd, False)
        try:
            # Only the main thread may do this (ValueError elsewhere), so it goes first.
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        self._pipe = (read_fd, write_fd)
        self._thread = threading.Thread(
            target=self._watch, args=(read_fd,), name="stop-signals", daemon=True
        )
        self._thread.start()
        for signum in self._signals:
            self._previous_handlers[signum] = signal.signal(signum, _ignore)

    def uninstall(self) -> None:
        """Restore the previous handlers and end the watcher thread."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        read_fd, write_fd = self._pipe
        self._pipe = None
        os.close(write_fd)  # the watcher reads end-of-file and returns
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        os.close(read_fd)

    def _watch(self, read_fd: int) -> None:
        numbers = {int(s) for s in self._signals}
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for number in data:
                if number in numbers:
                    self._handle(signal.Signals(number).name)

    def _handle(self, name: str) -> None:
        self._received += 1
        if self._received == 1:
            self._request_stop()
            # Logged aside: should the log be stuck (its lock held by a thread blocked on a full
            # stdout pipe), this thread must still be reading when the forcing signal comes.
            threading.Thread(target=_log_stopping, args=(name,), daemon=True).start()
            return
        # rq's cold shutdown: a second signal means "now", checkpoint or not; the checkpoint
        # only ever trails Redis, so nothing is lost by leaving here.
        backstop = threading.Timer(FORCED_EXIT_LOG_S, os._exit, args=(self._force_exit_code,))
        backstop.daemon = True
        backstop.start()
        log.warning("forced_exit", signal=name)
        os._exit(self._force_exit_code)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()
