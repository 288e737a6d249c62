"""edcache: compute a map-style dataset once, read it back fast.

The public API mirrors edflow's ``edflow.data.util.cached_dset``; switch by changing
the import.
"""

from __future__ import annotations

from typing import Any

from .cached import CachedDataset, cache
from .dataset import ConcatenatedDataset, DatasetMixin
from .decorator import PathCachedDataset, cachable
from .errors import EdcacheError

__version__ = "0.1.0"

# Names whose modules pull in optional or heavier pieces load on first use.
_LAZY = {
    "ExamplesFolder": "edcache.format.legacy",
    "make_server_manager": "edcache.compat",
    "make_client_manager": "edcache.compat",
    "pickle_and_queue": "edcache.compat",
    "convert": "edcache.convert",
    "CachedSubset": "edcache.subset",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edcache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "CachedDataset",
    "CachedSubset",
    "ConcatenatedDataset",
    "DatasetMixin",
    "EdcacheError",
    "ExamplesFolder",
    "PathCachedDataset",
    "cachable",
    "cache",
    "convert",
    "make_client_manager",
    "make_server_manager",
    "pickle_and_queue",
]
