"""The packed layout: a finished cache whose chunks share one all-column schema is one
file, ``packed.shard`` (see ``docs/format.md``)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from edcache import CachedDataset
from edcache.format.shards import pack as pack_module
from edcache.format.shards.reader import ShardCacheReader
from edcache.verify import verify_cache

from core_datasets import Flat, flat_expected
from helpers import assert_same, tree_bytes


def _files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_packed_cache_reads_back_every_field(tmp_path):
    ds = CachedDataset(Flat(tmp_path, n=300), chunk_size=16, num_workers=2, progress=False)
    assert _files(ds._path) == ["labels/0.npy", "manifest.json", "packed.shard"]
    for i in range(300):
        assert_same(ds[i], flat_expected(i))
        assert type(ds[i]["cls"]) is int and type(ds[i]["score"]) is np.float32
    assert ds[-1]["index_"] == 299
    assert list(ds.labels["cls"]) == [i % 7 for i in range(300)]
    report = verify_cache(ds._path, deep=True)
    assert report.ok and report.shards_checked == 1, str(report)
    reopened = CachedDataset.from_cache(str(tmp_path), "flat", verify=True)
    assert_same(reopened[123], flat_expected(123))


def test_packed_get_batch_and_getitems(tmp_path):
    ds = CachedDataset(Flat(tmp_path, n=200), chunk_size=16, num_workers=0, progress=False)
    idx = [199, 3, 3, 150, 0]
    batch = ds.get_batch(idx)
    assert batch["image"].shape == (5, 3, 4) and batch["image"].flags.writeable
    assert batch["image"][:, 0, 0].tolist() == [i % 251 for i in idx]
    assert batch["cls"].tolist() == [i % 7 for i in idx]
    assert batch["score"].dtype == np.float32
    assert batch["name"] == [flat_expected(i)["name"] for i in idx]
    assert batch["raw"] == [flat_expected(i)["raw"] for i in idx]
    assert batch["none"] == [None] * 5
    assert batch["index_"].tolist() == idx
    assert ds.get_batch(np.array([-1, -200]))["index_"].tolist() == [199, 0]
    with pytest.raises(IndexError, match="200"):
        ds.get_batch([1, 200])
    for got, i in zip(ds.__getitems__(idx), idx):
        assert_same(got, flat_expected(i))


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_cache_is_byte_identical(tmp_path, workers):
    ref = CachedDataset(Flat(tmp_path / "a", n=100), chunk_size=8, num_workers=0, progress=False)
    other = CachedDataset(Flat(tmp_path / "b", n=100), chunk_size=8, num_workers=workers, progress=False)
    assert tree_bytes(ref._path) == tree_bytes(other._path)


def test_mixed_schemas_keep_the_chunk_shards(tmp_path):
    ds = CachedDataset(Flat(tmp_path, n=64, odd_at=40), chunk_size=16, num_workers=0, progress=False)
    files = _files(ds._path)
    assert "packed.shard" not in files and "shards.idx" in files
    assert sum(f.startswith("shards/") for f in files) == 4
    assert ds[40]["extra"] == 1 and "extra" not in ds[41]
    assert verify_cache(ds._path).ok


def test_no_space_for_packing_keeps_the_chunk_shards(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pack_module.os, "pwrite", full)
    ds = CachedDataset(Flat(tmp_path, n=48), chunk_size=16, num_workers=0, progress=False)
    files = _files(ds._path)
    assert "shards.idx" in files and not any(f.startswith(".tmp-") or "packed" in f for f in files)
    for i in range(48):
        assert_same(ds[i], flat_expected(i))
    assert verify_cache(ds._path).ok


def test_forced_rerun_over_a_packed_cache_computes_nothing(tmp_path):
    ref = CachedDataset(Flat(tmp_path, n=64), chunk_size=16, num_workers=0, progress=False)
    before = tree_bytes(ref._path)
    log = tmp_path / "log"
    log.mkdir()
    CachedDataset(Flat(tmp_path, n=64, log_dir=str(log)), chunk_size=16, num_workers=0, progress=False,
                  force_cache=True)
    assert os.listdir(log) == [] and tree_bytes(ref._path) == before
    CachedDataset(Flat(tmp_path, n=64, log_dir=str(log)), chunk_size=16, num_workers=0, progress=False,
                  force_cache=True, keep_existing=False)
    assert len(os.listdir(log)) == 64 and tree_bytes(ref._path) == before


@pytest.mark.parametrize("where", [40, -30], ids=["column data", "footer"])
def test_damaged_chunk_is_caught_while_packing_and_rebuilt(tmp_path, where):
    """A chunk shard damaged between its commit and packing is not packed: it is deleted
    and the next run computes that chunk again."""
    from edcache.errors import CorruptCacheError
    from edcache.format.shards import sink as sink_module

    original = sink_module.ShardSink._pack

    def damage_then_pack(self):
        path = os.path.join(self.cache_dir, "shards", "00000001.shard")
        with open(path, "r+b") as f:
            f.seek(where, os.SEEK_SET if where >= 0 else os.SEEK_END)
            at = f.tell()
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
        return original(self)

    sink_module.ShardSink._pack = damage_then_pack
    try:
        with pytest.raises(CorruptCacheError, match="examples 16..31"):
            CachedDataset(Flat(tmp_path, n=48), chunk_size=16, num_workers=0, progress=False)
    finally:
        sink_module.ShardSink._pack = original
    log = tmp_path / "log"
    log.mkdir()
    ds = CachedDataset(Flat(tmp_path, n=48, log_dir=str(log)), chunk_size=16, num_workers=0, progress=False)
    assert sorted(int(n.split("-")[0]) for n in os.listdir(log)) == list(range(16, 32))
    assert "packed.shard" in os.listdir(ds._path)
    for i in range(48):
        assert_same(ds[i], flat_expected(i))


def test_reader_opened_during_the_build_switches_to_the_packed_file(tmp_path):
    from edcache.format.shards import prepare_cache_dir
    from edcache.format.shards.sink import ShardEncoder  # noqa: F401  (the sink makes it)
    from edcache.format.base import ChunkTask

    cache_dir = str(tmp_path / "c")
    sink = prepare_cache_dir(cache_dir, length=32, chunk_size=16, dataset="Flat", in_memory_keys=["cls"],
                             allow_pickle=False, keep_existing=True)
    ds = Flat(tmp_path, n=32)
    encoder = sink.encoder(staged=False)
    sink.commit(encoder.encode(ChunkTask(0, 0, 16), [ds.get_example(i) for i in range(16)]))
    reader = ShardCacheReader(cache_dir)
    early = reader.read(3)
    sink.commit(encoder.encode(ChunkTask(1, 16, 32), [ds.get_example(i) for i in range(16, 32)]))
    sink.finalize()
    sink.close()
    assert not os.path.exists(os.path.join(cache_dir, "shards"))
    assert int(early["image"][0, 0]) == 3  # still valid: its map outlives the unlinked file
    assert reader.read(20)["name"] == flat_expected(20)["name"]
    assert reader.read_batch(np.array([30, 1]))["cls"].tolist() == [30 % 7, 1]
    assert [e["cls"] for e in reader.read_many([31, 0])] == [31 % 7, 0]


class _Plain:
    """A map-style dataset that is not a DatasetMixin: its examples have no index_."""

    def __init__(self, root, n=40):
        self.root, self.name, self.n = str(root), "plain", n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"a": i * 2, "s": str(i)}


def test_index_is_set_in_place_of_the_stored_one_with_key_order_kept(tmp_path):
    ds = CachedDataset(Flat(tmp_path, n=40), chunk_size=8, num_workers=0, progress=False)
    for i in (0, 17, 39, -1):
        j = i % 40
        got, want = ds[i], flat_expected(j)
        assert list(got) == list(want) and got["index_"] == j
        assert_same(got, want)
    ds.append_labels = True
    assert ds[5]["labels_"] == {"cls": 5} and ds[5]["index_"] == 5
    plain = CachedDataset(_Plain(tmp_path), chunk_size=8, num_workers=0, progress=False)
    assert "packed.shard" in os.listdir(plain._path)
    assert plain[7] == {"a": 14, "s": "7", "index_": 7} and list(plain[7]) == ["a", "s", "index_"]
    assert "index_" not in plain.store.read(7)
