"""Unit tests of ``worker.logs``: library warnings become structured, scrubbed events."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from connectors.postgres_common import _quiet_repeated_close_errors
from worker.logs import LibraryLogHandler, SecretScrubber, configure_logging


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield stream
    for handler in [h for h in root.handlers if isinstance(h, LibraryLogHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def _events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_library_warning_is_a_json_event_with_its_text_scrubbed(out: io.StringIO) -> None:
    configure_logging("info", "json", out, SecretScrubber(["hunter2"]))
    logging.getLogger("redis.connection").warning("lost %s with password %s", "db", "hunter2")
    logging.getLogger("psycopg").info("pipeline step")  # library internals stay out
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        logging.getLogger("pymysqlreplication").exception("reading failed")
    events = _events(out)
    assert [(e["event"], e["level"], e["logger"]) for e in events] == [
        ("library_log", "warning", "redis.connection"),
        ("library_log", "error", "pymysqlreplication"),
    ]
    assert events[0]["message"] == "lost db with password ***"
    assert (events[1]["error_class"], events[1]["error"]) == ("ConnectionError", "refused")


def test_configuring_twice_keeps_one_handler_and_the_level_follows(out: io.StringIO) -> None:
    configure_logging("info", "json", out)
    configure_logging("error", "json", out)
    root = logging.getLogger()
    assert sum(isinstance(h, LibraryLogHandler) for h in root.handlers) == 1
    logging.getLogger("psycopg").warning("below the configured level")
    logging.getLogger("psycopg").error("at it")
    assert [e["message"] for e in _events(out)] == ["at it"]


def test_psycopgs_repeat_of_an_error_its_block_raised_is_dropped(out: io.StringIO) -> None:
    configure_logging("info", "json", out)
    _quiet_repeated_close_errors()
    _quiet_repeated_close_errors()  # idempotent: one filter
    psycopg_log = logging.getLogger("psycopg")
    try:
        psycopg_log.warning("error ignored terminating %r: %s", "<Pipeline [BAD]>", "lost")
        psycopg_log.warning("some other trouble")
        assert len(psycopg_log.filters) == 1
    finally:
        psycopg_log.filters.clear()
    assert [e["message"] for e in _events(out)] == ["some other trouble"]
