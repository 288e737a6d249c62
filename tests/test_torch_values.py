"""Tensors of every CPU dtype and PIL images of every mode round-trip; returned tensors
are copies (in-place ops are safe); errors suggest a conversion (issue 12 items 3, 4, 7)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from torch_datasets import CPU_DTYPES, AllDtypes, PilImages, assert_same

import edcache
from edcache.errors import CodecError


class Listed:
    """Any list of examples as a dataset."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def _cache(examples, path, **kw):
    kw.setdefault("chunk_size", 4)
    return edcache.cache(Listed(examples), str(path), num_workers=0, progress=False, **kw)


def test_every_cpu_dtype_round_trips_with_shape_and_dtype(tmp_path):
    raw = AllDtypes()
    cached = edcache.cache(raw, tmp_path / "c", num_workers=0, chunk_size=4, progress=False)
    for i in range(len(raw)):
        assert_same(cached[i], raw[i])
    batch = cached.get_batch([0, 3, 9])
    for pos, dt in enumerate(CPU_DTYPES):
        assert batch[pos].dtype == dt and batch[pos].shape == (3, 2, 3), dt
        assert torch.equal(batch[pos][1], raw[3][pos])
    assert batch[len(CPU_DTYPES)].shape == (3,)  # the 0-d tensors, stacked
    reopened = edcache.CachedDataset.from_cache(path=tmp_path / "c")
    assert_same(reopened[5], raw[5])
    kinds = {c["key"]: c["kind"] for c in reopened.store.columns()}
    assert set(kinds.values()) == {"fixed"}, kinds  # arrays, no pickles, no records


def test_in_place_ops_on_returned_tensors_are_safe(tmp_path):
    examples = [(torch.arange(12, dtype=dt).reshape(3, 4).to(dt), torch.zeros(i + 1, dtype=torch.bfloat16))
                for i, dt in enumerate([torch.float32, torch.int64, torch.uint8, torch.float16])]
    cached = _cache(examples, tmp_path / "c")
    for i in range(len(examples)):
        a, b = cached[i]
        a.add_(1)  # a view of the read-only map would crash the process here
        b.fill_(3)
        a2, b2 = cached[i]
        assert torch.equal(a2, examples[i][0]) and torch.equal(b2, examples[i][1])
    batch = cached.get_batch([0, 1])
    batch[1][0].fill_(5)
    assert torch.equal(cached[0][1], examples[0][1])


def test_tensors_keep_their_values_not_their_memory(tmp_path):
    t = torch.arange(10.0)
    noncontig = torch.arange(24.0).reshape(4, 6)[:, ::2]
    grad = torch.ones(3, requires_grad=True) * 2
    conj = torch.complex(torch.ones(2), torch.ones(2)).conj()
    cached = _cache([(t[2:5], noncontig, grad, conj)], tmp_path / "c")
    a, b, c, d = cached[0]
    assert torch.equal(a, t[2:5]) and torch.equal(b, noncontig) and not c.requires_grad
    assert torch.equal(c, grad.detach()) and torch.equal(d, conj.resolve_conj())


def test_pil_images_of_every_mode_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    base = Image.fromarray(rgb, "RGB")
    modes = ["1", "L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]
    examples = [{"img": base.convert(m), "mode": m} for m in modes]
    cached = _cache(examples, tmp_path / "c")
    for i, ex in enumerate(examples):
        assert_same(cached[i], ex)
    # one mode per column: a fixed column of pixels with the mode as its tag
    same = _cache([(base.convert("L"), i) for i in range(6)], tmp_path / "l")
    col = same.store.columns()[0]
    assert col["kind"] == "fixed" and col["dtype"] == "|u1" and col["shape"] == (5, 7)
    # palette images are stored as RGB (documented: the palette is not kept)
    p = _cache([(base.convert("P"),)], tmp_path / "p")
    assert p[0][0].mode == "RGB" and np.array_equal(np.asarray(p[0][0]), np.asarray(base.convert("P").convert("RGB")))


def test_pil_array_option_returns_pixel_arrays(tmp_path):
    raw = PilImages(mode="RGBA")
    cached = edcache.cache(raw, tmp_path / "c", num_workers=0, chunk_size=8, progress=False, pil="array")
    img, label = cached[3]
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (10, 12, 4)
    assert np.array_equal(img, np.asarray(raw[3][0])) and label == 3
    assert cached.get_batch([0, 1])[0].shape == (2, 10, 12, 4)
    as_images = edcache.CachedDataset.from_cache(path=tmp_path / "c")
    assert_same(as_images[3], raw[3])
    arrays = edcache.CachedDataset.from_cache(path=tmp_path / "c", pil="array")
    assert isinstance(arrays[3][0], np.ndarray)
    with pytest.raises(edcache.EdcacheError, match="pil must be one of"):
        edcache.CachedDataset.from_cache(path=tmp_path / "c", pil="tensor")


def test_a_column_mixing_tensors_and_arrays_is_stored_as_records(tmp_path):
    examples = [torch.ones(2) * i if i < 4 else np.ones(2) * i for i in range(8)]
    examples = [(v, i) for i, v in enumerate(examples)]
    cached = _cache(examples, tmp_path / "c")  # chunk 0 tensors, chunk 1 arrays: promoted
    for i, ex in enumerate(examples):
        assert_same(cached[i], ex)
    mixed_in_a_chunk = [(torch.ones(3), {"t": torch.zeros(2, dtype=torch.bfloat16)}), (np.ones(3), None)] * 3
    cached = _cache(mixed_in_a_chunk, tmp_path / "m")
    for i, ex in enumerate(mixed_in_a_chunk):
        assert_same(cached[i], ex)
    # tensors of another dtype in a later chunk: promoted too, each keeps its dtype
    dtypes = [(torch.ones(2, dtype=torch.float32 if i < 4 else torch.float64),) for i in range(8)]
    cached = _cache(dtypes, tmp_path / "d")
    for i, ex in enumerate(dtypes):
        assert_same(cached[i], ex)
    # images of different sizes: one ragged/varshape column, still images
    sizes = [(Image.new("L", (3 + i, 4)),) for i in range(6)]
    cached = _cache(sizes, tmp_path / "s")
    for i, ex in enumerate(sizes):
        assert_same(cached[i], ex)


class HasArray:
    def __array__(self, dtype=None, copy=None):
        return np.zeros(3)


def test_errors_suggest_the_conversion_that_works(tmp_path):
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(CodecError, match=r"to_dense"):
        _cache([(sparse,)], tmp_path / "a")
    with pytest.raises(CodecError, match=r"np\.asarray"):
        _cache([{"x": HasArray()}], tmp_path / "b")
    with pytest.raises(CodecError, match=r"allow_pickle=True"):
        _cache([{"x": HasArray()}], tmp_path / "c")


def test_importing_edcache_imports_neither_torch_nor_pil():
    code = "import sys, edcache; assert 'torch' not in sys.modules and 'PIL' not in sys.modules, 'imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_none_after_an_array_in_the_same_chunk_stays_none(tmp_path):
    # (a None in a column whose rows so far went into the chunk's block was taken for a
    # row of the block: it read back as zeros)
    examples = [(torch.ones(2),), (None,), (np.zeros(0, bool),), (None,)]
    cached = _cache(examples, tmp_path / "c")
    for i, ex in enumerate(examples):
        assert_same(cached[i], ex)
