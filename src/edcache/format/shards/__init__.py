"""Format v1 (read-only): a directory of immutable shards plus a small manifest.

Caches of edcache's first format still open through :class:`ShardCacheReader`;
``edcache convert OLD NEW`` rewrites one as format v2. Nothing writes this format any
more. The safe example codec (:mod:`.codec`) is shared with format v2.
"""

from .reader import ShardCacheReader, is_shard_cache

__all__ = ["ShardCacheReader", "is_shard_cache"]
