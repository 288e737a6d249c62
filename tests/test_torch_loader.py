"""Plain PyTorch datasets cached with edcache and read through DataLoader workers
(fork and spawn): batches equal to those of the raw dataset (issue 12 items 1-4, 8)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

from torch.utils.data import DataLoader
from torch_datasets import (
    DictOfTensors,
    ListNoLocation,
    PilImages,
    TorchvisionStyle,
    assert_same,
    list_collate,
)

import edcache


def _cached(kind, tmp_path):
    if kind == "torchvision":
        raw = TorchvisionStyle()
        return raw, edcache.cache(raw, tmp_path / "tv", num_workers=0, chunk_size=16, progress=False)
    if kind == "pil":
        raw = PilImages(mode="RGB")
        return raw, edcache.CachedDataset(raw, path=tmp_path / "pil", num_workers=0, chunk_size=8,
                                          progress=False)
    if kind == "dict":
        raw = DictOfTensors(str(tmp_path))  # root/name: the edflow form, unchanged
        return raw, edcache.CachedDataset(raw, num_workers=0, chunk_size=8, progress=False)
    raw = ListNoLocation()
    return raw, edcache.cache(raw, str(tmp_path / "nolocation"), num_workers=0, chunk_size=8,
                              progress=False)


KINDS = ["torchvision", "pil", "dict", "nolocation"]


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_dataloader_batches_equal_the_raw_datasets(tmp_path, mode, capfd):
    for kind in KINDS:
        raw, cached = _cached(kind, tmp_path)
        if kind == "dict":
            assert cached.path == str(tmp_path / "cached" / "dict_of_tensors")
        got = DataLoader(cached, batch_size=8, num_workers=2, multiprocessing_context=mode,
                         collate_fn=list_collate)
        want = DataLoader(raw, batch_size=8, num_workers=0, collate_fn=list_collate)
        n = 0
        for a, b in zip(got, want, strict=True):
            for x, y in zip(a, b, strict=True):
                assert_same(x, y, kind)
                n += 1
        assert n == len(raw)
    # torchvision-style with the default collate: one stacked tensor, one label tensor
    raw, cached = _cached("torchvision", tmp_path)
    for (xa, ya), (xb, yb) in zip(DataLoader(cached, batch_size=8, num_workers=2, multiprocessing_context=mode),
                                  DataLoader(raw, batch_size=8), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    err = capfd.readouterr().err
    assert "Warning" not in err and "not writable" not in err, err


def test_reading_prints_no_warning(tmp_path):
    for kind in KINDS:
        _raw, cached = _cached(kind, tmp_path)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for i in range(len(cached)):
                cached[i]
            cached[[0, 1]]
            cached.__getitems__([2, 3])
            cached.get_batch([0, 1, 2])
            for _ in DataLoader(cached, batch_size=4, collate_fn=list_collate):
                pass
            if kind == "torchvision":
                for _ in DataLoader(cached, batch_size=4):
                    pass
        assert not seen, [str(w.message) for w in seen]


def test_tuple_examples_come_back_as_tuples_and_labels_name_positions(tmp_path):
    raw, cached = _cached("torchvision", tmp_path)
    x, y = cached[3]
    assert type(cached[3]) is tuple and isinstance(x, torch.Tensor) and y == 3 % 7
    assert list(cached.labels) == [1]
    assert cached.labels[1].tolist() == [i % 7 for i in range(len(raw))]
    view = cached.subset(cached.labels[1] == 2)
    assert [view[k][1] for k in range(len(view))] == [2] * len(view)
    batch = cached.get_batch([0, 5, 6])  # tuple examples: a tuple of columns
    assert type(batch) is tuple and len(batch) == 2
    assert isinstance(batch[0], torch.Tensor) and batch[0].shape == (3, 3, 8, 8)
    assert torch.equal(batch[0][1], raw[5][0]) and batch[1].tolist() == [0, 5, 6]
    reopened = edcache.CachedDataset.from_cache(path=tmp_path / "tv")
    assert_same(reopened[7], raw[7])
    assert reopened.labels[1][7] == 0


def test_dict_examples_get_index_and_stacked_tensor_batches(tmp_path):
    raw, cached = _cached("dict", tmp_path)
    ex = cached[4]
    assert ex["index_"] == 4
    assert_same(ex, raw[4])
    batch = cached.get_batch([1, 2, 3])
    assert batch["x"].dtype == torch.float16 and batch["x"].shape == (3, 4, 5)
    assert batch["y"].tolist() == [1, 2, 3] and batch["mask"].dtype == torch.bool
    assert [m["id"] for m in batch["meta"]] == ["item1", "item2", "item3"]
