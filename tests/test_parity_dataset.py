"""edflow parity of DatasetMixin: ``+``/``*``, ``expand``, nested labels with ``append_labels``
(issue 11, items 1-3)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from edcache import CachedDataset, ConcatenatedDataset, DatasetMixin

from core_datasets import Toy


class Numbers(DatasetMixin):
    def __init__(self, values, tag):
        self.values = list(values)
        self.tag = tag
        self.labels = {"value": np.asarray(self.values), "tag": np.asarray([tag] * len(self.values))}

    def __len__(self):
        return len(self.values)

    def get_example(self, i):
        return {"value": self.values[i], "tag": self.tag}


def test_add_concatenates_examples_labels_and_numbers_index():
    a, b = Numbers([10, 11, 12], "a"), Numbers([20, 21], "b")
    c = a + b
    assert isinstance(c, ConcatenatedDataset)
    assert len(c) == 5
    assert [c[i]["value"] for i in range(5)] == [10, 11, 12, 20, 21]
    assert [c[i]["index_"] for i in range(5)] == [0, 1, 2, 3, 4]
    assert [c[i]["dataset_index_"] for i in range(5)] == [0, 0, 0, 1, 1]
    assert c[-1]["value"] == 21 and c[-1]["index_"] == 4
    assert [e["index_"] for e in c[1:4]] == [1, 2, 3]
    np.testing.assert_array_equal(c.labels["value"], [10, 11, 12, 20, 21])
    assert list(c.labels["tag"]) == ["a", "a", "a", "b", "b"]
    with pytest.raises(IndexError):
        c[5]
    with pytest.raises(TypeError):
        a + [1, 2]


def test_multiply_repeats_both_sides():
    a = Numbers([1, 2], "a")
    for d in (3 * a, a * 3):
        assert isinstance(d, ConcatenatedDataset)
        assert len(d) == 6
        assert [d[i]["value"] for i in range(6)] == [1, 2] * 3
        assert [d[i]["index_"] for i in range(6)] == list(range(6))
        np.testing.assert_array_equal(d.labels["value"], [1, 2, 1, 2, 1, 2])
    assert a * 1 is a  # edflow returns the dataset itself for n <= 1
    with pytest.raises(TypeError):
        a * 1.5


def test_cached_datasets_concatenate(tmp_path):
    a = CachedDataset(Toy(tmp_path, n=10, name="a"), num_workers=0, progress=False)
    b = CachedDataset(Toy(tmp_path, n=5, name="b"), num_workers=0, progress=False)
    c = a + 2 * b
    assert len(c) == 20
    assert c[12]["index_"] == 12 and c[12]["image"][0, 0, 0] == 2 and c[12]["dataset_index_"] == 1
    np.testing.assert_array_equal(
        c.labels["cls"], np.concatenate([a.labels["cls"], b.labels["cls"], b.labels["cls"]])
    )
    again = pickle.loads(pickle.dumps(c))  # DataLoader workers get it pickled
    assert again[19]["index_"] == 19 and again[19]["image"][0, 0, 0] == 4


class Late(DatasetMixin):
    def __len__(self):
        return 3

    def get_example(self, i):
        return {"x": lambda: i * 10, "nested": {"y": lambda: f"y{i}", "items": [lambda: i, 5]}, "plain": i}


def test_expand_calls_callables_on_access_nested_too():
    d = Late()
    assert callable(d[1]["x"])  # off by default, as in edflow
    d.expand = True
    ex = d[1]
    assert ex["x"] == 10
    assert ex["nested"]["y"] == "y1"
    assert ex["nested"]["items"] == [1, 5]
    assert ex["plain"] == 1 and ex["index_"] == 1
    assert [e["x"] for e in d[[0, 2]]] == [0, 20]
    assert [e["x"] for e in d[0:2]] == [0, 10]


def test_expand_on_a_cached_dataset(tmp_path):
    ds = CachedDataset(Toy(tmp_path, n=4), num_workers=0, progress=False)
    ds.expand = True  # nothing callable stored: examples unchanged, fast path skipped
    assert ds[2]["cls"] == 2 and ds[2]["index_"] == 2


class NestedLabels(DatasetMixin):
    def __init__(self):
        self.labels = {
            "pose": {"x": np.arange(4) * 1.5, "y": np.arange(4) * 2},
            "meta": {"inner": {"id": np.array(["a", "b", "c", "d"])}},
            "flat": [7, 8, 9, 10],
        }
        self.append_labels = True

    def __len__(self):
        return 4

    def get_example(self, i):
        return {"i": i}


def test_nested_labels_are_indexed_leaf_by_leaf():
    d = NestedLabels()
    ex = d[1]
    assert ex["labels_"] == {"pose": {"x": 1.5, "y": 2}, "meta": {"inner": {"id": "b"}}, "flat": 8}
    assert [e["labels_"]["pose"]["y"] for e in d[[3, 0]]] == [6, 0]
