"""Transforms on read, cache paths, and fingerprints that catch stale caches (issue 12
items 1, 5, 6)."""

from __future__ import annotations

import importlib
import pickle
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader
from torch_datasets import TorchvisionStyle, Versioned, add_one, scale_and_flip

import edcache
from edcache.cli.info import describe
from edcache.errors import CacheMismatchError, DatasetInterfaceError


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_transform_applies_after_read_in_workers_and_pickles(tmp_path, mode):
    raw = TorchvisionStyle(16)
    cached = edcache.cache(raw, tmp_path / "c", num_workers=0, chunk_size=8, progress=False,
                           transform=scale_and_flip)
    want = [scale_and_flip(raw[i]) for i in range(len(raw))]
    assert torch.equal(cached[2][0], want[2][0]) and cached[2][1] == want[2][1]
    assert torch.equal(cached[[1, 2]][1][0], want[2][0])
    assert torch.equal(cached.__getitems__([3])[0][0], want[3][0])
    assert torch.equal(cached.get_example(2)[0], raw[2][0])  # as stored
    again = pickle.loads(pickle.dumps(cached))
    assert again.transform is scale_and_flip and torch.equal(again[5][0], want[5][0])
    loader = DataLoader(cached, batch_size=4, num_workers=2, multiprocessing_context=mode)
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images, torch.stack([w[0] for w in want]))


def test_transform_on_from_cache_and_subsets(tmp_path):
    raw = TorchvisionStyle(16)
    edcache.cache(raw, tmp_path / "c", num_workers=0, chunk_size=8, progress=False)
    plain = edcache.CachedDataset.from_cache(path=tmp_path / "c")
    flipped = edcache.CachedDataset.from_cache(path=tmp_path / "c", transform=scale_and_flip)
    assert torch.equal(plain[3][0], raw[3][0])
    assert torch.equal(flipped[3][0], scale_and_flip(raw[3])[0])
    view = flipped.subset([3, 4])
    assert torch.equal(view[0][0], scale_and_flip(raw[3])[0])  # inherits the parent's
    own = flipped.subset([3, 4], transform=add_one)
    assert torch.equal(own[1][0], raw[4][0] + 1)
    assert torch.equal(own.subset([1])[0][0], raw[4][0] + 1)
    none = flipped.subset([3], transform=None)
    assert torch.equal(none[0][0], raw[3][0])
    assert torch.equal(pickle.loads(pickle.dumps(own))[0][0], raw[3][0] + 1)
    with pytest.raises(ValueError, match="per-example transform"):
        flipped.loader(4)
    with pytest.raises(ValueError, match="per-example transform"):
        view.loader(4)
    with pytest.raises(DatasetInterfaceError, match="transform must be callable"):
        edcache.CachedDataset.from_cache(path=tmp_path / "c", transform="flip")


def test_cachable_passes_read_options_when_it_reopens(tmp_path):
    calls = []

    @edcache.cachable(str(tmp_path / "fn"), num_workers=0, progress=False, transform=add_one)
    def make(n):
        calls.append(n)
        return TorchvisionStyle(n)

    first, again = make(4), make(4)
    assert calls == [4]
    assert torch.equal(again[1][0], TorchvisionStyle(4)[1][0] + 1) and again.transform is add_one
    assert torch.equal(first[1][0], again[1][0])


def test_cache_path_and_root_name_forms(tmp_path):
    raw = TorchvisionStyle(8)
    a = edcache.cache(raw, tmp_path / "a", num_workers=0, progress=False)
    b = edcache.CachedDataset(raw, path=str(tmp_path / "a"), num_workers=0, progress=False)
    assert a.path == b.path == str(tmp_path / "a") and len(b) == 8
    with pytest.raises(DatasetInterfaceError, match="root"):
        edcache.cache(raw)  # no path, no root/name
    with pytest.raises(DatasetInterfaceError, match="in_memory_keys"):
        edcache.cache(type("Bad", (TorchvisionStyle,), {"in_memory_keys": [1.5]})(4), tmp_path / "bad")


def test_explicit_version_mismatch_is_refused(tmp_path):
    ds = Versioned()
    edcache.cache(ds, tmp_path / "c", num_workers=0, progress=False)
    edcache.cache(ds, tmp_path / "c", num_workers=0, progress=False)  # same version: opens
    with pytest.raises(CacheMismatchError, match=r'version "1" -> "2"'):
        edcache.cache(ds, tmp_path / "c", num_workers=0, progress=False, fingerprint="2")
    ds.cache_version = 3
    with pytest.raises(CacheMismatchError, match=r'version "1" -> 3'):
        edcache.cache(ds, tmp_path / "c", num_workers=0, progress=False)
    rebuilt = edcache.cache(ds, tmp_path / "c", num_workers=0, progress=False,
                            force_cache=True, keep_existing=False)
    assert len(rebuilt) == len(ds)
    text = describe(str(tmp_path / "c"))
    assert "identity:" in text and "torch_datasets.Versioned" in text and "version 3" in text
    assert "as torch:float32" in text


MODULE = '''
import torch

class Changing:
    {extra}
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((2,), float(i) * {factor}), i
'''


def _module(tmp_path, factor, extra="pass"):
    (tmp_path / "changing_ds.py").write_text(textwrap.dedent(MODULE.format(factor=factor, extra=extra)))
    sys.modules.pop("changing_ds", None)
    importlib.invalidate_caches()
    return importlib.import_module("changing_ds").Changing


def test_changed_class_source_warns_and_never_rebuilds(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    old = _module(tmp_path, 1)
    edcache.cache(old(), tmp_path / "c", num_workers=0, progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        same = edcache.cache(old(), tmp_path / "c", num_workers=0, progress=False)
    assert not seen
    new = _module(tmp_path, 10)
    with pytest.warns(UserWarning, match=r"source of changing_ds\.Changing changed.*cache_version"):
        stale = edcache.cache(new(), tmp_path / "c", num_workers=0, progress=False)
    assert stale[3][0].tolist() == same[3][0].tolist() == [3.0, 3.0]  # not rebuilt, but said so
    # an explicit version says the examples are what the new code computes: no warning then
    versioned = _module(tmp_path, 10, extra="cache_version = 'v2'")
    edcache.cache(versioned(), tmp_path / "v", num_workers=0, progress=False)
    edited = _module(tmp_path, 10, extra="cache_version = 'v2'  # a comment")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        edcache.cache(edited(), tmp_path / "v", num_workers=0, progress=False)
    assert not seen, [str(w.message) for w in seen]
