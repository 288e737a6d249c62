"""Issue 16 hardening: build-side failures (names, empty directories, misleading errors)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edcache import CachedDataset, DatasetMixin
from edcache.errors import DatasetInterfaceError


class Plain(DatasetMixin):
    in_memory_keys: list = []

    def __init__(self, root, name="plain", n=12, make=None, keys=None):
        self.root = str(root)
        self.name = name
        self.n = n
        self.make = make
        if keys is not None:
            self.in_memory_keys = keys

    def __len__(self):
        return self.n

    def get_example(self, i):
        if self.make is not None:
            return self.make(i)
        return {"x": np.full(3, i, dtype=np.int16), "i": i}


def build(ds, workers=0, **kw):
    return CachedDataset(ds, chunk_size=4, num_workers=workers, progress=False, **kw)


# -- item 7: names that are not one path component ---------------------------------------
@pytest.mark.parametrize("name", [".", "..", "a/b", "../x", "x\x00y"])
def test_name_that_is_not_a_plain_component_is_refused(tmp_path, name):
    root = tmp_path / "root"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "precious.txt").write_text("keep me")
    (root / "precious.txt").write_text("keep me too")
    with pytest.raises(DatasetInterfaceError, match="cannot name a cache|name must be"):
        build(Plain(root, name=name))
    assert (root / "shards" / "precious.txt").read_text() == "keep me"
    assert (root / "precious.txt").read_text() == "keep me too"
    assert sorted(os.listdir(root)) == ["precious.txt", "shards"]


@pytest.mark.parametrize("name", [".", ".."])
def test_from_cache_refuses_dot_names(tmp_path, name):
    with pytest.raises(DatasetInterfaceError, match="cannot name a cache"):
        CachedDataset.from_cache(str(tmp_path), name)


def test_ordinary_names_with_dots_still_work(tmp_path):
    ds = build(Plain(tmp_path, name="faces.v2..256"))
    assert ds.path == os.path.join(str(tmp_path), "cached", "faces.v2..256")
    assert int(ds[3]["i"]) == 3


# -- item 8: str labels ending in NUL ------------------------------------------------------
@pytest.mark.parametrize("odd", [False, True], ids=["packed", "chunk-shards"])
def test_str_label_with_trailing_nul_round_trips(tmp_path, odd):
    values = ["a\x00", "b", "\x00", "", "c\x00\x00", "d\x00e"] * 2

    def make(i):
        ex = {"s": values[i], "i": i}
        if odd and i == 5:
            ex["extra"] = 1
        return ex

    ds = build(Plain(tmp_path, make=make, keys=["s"]))
    assert list(ds.labels["s"]) == values
    assert [ds[i]["s"] for i in range(len(ds))] == values
    again = CachedDataset.from_cache(str(tmp_path), "plain")
    assert list(again.labels["s"]) == values
    assert list(again.subset([0, 4]).labels["s"]) == [values[0], values[4]]


def test_str_labels_without_nul_stay_a_numpy_column(tmp_path):
    ds = build(Plain(tmp_path, make=lambda i: {"s": f"v{i}"}, keys=["s"]))
    assert isinstance(ds.labels["s"], np.ndarray) and ds.labels["s"].dtype.kind == "U"


# -- item 22: a build that fails before committing anything leaves no cache directory -------
def _always_fails(i):
    raise ValueError(f"broken {i}")


@pytest.mark.parametrize("workers", [0, 2])
def test_failed_build_without_commits_leaves_no_directory(tmp_path, workers):
    from edcache.errors import ExampleError

    with pytest.raises(ExampleError):
        build(Plain(tmp_path, make=_always_fails), workers=workers)
    cached = tmp_path / "cached"
    assert not (cached / "plain").exists()
    assert [p.name for p in cached.iterdir()] == [".plain.lock"]
    # fixed under the same name: builds afresh
    ds = build(Plain(tmp_path))
    assert int(ds[11]["i"]) == 11


def test_failed_build_with_commits_keeps_them(tmp_path):
    from edcache.errors import ExampleError

    def make(i):
        if i == 9:
            raise ValueError("broken 9")
        return {"i": i}

    with pytest.raises(ExampleError):
        build(Plain(tmp_path, make=make))
    from edcache.format.columnar.log import read_log

    assert read_log(str(tmp_path / "cached" / "plain")).committed == 2  # examples 0..7 kept


def test_failed_build_in_an_existing_directory_leaves_it(tmp_path):
    from edcache.errors import ExampleError

    (tmp_path / "cached" / "plain").mkdir(parents=True)
    with pytest.raises(ExampleError):
        build(Plain(tmp_path, make=_always_fails))
    assert (tmp_path / "cached" / "plain").is_dir()


# -- item 15: duplicate in_memory_keys, labels of mixed kinds --------------------------------
def test_in_memory_key_listed_twice_is_refused_before_any_work(tmp_path):
    with pytest.raises(DatasetInterfaceError, match=r"in_memory_keys lists 'i' more than once"):
        build(Plain(tmp_path, keys=["i", "x", "i"]))
    assert not (tmp_path / "cached").exists()


def test_labels_mixing_kinds_within_a_chunk_fail_before_commit(tmp_path):
    from edcache.errors import LabelError
    from edcache.format.columnar.log import read_log

    def make(i):
        return {"i": "seven" if i == 6 else i}

    with pytest.raises(LabelError) as err:
        build(Plain(tmp_path, make=make, keys=["i"]), workers=2)
    msg = str(err.value)
    assert msg.startswith(
        "in_memory_key 'i' has values of inconsistent types: number (index 4: 4) and str (index 6: 'seven')."
    )
    assert "force_cache=True, keep_existing=False" in msg
    cache_dir = str(tmp_path / "cached" / "plain")
    # chunk 1 (examples 2, 3) is not committed; with 2 workers the error may also arrive
    # before chunk 0 is in, and a failed build that committed nothing leaves no cache
    state = read_log(cache_dir)
    assert (state is None and not os.path.exists(cache_dir)) or state.committed <= 1


def test_labels_mixing_kinds_across_chunks_say_how_to_recover(tmp_path):
    """Chunk 0 holds numbers, chunk 1 str: found when the labels are written; the advice
    (rebuild with force_cache=True, keep_existing=False) recovers once the dataset is fixed."""
    from edcache.errors import LabelError

    with pytest.raises(LabelError) as err:
        build(Plain(tmp_path, make=lambda i: {"i": i if i < 4 else str(i)}, keys=["i"]))
    assert str(err.value).startswith(
        "in_memory_key 'i' has values of inconsistent types: number (index 0: 0) and str (index 4: '4')."
    )
    assert "rebuild with force_cache=True, keep_existing=False" in str(err.value)
    fixed = Plain(tmp_path, make=lambda i: {"i": str(i)}, keys=["i"])
    with pytest.raises(LabelError):  # the committed chunk 0 still holds numbers
        build(fixed)
    ds = build(fixed, force_cache=True, keep_existing=False)
    assert list(ds.labels["i"]) == [str(i) for i in range(12)]


# -- item 23: replacing a cache under live readers (documented, not catchable) ---------------
def test_replacing_a_cache_by_rename_keeps_open_readers_working(tmp_path):
    """What docs/reliability.md recommends instead of copying over a live cache (which
    SIGBUSes readers): build the new cache elsewhere and rename it into place."""
    import shutil

    old = build(Plain(tmp_path / "a"))
    old_reader = CachedDataset.from_cache(str(tmp_path / "a"), "plain")
    assert int(old_reader[5]["i"]) == 5  # mapped now
    build(Plain(tmp_path / "b", make=lambda i: {"x": np.full(3, -i, np.int16), "i": -i}))
    live = tmp_path / "a" / "cached" / "plain"
    os.rename(live, tmp_path / "a" / "cached" / "plain.old")
    os.rename(tmp_path / "b" / "cached" / "plain", live)
    shutil.rmtree(tmp_path / "a" / "cached" / "plain.old")  # deleted files stay mapped
    assert [int(old_reader[i]["i"]) for i in range(12)] == list(range(12))
    assert [int(CachedDataset.from_cache(str(tmp_path / "a"), "plain")[i]["i"]) for i in (1, 11)] == [-1, -11]
    assert len(old) == 12
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")).read()
    assert "SIGBUS" in doc and "--inplace" in doc  # the limit and the safe way are documented
