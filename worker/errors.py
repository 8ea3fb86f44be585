"""The one exception tree of cache-worker, and the process exit code each branch maps to.

Adapters in ``connectors/`` translate driver exceptions into these classes at the boundary, so the
core and the CLI never see a pymysql, psycopg or redis exception::

    CacheWorkerError                      exit 1 unless a subclass says otherwise
    ├── ConfigError                       exit 3: the config file or environment is invalid
    ├── SourceError                       exit 4
    │   ├── SourceUnavailable             retryable: the database is unreachable or went away
    │   ├── PositionLost                  exit 5, fatal: binlog purged or replication slot gone
    │   ├── SchemaError                   exit 6: a rule names a table or column the source lacks
    │   └── SourceMisconfigured           exit 6: binlog format, row image or privileges are wrong
    ├── RuleError                         exit 1: a rule failed on one change (dead-letter material)
    ├── SinkError                         exit 4
    │   ├── SinkUnavailable               retryable: Redis is unreachable or went away
    │   └── PartialApplyError             some actions of a batch were refused, the rest applied
    └── CheckpointError                   exit 4: the checkpoint could not be read or written

Messages never contain passwords: callers pass redacted DSNs/URLs (see ``worker.redact``).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from worker.actions import CacheAction


class ExitCode(IntEnum):
    """Documented process exit codes (README, "Exit codes")."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    UNAVAILABLE = 4
    POSITION_LOST = 5
    PRECONDITION = 6
    CHECK_FAILED = 7
    INTERRUPTED = 130


class CacheWorkerError(Exception):
    """Base of every error cache-worker raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL
    retryable: bool = False


class ConfigError(CacheWorkerError):
    """The configuration is invalid; the message names the field and what is wrong."""

    exit_code = ExitCode.CONFIG


class SourceError(CacheWorkerError):
    """Something went wrong reading the database's change log."""

    exit_code = ExitCode.UNAVAILABLE


class SourceUnavailable(SourceError):
    """The database cannot be reached right now; retried with backoff."""

    retryable = True


class PositionLost(SourceError):
    """The checkpointed position no longer exists on the server (purged binlog, dropped slot)."""

    exit_code = ExitCode.POSITION_LOST


class SchemaError(SourceError):
    """A rule names a table or column that the source does not have."""

    exit_code = ExitCode.PRECONDITION


class SourceMisconfigured(SourceError):
    """The server's replication settings or the user's privileges do not allow streaming."""

    exit_code = ExitCode.PRECONDITION


class RuleError(CacheWorkerError):
    """A rule could not turn a change into cache actions."""


class SinkError(CacheWorkerError):
    """Redis refused or failed a write."""

    exit_code = ExitCode.UNAVAILABLE


class SinkUnavailable(SinkError):
    """Redis cannot be reached right now; retried with backoff."""

    retryable = True


class CheckpointError(CacheWorkerError):
    """The checkpoint could not be loaded or saved."""

    exit_code = ExitCode.UNAVAILABLE


class PartialApplyError(SinkError):
    """Redis refused some actions of a batch for good (NOPERM, OOM, a value it rejects).

    The sink's pipeline is not transactional: every action not listed in ``failed`` was applied.
    ``failed`` pairs each refused action (the very object the sink was given) with its redacted
    error text; the run loop retries those alone and dead-letters what keeps failing.
    """

    def __init__(self, message: str, failed: Sequence[tuple[CacheAction, str]]) -> None:
        super().__init__(message)
        self.failed: list[tuple[CacheAction, str]] = list(failed)
