"""Marks every test under tests/integration with ``integration`` so ``-m "not integration"`` works.

The marker is applied here rather than in each module so a new integration test cannot forget it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's, so filter by path.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)
