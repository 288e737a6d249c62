"""Where chunks are computed: in this process, a local process pool, or a Dask cluster.

Every executor implements :class:`~edcache.building.executors.base.Executor`; the build
coordinator (:mod:`edcache.building.coordinator`) does not know which one it drives. The Dask
executor lives with the rest of the Dask code, in :mod:`edcache.distributed.executor`.
"""

from .base import Executor
from .local import InlineExecutor, LocalPoolExecutor

__all__ = ["Executor", "InlineExecutor", "LocalPoolExecutor"]
