"""One small module per store; ``STORES`` maps the registry key to the class path."""

from __future__ import annotations

import importlib

STORES = {
    "memory": "memory_store:MemoryStore",
    "edcache": "edcache_store:EdcacheStore",
    "lmdb": "lmdb_store:LmdbStore",
    "zip": "zip_store:ZipStore",
    "folder": "folder_store:FolderStore",
    "hf": "hf_store:HFStore",
    "mds": "mds_store:MDSStore",
    "litdata": "litdata_store:LitdataStore",
}


def get_store_class(name: str):
    mod, cls = STORES[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
