"""Retrying retryable failures (``SourceUnavailable``, ``SinkUnavailable``) with backoff and jitter.

Built on tenacity: exponential backoff with full jitter, capped, every retry logged as a
structured warning. A retry loop gives up only when its ``should_stop`` callback says so (the
worker is shutting down and its grace period is over) or when the error is not retryable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from worker.errors import CacheWorkerError

T = TypeVar("T")
log = structlog.get_logger("cache_worker.retry")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, CacheWorkerError) and exc.retryable


class _StopWhen(stop_base):
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._should_stop()


def retry_call(
    what: str,
    fn: Callable[[], T],
    *,
    max_backoff_s: float = 30.0,
    initial_backoff_s: float = 0.05,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying retryable errors; re-raise anything else."""

    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "retrying",
            operation=what,
            attempt=state.attempt_number,
            error_class=type(exc).__name__ if exc else None,
            error=str(exc) if exc else None,
            backoff_s=round(state.upcoming_sleep, 3),
        )

    retrying = Retrying(
        retry=retry_if_exception(is_retryable),
        wait=wait_random_exponential(multiplier=initial_backoff_s, max=max_backoff_s),
        stop=_StopWhen(should_stop),
        before_sleep=_log_retry,
        sleep=sleep,
        reraise=True,
    )
    return retrying(fn)
