"""Integration-test plumbing: the ``integration`` marker and the per-source ``source`` fixture.

Every test under tests/integration is marked ``integration`` here, so ``-m "not integration"``
works and a new test cannot forget the marker. ``source`` parametrizes a test over the three
sources, each time with a fresh database (``tests/integration/harness.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import SOURCES, SourceHarness

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's, so filter by path.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceHarness]:
    """A fresh database on each source's server in turn (mysql, postgres-notify, -logical)."""
    kind = request.param
    server = request.getfixturevalue("mariadb" if kind == "mysql" else "postgres")
    # An earlier test may have stopped a local server and failed before starting it again.
    if server.is_local:
        server.start()
    harness = SourceHarness(kind, server, tmp_path).create()
    try:
        yield harness
    finally:
        if server.is_local:
            server.start()
        harness.drop()
