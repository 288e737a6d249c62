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
    # compressed variants (the ``images`` shape)
    "edcache-zstd": "codec_stores:EdcacheZstd",
    "edcache-png": "codec_stores:EdcachePng",
    "edcache-jpeg90": "codec_stores:EdcacheJpeg",
    "mds-zstd": "codec_stores:MDSZstd",
    "mds-png": "codec_stores:MDSPng",
    "mds-jpeg90": "codec_stores:MDSJpeg",
    "litdata-zstd": "codec_stores:LitdataZstd",
    "litdata-jpeg90": "codec_stores:LitdataJpeg",
    "hf-png": "codec_stores:HFPng",
    "hf-jpeg90": "codec_stores:HFJpeg",
}
#: what ``--codecs`` adds to the stores
CODEC_STORES = [k for k in STORES if "-" in k]


def get_store_class(name: str):
    mod, cls = STORES[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
