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
