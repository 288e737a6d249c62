"""Shared pytest setup: make ``src/`` importable when edcache is not installed."""

from __future__ import annotations

import os
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(TESTS_DIR), "src")

try:  # an installed edcache (pip install -e .) wins
    import edcache  # noqa: F401
except ImportError:
    sys.path.insert(0, SRC_DIR)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` run only when asked for (``-m long``)."""
    if "long" in (config.getoption("markexpr", "") or ""):
        return
    import pytest

    skip = pytest.mark.skip(reason="long variant: run with -m long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
