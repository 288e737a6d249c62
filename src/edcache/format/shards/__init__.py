"""The default on-disk format: a directory of immutable shards plus a small manifest.

Spec: ``docs/format.md``. Writer side: :mod:`.sink` (encoder in workers, commits in the
coordinator); reader side: :mod:`.reader`.
"""

from .reader import ShardCacheReader, is_shard_cache
from .sink import ShardEncoder, ShardSink, dataset_identity, prepare_cache_dir

__all__ = [
    "ShardCacheReader",
    "ShardEncoder",
    "ShardSink",
    "dataset_identity",
    "is_shard_cache",
    "prepare_cache_dir",
]
