"""CachedDataset.subset: a filtered view with consistent labels, picklable and fast."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from edcache import CachedDataset, CachedSubset

from core_datasets import Flat, Toy, expected, flat_expected
from helpers import assert_same


def _stored(want, i):
    """What the view returns at position ``i``: the stored example, index_ = i."""
    return {**want, "index_": i}


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    return CachedDataset(Flat(root, n=120), chunk_size=16, num_workers=0, progress=False)


def test_subset_by_mask_keeps_labels_consistent(flat):
    mask = flat.labels["cls"] == 3
    view = flat.subset(mask)
    assert isinstance(view, CachedSubset)
    want = [i for i in range(120) if i % 7 == 3]
    assert len(view) == len(want) and view.indices.tolist() == want
    assert view.labels["cls"].tolist() == [3] * len(want)
    for k, i in enumerate(want):
        assert_same(view[k], _stored(flat_expected(i), k))
    assert view[-1]["image"][0, 0] == want[-1] % 251
    view.append_labels = True
    assert view[2]["labels_"] == {"cls": 3} and view[2]["index_"] == 2


def test_filtering_reads_no_example(flat):
    ds = CachedDataset.from_cache(flat.root, "flat")
    mask = ds.labels["cls"] >= 5  # a memory-mapped column
    assert isinstance(ds.labels["cls"], np.memmap) and mask.sum() == sum(i % 7 >= 5 for i in range(120))
    view = ds.subset(mask)
    assert len(view.labels["cls"]) == mask.sum()
    assert ds.store._views is not None  # labels are views of the mapped columns, no example was read


def test_subset_by_indices_batches_and_nesting(flat):
    view = flat.subset([5, -1, 40, 40])
    assert view.indices.tolist() == [5, 119, 40, 40]
    batch = view.get_batch([3, 0])
    assert batch["index_"].tolist() == [3, 0]
    assert batch["cls"].tolist() == [40 % 7, 5 % 7]
    assert batch["name"] == [flat_expected(40)["name"], flat_expected(5)["name"]]
    got = view.__getitems__([1, 2])
    assert [e["name"] for e in got] == [flat_expected(119)["name"], flat_expected(40)["name"]]
    inner = view.subset(np.array([True, False, True, False]))
    assert inner.indices.tolist() == [5, 40] and inner.labels["cls"].tolist() == [5, 5]
    assert view.subset([]).indices.tolist() == [] and len(flat.subset([])) == 0
    with pytest.raises(IndexError, match="120"):
        flat.subset([0, 120])
    with pytest.raises(IndexError, match="mask"):
        flat.subset(np.ones(5, dtype=bool))
    with pytest.raises(TypeError):
        flat.subset([0.5])
    with pytest.raises(IndexError):
        view[4]


def _collate_without_none(examples):
    from torch.utils.data import default_collate

    return default_collate([{k: v for k, v in e.items() if v is not None} for e in examples])


def test_subset_pickles_and_works_in_dataloader_workers(flat):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    view = flat.subset(np.arange(0, 120, 3))
    view.labels  # computed here: must not travel in the pickle
    clone = pickle.loads(pickle.dumps(view))
    assert clone._view_labels is None and clone.indices.tolist() == view.indices.tolist()
    assert_same(clone[7], view[7])
    seen = []
    for batch in DataLoader(view, batch_size=8, num_workers=2, shuffle=False,
                                collate_fn=_collate_without_none):
        seen += batch["index_"].tolist()
        assert isinstance(batch["image"], torch.Tensor)
        assert batch["cls"].tolist() == [(3 * k) % 7 for k in batch["index_"].tolist()]
    assert seen == list(range(40))


def test_subset_of_a_chunk_shard_cache_with_list_labels(tmp_path):
    ds = CachedDataset(Toy(tmp_path, n=40), chunk_size=8, num_workers=0, progress=False)
    view = ds.subset(ds.labels["split"] == "test")
    want = [i for i in range(40) if i % 4 == 0]
    assert view.indices.tolist() == want
    assert list(view.labels["split"]) == ["test"] * len(want)
    for k, i in enumerate(want):
        assert_same(view[k], _stored(expected(i), k))
