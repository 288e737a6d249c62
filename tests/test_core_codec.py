"""The safe codec: round trips with types preserved, clear errors, opt-in pickles."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import itertools

from edcache import CachedDataset
from edcache.errors import CodecError, UnsafePickleError
from edcache.format.base import ChunkTask
from edcache.format.columnar import ColumnarEncoder, ColumnarReader
from edcache.format.shards.codec import Encoder
from helpers import assert_same

_names = itertools.count()


class ListDataset:
    """Any map-style object with root and name: examples come back exactly as given."""

    def __init__(self, root, examples):
        self.root, self.name, self.examples = str(root), f"c{next(_names)}", examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "<i4", ">i4", "<u4", "int64", "uint64",
          "float16", "float32", ">f8", "float64", "complex64", "complex128", "<U3", "S4",
          "datetime64[s]", "timedelta64[ms]"]

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
scalars = st.sampled_from(["int8", "uint16", "int64", "float32", "float64", "bool", "complex64"]).flatmap(
    lambda dt: hnp.from_dtype(np.dtype(dt)).map(lambda v: np.dtype(dt).type(v))
)
leaves = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8) | arrays | scalars
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
examples = st.dictionaries(st.text(max_size=6), values, max_size=5)


def build(exs, tmp_path, allow_pickle=False, chunk_size=2):
    """A cache of ``exs`` (2 examples per chunk: kinds differing between chunks promote
    columns), opened with verify=True."""
    ds = CachedDataset(ListDataset(tmp_path, exs), num_workers=0, chunk_size=chunk_size, progress=False,
                       allow_pickle=allow_pickle)
    return ColumnarReader(ds.path, verify=True, allow_pickle=allow_pickle)


def roundtrip(exs, tmp_path, allow_pickle=False):
    reader = build(exs, tmp_path, allow_pickle)
    return [reader.read(r) for r in range(len(exs))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(examples, min_size=1, max_size=4))
def test_roundtrip_preserves_values_and_types(tmp_path, exs):
    for got, want in zip(roundtrip(exs, tmp_path), exs):
        assert_same(got, want)


def test_specific_types(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    ex = {
        "noncontig": base[:, ::2],
        "fortran": np.asfortranarray(base),
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 3), np.int16),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "py_bool": True,
        "py_int": 1,
        "tuple": (1, (2, "x"), [np.arange(3)]),
        "big": 2**100,
        "neg_big": -(2**80),
        "ordered": {"z": 1, "a": 2, "m": 3},
        "bytes": b"\x00\xff",
        "none": None,
        "int_key": {1: "one", 2: "two"},
    }
    (got,) = roundtrip([ex], tmp_path)
    assert_same(got, {**ex, "noncontig": np.ascontiguousarray(base[:, ::2])})
    assert type(got["py_bool"]) is bool and type(got["py_int"]) is int
    assert list(got["ordered"]) == ["z", "a", "m"]
    assert not got["noncontig"].flags.writeable  # zero-copy views of the map are read-only


def test_column_fields_are_zero_copy_rows(tmp_path):
    exs = [{"img": np.full((2, 2), i, np.uint8), "k": i, "boxes": np.ones((i, 4), np.float32)} for i in range(5)]
    reader = build(exs, tmp_path)
    img, boxes = reader.read(3)["img"], reader.read(3)["boxes"]
    for arr in (img, boxes):  # views of the memory map, not copies
        assert not arr.flags.owndata and not arr.flags.writeable
        assert isinstance(arr.base, (np.ndarray, memoryview)) or arr.base is not None
    assert [c["kind"] for c in reader.columns()] == ["fixed", "fixed", "ragged"]
    assert_same(reader.read(3), exs[3])


@pytest.mark.parametrize(
    "value, key, what",
    [
        (object(), "meta/calib", "value of type builtins.object"),
        ({1, 2}, "meta/calib", "value of type builtins.set"),
        (np.array([object()], dtype=object), "meta/calib", "numpy array of dtype object"),
        (datetime.date(2020, 1, 1), "meta/calib", "value of type datetime.date"),
    ],
)
def test_unsupported_value_names_index_and_key_path(value, key, what):
    encoder = ColumnarEncoder([], allow_pickle=False)
    exs = [{"meta": {"calib": 1}} for _ in range(3)]
    exs[2] = {"meta": {"calib": value}}
    with pytest.raises(CodecError) as err:
        encoder.encode(ChunkTask(0, 4709, 4712), iter(exs))
    assert str(err.value).startswith(f"example 4711, key '{key}': cannot store {what}.")
    assert "allow_pickle=True" in str(err.value)


def test_allow_pickle_is_needed_again_to_read(tmp_path):
    exs = [{"when": datetime.date(2020, 1, 2)}]
    reader = build(exs, tmp_path, allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="allow_pickle=True"):
        ColumnarReader(reader.path)
    assert reader.read(0) == exs[0]


def test_encoder_is_deterministic():
    ex = {"a": np.arange(10), "b": (1, 2.5, "x"), "c": {"d": np.float32(1)}}
    one = Encoder().encode(ex, 64)
    two = Encoder().encode(ex, 64)
    assert one[0] == two[0] and [bytes(b) for _, b in one[1]] == [bytes(b) for _, b in two[1]]


def test_datetime_and_timedelta_columns(tmp_path):
    exs = [{"t": np.array(["2020-01-01T00:00:0%d" % i] * (i % 3), dtype="datetime64[s]"),
            "d": np.timedelta64(i, "ms"), "f": np.array([i], dtype="datetime64[D]")} for i in range(6)]
    for got, want in zip(roundtrip(exs, tmp_path), exs):
        assert_same(got, want)
