"""Bad input matrix (issue 6, suite 4): each bad input gives one exact, clear message, and
work already committed is kept (a corrected dataset resumes without recomputing it).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from edcache import CachedDataset
from edcache.errors import (
    CacheMismatchError,
    CodecError,
    DatasetInterfaceError,
    ExampleError,
    LabelError,
)
from reliability_datasets import committed_count

from reliability_datasets import (
    BadDataset,
    Calibration,
    MixedDataset,
    OtherDataset,
    RaggedDataset,
    SlowDataset,
    assert_example_equal,
    computations,
)

CHUNK = 8
LENGTH = 40


def build(ds, workers=0, **kw):
    return CachedDataset(ds, chunk_size=CHUNK, num_workers=workers, progress=False, **kw)


def committed(cache_dir: str) -> set[int]:
    return set(range(committed_count(cache_dir) or 0))


# -- the dataset interface -------------------------------------------------------------
class _Base:
    root = "/nonexistent"
    name = "x"

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"a": i}


class NoRoot:
    name = "x"

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"a": i}


class NoName:
    root = "/nonexistent"

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"a": i}


class NoLen:
    root, name = "/nonexistent", "x"

    def __getitem__(self, i):
        return {"a": i}


class NoItems:
    root, name = "/nonexistent", "x"

    def __len__(self):
        return 3


class FloatLen(_Base):
    def __len__(self):
        return 3.0


class NegativeLen(_Base):
    def __len__(self):
        return -1


class BoolLen(_Base):
    def __len__(self):
        return True


class SlashName(_Base):
    name = "faces/256"


class IntRoot(_Base):
    root = 5


class StrKeys(_Base):
    in_memory_keys = "label"


NEEDS = ("A dataset to cache needs root (folder to cache into), name (unique name), __len__ and "
         "__getitem__ (or get_example); in_memory_keys is optional.")


@pytest.mark.parametrize("cls,message", [
    (NoRoot, f"NoRoot cannot be cached: it has no root. {NEEDS}"),
    (NoName, f"NoName cannot be cached: it has no name. {NEEDS}"),
    (NoLen, f"NoLen cannot be cached: it has no __len__. {NEEDS}"),
    (NoItems, f"NoItems cannot be cached: it has no __getitem__. {NEEDS}"),
    (FloatLen, "FloatLen.__len__ returned 3.0; it must be a non-negative int"),
    (NegativeLen, "NegativeLen.__len__ returned -1; it must be a non-negative int"),
    (BoolLen, "BoolLen.__len__ returned True; it must be a non-negative int"),
    (SlashName, "SlashName.name must be a non-empty string without '/', not 'faces/256'"),
    (IntRoot, "IntRoot.root must be a path, not 5"),
    (StrKeys, "StrKeys.in_memory_keys must be a list of str, not 'label'"),
])
def test_dataset_interface_errors(cls, message, tmp_path):
    with pytest.raises(DatasetInterfaceError) as err:
        build(cls())
    assert str(err.value) == message
    assert not os.path.exists("/nonexistent")  # nothing was created


@pytest.mark.parametrize("chunk_size", [0, -8, 2.5, True])
def test_bad_chunk_size(tmp_path, chunk_size):
    with pytest.raises(DatasetInterfaceError) as err:
        CachedDataset(SlowDataset(str(tmp_path), "c", 10), chunk_size=chunk_size, num_workers=0)
    assert str(err.value) == f"chunk_size must be a positive int, got {chunk_size!r}"
    assert not os.path.exists(tmp_path / "cached")


# -- errors while building: message, and committed work kept ---------------------------
def _fail_then_resume(tmp_path, mode, at, workers, keys=None):
    """Build a dataset that fails at ``at``; return (error, cache dir, chunks committed)."""
    root = str(tmp_path)
    count = tmp_path / "count"
    count.mkdir(exist_ok=True)
    ds = BadDataset(root, "bad", LENGTH, mode, at, str(count), keys)
    with pytest.raises(Exception) as err:
        build(ds, workers)
    cache_dir = os.path.join(root, "cached", "bad")
    return err, cache_dir, committed(cache_dir)


def _resume_keeps(tmp_path, cache_dir, kept: set[int]) -> None:
    """A corrected dataset completes the cache without recomputing committed chunks."""
    count = tmp_path / "count2"
    count.mkdir()
    ds = BadDataset(str(tmp_path), "bad", LENGTH, None, 0, str(count))
    cached = build(ds)
    recomputed = {i // CHUNK for i in computations(str(count))}
    assert not recomputed & kept, f"committed chunks {sorted(recomputed & kept)} were recomputed"
    assert len(cached) == LENGTH and cached.complete


@pytest.mark.parametrize("workers", [0, 2])
def test_getitem_raising_names_index_keeps_traceback_and_work(tmp_path, workers):
    err, cache_dir, kept = _fail_then_resume(tmp_path, "raise", 21, workers)
    assert err.type is ExampleError
    e = err.value
    assert e.index == 21
    assert e.message == "the dataset raised KeyError for index 21: 'no such file: img_21.jpg'"
    assert 'raise KeyError(f"no such file: img_{i}.jpg")' in e.remote_traceback
    assert "reliability_datasets.py" in e.remote_traceback
    assert str(e).startswith(e.message + "\n\nTraceback in the worker:\n")
    if workers == 0:
        assert kept == {0, 1}  # the chunks before the failing one, in order
    assert 21 // CHUNK not in kept
    _resume_keeps(tmp_path, cache_dir, kept)


def test_get_example_returning_non_dict(tmp_path):
    err, cache_dir, kept = _fail_then_resume(tmp_path, "nondict", 12, 0)
    assert err.type is ExampleError
    assert err.value.message == (
        "the dataset raised ValueError for index 12: The edflow version of DatasetMixin requires "
        "the `get_example` method to return a `dict`. Yours returned a <class 'list'>"
    )
    assert kept == {0}
    _resume_keeps(tmp_path, cache_dir, kept)


class PlainListDataset:
    """Not a DatasetMixin: ``__getitem__`` returns a list at index 12."""

    in_memory_keys: list = []

    def __init__(self, root):
        self.root, self.name = root, "plain"

    def __len__(self):
        return LENGTH

    def __getitem__(self, i):
        return [i] if i == 12 else {"i": i}


def test_getitem_returning_non_dict_plain(tmp_path):
    """Not an error in format v2 (tuple and list examples are stored as they are): the
    list at index 12 comes back as that list, the dicts as dicts with ``index_``."""
    ds = build(PlainListDataset(str(tmp_path)))
    assert ds.complete and committed(ds.path) == set(range(LENGTH // CHUNK))
    assert ds[12] == [12] and type(ds[12]) is list
    assert ds[11] == {"i": 11, "index_": 11} and ds[13] == {"i": 13, "index_": 13}


CODEC_MESSAGE = (
    "example 17, key 'meta/calib': cannot store value of type reliability_datasets.Calibration. "
    "The codec stores dicts, lists, tuples, str, bytes, int, float, bool, None, numpy arrays of "
    "numeric, bool, str or datetime dtype, numpy scalars, torch tensors and PIL images; "
    "convert the value, or pass "
    "allow_pickle=True to store it as a pickle (then also required to read the cache)."
)


@pytest.mark.parametrize("workers", [0, 2])
def test_unstorable_value_names_index_and_key_path(tmp_path, workers):
    err, cache_dir, kept = _fail_then_resume(tmp_path, "unstorable", 17, workers)
    assert err.type is CodecError
    assert str(err.value) == CODEC_MESSAGE
    assert 17 // CHUNK not in kept
    _resume_keeps(tmp_path, cache_dir, kept)


def test_example_missing_in_memory_key(tmp_path):
    err, cache_dir, kept = _fail_then_resume(tmp_path, "missing_key", 13, 0)
    assert err.type is LabelError
    assert str(err.value) == (
        "example 13 has no in_memory_key 'label' (it has ['image', 'feature', 'split', 'extra', "
        "'name', 'meta', 'index_'])"
    )
    assert kept == {0}
    _resume_keeps(tmp_path, cache_dir, kept)


def test_in_memory_values_of_inconsistent_type(tmp_path):
    """Found in the worker when one chunk mixes kinds (issue 16 item 15): that chunk is
    not committed, the chunks before it are kept, and the message says how to recover."""
    from edcache.format.shards.labels import LABEL_ADVICE

    err, cache_dir, kept = _fail_then_resume(tmp_path, "mixed_type", 25, 0)
    assert err.type is LabelError
    assert str(err.value) == (
        "in_memory_key 'label' has values of inconsistent types: number (index 24: 3) and "
        "str (index 25: 'seven'). " + LABEL_ADVICE
    )
    assert kept == {0, 1, 2}
    count = tmp_path / "count-again"
    count.mkdir()
    with pytest.raises(LabelError):
        build(BadDataset(str(tmp_path), "bad", LENGTH, "mixed_type", 25, str(count)))
    assert {i // CHUNK for i in computations(str(count))} == {3}


def test_in_memory_values_of_inconsistent_shape_become_a_list(tmp_path):
    """Ragged values are not an error: the column comes back as a list (issue 2, item 5)."""
    ds = BadDataset(str(tmp_path), "ragged", LENGTH, "mixed_shape", 25, keys=["image", "label"])
    cached = build(ds)
    images = cached.labels["image"]
    assert isinstance(images, list) and len(images) == LENGTH
    assert images[25].shape == (2, 4, 3) and images[24].shape == (4, 4, 3)
    assert isinstance(cached.labels["label"], np.ndarray)


# -- a cache that does not belong to this dataset ---------------------------------------
HINT = "Rebuild it with force_cache=True, keep_existing=False (CLI: --force --no-keep-existing)."


def test_length_changed_since_built(tmp_path):
    root = str(tmp_path)
    build(SlowDataset(root, "good", 20))
    path = os.path.join(root, "cached", "good")
    with pytest.raises(CacheMismatchError) as err:
        build(SlowDataset(root, "good", 21))
    assert str(err.value) == (
        f"the cache at {path} holds 20 examples, the dataset has 21: the dataset changed since "
        f"the cache was built. {HINT}"
    )
    assert CachedDataset.from_cache(root, "good").complete  # nothing was touched


def test_other_class_same_name(tmp_path):
    root = str(tmp_path)
    build(SlowDataset(root, "good", 20))
    path = os.path.join(root, "cached", "good")
    with pytest.raises(CacheMismatchError) as err:
        build(OtherDataset(root, "good", 20))
    assert str(err.value) == (
        f"the cache at {path} was built from reliability_datasets.SlowDataset, not "
        f"reliability_datasets.OtherDataset. {HINT}"
    )


@pytest.mark.parametrize("cls,length", [(SlowDataset, 41), (OtherDataset, 40)])
def test_mismatch_with_incomplete_cache_keeps_it(tmp_path, cls, length):
    root = str(tmp_path)
    with pytest.raises(ExampleError):
        build(BadDataset(root, "part", LENGTH, "raise", 30))
    path = os.path.join(root, "cached", "part")
    before = committed(path)
    with pytest.raises(CacheMismatchError) as err:
        build(cls(root, "part", length))
    assert str(err.value) == (
        f"the cache at {path} was built from reliability_datasets.BadDataset of length 40; this "
        f"dataset is reliability_datasets.{cls.__name__} of length {length}. {HINT}"
    )
    assert committed(path) == before  # the mismatch destroyed nothing


# -- indexing ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build(SlowDataset(str(tmp_path_factory.mktemp("idx")), "idx", 20))


INDEX_TYPES = "dataset indices must be integers, slices, lists or integer arrays, not"


@pytest.mark.parametrize("index,exc,message", [
    (20, IndexError, "index 20 is out of range for a dataset of length 20"),
    (-21, IndexError, "index -21 is out of range for a dataset of length 20"),
    (10**20, IndexError, "index 100000000000000000000 is out of range for a dataset of length 20"),
    ([3, 20], IndexError, "index 20 is out of range for a dataset of length 20"),
    (np.array([1, -40]), IndexError, "index -40 is out of range for a dataset of length 20"),
    (2.0, TypeError, f"{INDEX_TYPES} float (2.0)"),
    (np.float32(1), TypeError, f"{INDEX_TYPES} float32 (np.float32(1.0))"),
    (True, TypeError, f"{INDEX_TYPES} bool (True)"),
    (np.bool_(False), TypeError, f"{INDEX_TYPES} bool (np.False_)"),
    ([1, True], TypeError, f"{INDEX_TYPES} bool (True)"),
    ("3", TypeError, f"{INDEX_TYPES} str ('3')"),
    (None, TypeError, f"{INDEX_TYPES} NoneType (None)"),
    (np.array([True, False]), TypeError, "boolean masks are not indices; use np.flatnonzero(mask)"),
])
def test_bad_index(small, index, exc, message):
    with pytest.raises(exc) as err:
        small[index]
    assert str(err.value) == message


@pytest.mark.parametrize("index", [20, 23, 10**6, -1, -21])
def test_get_example_out_of_range(small, index):
    """``get_example`` (no wrap-around, as in edflow) names the index, never claims damage."""
    with pytest.raises(IndexError) as err:
        small.get_example(index)
    assert str(err.value) == f"index {index} is out of range for a cache of 20 examples"


def test_get_batch_out_of_range(small):
    with pytest.raises(IndexError, match=re.escape("index 25 is out of range for a dataset of length 20")):
        small.get_batch([1, 25])


def test_good_indices_still_work(small):
    assert small[-1]["index_"] == 19
    assert [e["index_"] for e in small[np.array([0, 19, -20])]] == [0, 19, 0]
    assert [e["index_"] for e in small[18:40]] == [18, 19]
    assert small[np.int64(3)]["index_"] == 3


# -- the variable-shape and mixed-schema datasets -----------------------------------------
class OptionalKeyDataset(MixedDataset):
    """``caption`` (present in every 3rd example only) asked for as an in_memory_key."""

    in_memory_keys = ["label", "caption"]


class BadMixedDataset(MixedDataset):
    """An unstorable value deep inside a nested dict of example 19 (while ``broken``)."""

    broken = True
    fingerprint_exclude = ("delay", "count_dir", "fail_at", "broken")

    def get_example(self, i):
        ex = super().get_example(i)
        if i == 19 and self.broken:
            ex["meta"]["nested"]["v"].append({"calib": Calibration()})
        return ex


class DriftingRaggedDataset(RaggedDataset):
    """From example 16 on, ``boxes`` are float64 ``(k, 5)`` and ``label`` a numpy int16:
    not an error, the columns are promoted (to record)."""

    @staticmethod
    def example(i):
        ex = RaggedDataset.example(i)
        if i >= 16:
            ex["boxes"] = np.arange(5 * (i % 3), dtype=np.float64).reshape(-1, 5)
            ex["label"] = np.int16(i)
        return ex

    @classmethod
    def expected(cls, i):
        ex = cls.example(i)
        ex["index_"] = i
        return ex


def test_optional_key_as_in_memory_key(tmp_path):
    with pytest.raises(LabelError) as err:
        build(OptionalKeyDataset(str(tmp_path), "opt", LENGTH))
    assert str(err.value) == (
        "example 1 has no in_memory_key 'caption' (it has ['label', 'tag', 'score', 'feat', 'note', "
        "'meta', 'depth', 'index_'])"
    )
    assert committed(os.path.join(str(tmp_path), "cached", "opt")) == set()


def test_unstorable_value_deep_in_mixed_example(tmp_path):
    with pytest.raises(CodecError) as err:
        build(BadMixedDataset(str(tmp_path), "deep", LENGTH))
    assert str(err.value) == CODEC_MESSAGE.replace("example 17, key 'meta/calib'",
                                                   "example 19, key 'meta/nested/v/2/calib'")
    cache_dir = os.path.join(str(tmp_path), "cached", "deep")
    kept = committed(cache_dir)
    assert kept == {0, 1}
    count = tmp_path / "count"
    count.mkdir()
    fixed = BadMixedDataset(str(tmp_path), "deep", LENGTH, count_dir=str(count))
    fixed.broken = False
    cached = build(fixed)
    assert not {i // CHUNK for i in computations(str(count))} & kept
    assert cached.complete


def test_kind_drift_mid_build_is_not_an_error(tmp_path):
    cached = build(DriftingRaggedDataset(str(tmp_path), "drift", LENGTH))
    for i in range(LENGTH):
        assert_example_equal(cached[i], DriftingRaggedDataset.expected(i), f"example {i}")
    labels = cached.labels["label"]
    assert [int(v) for v in labels] == [DriftingRaggedDataset.example(i)["label"] for i in range(LENGTH)]
