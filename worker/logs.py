"""Structured logging: structlog configured once by the CLI, JSON lines or console output.

JSON lines when stdout is not a terminal (or ``format = "json"``), structlog's console renderer on
a terminal. A last-resort processor replaces any registered secret that slipped into an event
field with ``***``, so a password cannot reach a log line even through an exception message.
Warnings that libraries log through the standard ``logging`` module (psycopg, redis,
mysql-replication) become ``library_log`` events in the same stream and format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class SecretScrubber:
    """A structlog processor that masks known secret strings in every string field."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str | None]) -> None:
        for secret in secrets:
            # Very short secrets would mask ordinary words; they are weak anyway.
            if secret and len(secret) >= 3 and secret not in self._secrets:
                self._secrets.append(secret)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event_dict
        for key, value in event_dict.items():
            event_dict[key] = self._clean(value)
        return event_dict


class LibraryLogHandler(logging.Handler):
    """Hands standard-library log records to structlog as ``library_log`` events.

    Without it a library's warning went to stderr as bare text through logging's last resort:
    another stream, no fields, no secret scrubbing. The library's own text is a field.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error_class"] = type(exc).__name__
                fields["error"] = str(exc)
            structlog.get_logger("library").log(record.levelno, "library_log", **fields)
        except Exception:
            self.handleError(record)


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    scrubber: SecretScrubber | None = None,
) -> SecretScrubber:
    """Configure structlog for the process; returns the scrubber so secrets can be added later."""
    out = stream if stream is not None else sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    scrubber = scrubber or SecretScrubber()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrubber,
    ]
    if use_json:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=out.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, LibraryLogHandler)]:
        root.removeHandler(handler)
    root.addHandler(LibraryLogHandler())
    # Libraries' info and debug records are their internals (psycopg logs every pipeline step).
    root.setLevel(max(logging.WARNING, _LEVELS[level]))
    return scrubber
