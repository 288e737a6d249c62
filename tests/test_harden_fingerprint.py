"""Issue 16 item 21: a cache records its dataset's configuration; opening or resuming it
with another configuration is refused instead of returning stale examples."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import edcache
from edcache import CachedDataset, DatasetMixin
from edcache.errors import CacheMismatchError, ExampleError
from edcache.fingerprint import dataset_fingerprint
from edcache.format.columnar.manifest import read_manifest

SRC = os.path.dirname(os.path.dirname(os.path.abspath(edcache.__file__)))


class Faces(DatasetMixin):
    name = "faces"

    def __init__(self, root, size=224, fail_at=None, mean=(0.5, 0.5, 0.5)):
        self.root = str(root)
        self.size = size
        self.fail_at = fail_at
        self.mean = mean
        self.files = [f"img_{i}.jpg" for i in range(1000)]  # large: not configuration
        self.model = object()  # not simple: left out
        self._cache = {}  # private: left out

    def __len__(self):
        return 12

    def get_example(self, i):
        if i == self.fail_at:
            raise ValueError("broken")
        return {"image": np.full((self.size // 56, 2), i, np.uint8), "i": i}


def build(ds, **kw):
    return CachedDataset(ds, chunk_size=4, num_workers=0, progress=False, **kw)


def test_fingerprint_is_canonical_and_simple(tmp_path):
    fp = dataset_fingerprint(Faces(tmp_path, size=112, mean=[0.4, 0.5, 0.6]))
    assert json.loads(fp) == {"size": 112, "fail_at": None, "mean": [0.4, 0.5, 0.6]}
    assert fp == dataset_fingerprint(Faces(str(tmp_path) + "/elsewhere", size=112, mean=(0.4, 0.5, 0.6)))
    assert dataset_fingerprint(None) is None


def test_fingerprint_is_the_same_in_another_process(tmp_path):
    class_file = pathlib.Path(__file__)
    code = (
        f"import sys; sys.path.insert(0, {str(class_file.parent)!r});"
        "from test_harden_fingerprint import Faces; from edcache.fingerprint import dataset_fingerprint;"
        f"print(dataset_fingerprint(Faces({str(tmp_path)!r}, size=64, mean={{'b': 1.5, 'a': pathlib_path}})))"
    ).replace("pathlib_path", f"__import__('pathlib').Path('/x/y')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=SRC, PYTHONHASHSEED="123"))
    assert out.returncode == 0, out.stderr
    here = dataset_fingerprint(Faces(tmp_path, size=64, mean={"a": pathlib.Path("/x/y"), "b": 1.5}))
    assert out.stdout.strip() == here


def test_changed_configuration_is_refused_on_open(tmp_path):
    build(Faces(tmp_path, size=224))
    assert json.loads(read_manifest(str(tmp_path / "cached" / "faces")).fingerprint)["size"] == 224
    with pytest.raises(CacheMismatchError) as err:
        build(Faces(tmp_path, size=112))
    msg = str(err.value)
    assert "size: 224 -> 112" in msg and "force_cache=True, keep_existing=False" in msg
    assert build(Faces(tmp_path, size=224))[3]["image"].shape == (4, 2)  # the same config opens
    fresh = build(Faces(tmp_path, size=112), force_cache=True, keep_existing=False)
    assert fresh[3]["image"].shape == (2, 2)
    assert build(Faces(tmp_path, size=112))[0]["image"].shape == (2, 2)


BROKEN: set[int] = set()  # indices whose get_example raises: a bug "in the code"


def test_changed_configuration_is_refused_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(Faces, "get_example", _get_example_with_bug)
    BROKEN.add(9)
    try:
        with pytest.raises(ExampleError):
            build(Faces(tmp_path, size=224))  # chunks 0 and 1 committed at size 224
    finally:
        BROKEN.clear()  # the bug is fixed
    with pytest.raises(CacheMismatchError) as err:
        build(Faces(tmp_path, size=112))
    assert "size: 224 -> 112" in str(err.value)
    # the refusal changed nothing: the original configuration resumes
    ds = build(Faces(tmp_path, size=224))
    assert [ds[i]["image"].shape for i in (0, 11)] == [(4, 2), (4, 2)]


def _get_example_with_bug(self, i):
    if i in BROKEN:
        raise ValueError("broken")
    return {"image": np.full((self.size // 56, 2), i, np.uint8), "i": i}


def test_exclusions_and_caches_without_a_fingerprint(tmp_path):
    class Plumbed(Faces):
        fingerprint_exclude = ("fail_at",)

    with pytest.raises(ExampleError):
        build(Plumbed(tmp_path, fail_at=5))
    ds = build(Plumbed(tmp_path, fail_at=None))  # resumes: fail_at is plumbing here
    assert len(ds) == 12

    class Bare(DatasetMixin):  # no simple attributes: nothing recorded, nothing checked
        root, name = str(tmp_path), "bare"

        def __len__(self):
            return 3

        def get_example(self, i):
            return {"i": i}

    build(Bare())
    assert read_manifest(str(tmp_path / "cached" / "bare")).fingerprint is None
    assert json.loads((tmp_path / "cached" / "bare" / "manifest.json").read_text())["fingerprint"] is None
