"""Format version 2, the layout of every new cache: one file (or two) per column.

Spec: ``docs/format.md``. Worker side: :mod:`.chunk`; coordinator (the one writer):
:mod:`.writer` (and :mod:`.label_files`); preparing the directory for a build or a
resume: :mod:`.directory`; commit log: :mod:`.log`; manifest: :mod:`.manifest`; reading:
:mod:`.reader` and :mod:`.columns`; column kinds: :mod:`.schema`.
"""

from .directory import dataset_identity, prepare_cache_dir
from .reader import CacheRebuiltError, ColumnarReader, is_columnar_cache
from .writer import ColumnarEncoder, ColumnarSink

__all__ = [
    "CacheRebuiltError",
    "ColumnarEncoder",
    "ColumnarReader",
    "ColumnarSink",
    "dataset_identity",
    "is_columnar_cache",
    "prepare_cache_dir",
]
