"""Per-column codecs (issue 13): round trips, refusals, batches, DataLoader,
determinism, corruption of coded rows, labels, ``auto``, info and the CLI option."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import edcache
from edcache.errors import (
    CodecError,
    CodecSpecError,
    CorruptCacheError,
    MissingExtraError,
)

pytest.importorskip("zstandard")
pytest.importorskip("lz4")
pytest.importorskip("simplejpeg")
pytest.importorskip("PIL")


class Rows:
    """Examples ``{"x": fn(i), "i": i}``."""

    def __init__(self, fn, n=12, in_memory_keys=()):
        self.fn, self.n, self.in_memory_keys = fn, n, list(in_memory_keys)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": self.fn(i), "i": i}


def photo(i, h=24, w=32, c=3):
    """A smooth image (JPEG-friendly) that differs per example."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([np.clip(yy * 3 + xx * 2 + 5 * i + 30 * k, 0, 255) for k in range(max(c, 1))], axis=-1)
    return img.astype(np.uint8) if c else img[..., 0].astype(np.uint8)


def build(tmp_path, ds, codecs, name="c", **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("chunk_size", 5)
    return edcache.cache(ds, tmp_path / name, progress=False, codecs=codecs, **kw)


def read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def columns(path):
    doc = json.loads(read(path, "manifest.json"))
    return {c["key"]: c for c in doc["schema"]["columns"]}


# -- round trips ------------------------------------------------------------------------------
DTYPES = ["|u1", "<i2", "<u4", "<i8", "<f2", "<f4", "<f8", "|b1", "<c8"]


@pytest.mark.parametrize("codec", ["zstd", "zstd:19", "lz4"])
def test_byte_codecs_round_trip_every_dtype_and_kind(tmp_path, codec):
    rng = np.random.default_rng(0)
    for n, dt in enumerate(DTYPES):
        fixed = [np.round(rng.standard_normal((6, 5)) * 3).astype(dt) for _ in range(11)]
        ragged = [np.zeros((i % 4, 3), dt) + fixed[i][0, 0] for i in range(11)]  # rows of 0 items too
        varshape = [np.resize(fixed[i], (1 + i % 3, 2 + i % 2)) for i in range(11)]
        for kind, values in (("fixed", fixed), ("ragged", ragged), ("varshape", varshape)):
            ds = build(tmp_path, Rows(values.__getitem__, 11), {"x": codec}, name=f"{n}{kind}")
            spec = columns(ds.path)["x"]
            assert (spec["kind"], spec["codec"]) == (kind, ds.codecs[0][1])
            for i in range(11):
                got = ds[i]["x"]
                assert got.dtype == values[i].dtype and got.shape == values[i].shape
                assert np.array_equal(got, values[i])
            batch = ds.get_batch(list(range(11)))["x"]
            if kind == "fixed":
                assert isinstance(batch, np.ndarray) and np.array_equal(batch, np.stack(fixed))
            else:
                assert all(np.array_equal(a, b) for a, b in zip(batch, values))


@pytest.mark.parametrize("codec", ["png", "webp:lossless"])
@pytest.mark.parametrize("channels", [0, 1, 3, 4])
def test_lossless_image_codecs_round_trip_exactly(tmp_path, codec, channels):
    rng = np.random.default_rng(channels)
    noisy = [(photo(i, c=channels).astype(int) + rng.integers(0, 9, photo(i, c=channels).shape)).clip(0, 255)
             .astype(np.uint8) for i in range(8)]
    ds = build(tmp_path, Rows(noisy.__getitem__, 8), {"x": codec})
    for i in range(8):
        assert np.array_equal(ds[i]["x"], noisy[i])
    assert np.array_equal(ds.get_batch([7, 0, 3])["x"], np.stack([noisy[7], noisy[0], noisy[3]]))


@pytest.mark.parametrize("codec,channels", [("jpeg:90", 0), ("jpeg", 1), ("jpeg:95", 3), ("webp:90", 3),
                                            ("webp:90", 4), ("webp", 0)])
def test_lossy_codecs_are_close_and_named(tmp_path, codec, channels):
    ds = build(tmp_path, Rows(lambda i: photo(i, c=channels), 7), {"x": codec})
    for i in range(7):
        got, want = ds[i]["x"], photo(i, c=channels)
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).mean() < 6
    spec = columns(ds.path)["x"]
    assert spec["codec"] == codec if ":" in codec else spec["codec"] == f"{codec}:90"
    from edcache.cli.info import describe

    assert "(lossy)" in describe(ds.path)


def test_wrapped_columns_decode_to_tensors_and_images(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    ds = build(tmp_path, Rows(lambda i: torch.arange(12, dtype=torch.float32).reshape(3, 4) * i, 6),
               {"x": "zstd"}, name="t")
    assert torch.equal(ds[4]["x"], torch.arange(12, dtype=torch.float32).reshape(3, 4) * 4)
    batch = ds.get_batch([1, 2])["x"]
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 3, 4)
    ds = build(tmp_path, Rows(lambda i: Image.fromarray(photo(i)), 6), {"x": "png"}, name="p")
    img = ds[3]["x"]
    assert isinstance(img, Image.Image) and np.array_equal(np.asarray(img), photo(3))


def test_promotion_keeps_coded_rows(tmp_path):
    """A column whose shapes vary across chunks becomes varshape without rewriting
    (or re-encoding) its rows: the files keep their stem."""
    shapes = [(24, 32)] * 5 + [(20, 30)] * 5 + [(24, 32)] * 2
    values = [photo(i, *s) for i, s in enumerate(shapes)]
    ds = build(tmp_path, Rows(values.__getitem__, 12), {"x": "jpeg:80"})
    spec = columns(ds.path)["x"]
    assert (spec["kind"], spec["stem"], spec["codec"]) == ("varshape", "0000", "jpeg:80")
    for i in range(12):
        assert ds[i]["x"].shape == values[i].shape
    from edcache.format.columnar.codecs import encode, parse_codec

    blob = encode(parse_codec("jpeg:80"), values[0])
    assert blob in read(ds.path, "columns", "0000.data")


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("codec,fn,what", [
    ("jpeg", lambda i: np.zeros((4, 4, 3), np.float32), "uint8"),
    ("jpeg", lambda i: photo(i, c=4), "HxWx1/3"),
    ("png", lambda i: np.zeros((2, 4, 4, 3), np.uint8), "HxW"),
    ("webp", lambda i: np.zeros(5, np.uint8), "HxW"),
    ("zstd", lambda i: f"text {i}", "str"),
    ("lz4", lambda i: {"nested": i}, "nested"),
    ("png", lambda i: np.zeros((0, 4), np.uint8) if i == 3 else np.zeros((2 + i, 4), np.uint8), "pixels a side"),
])
def test_a_codec_that_cannot_store_a_field_names_it(tmp_path, codec, fn, what):
    with pytest.raises(CodecError, match=what) as info:
        build(tmp_path, Rows(fn, 6), {"x": codec})
    assert "'x'" in str(info.value)


@pytest.mark.parametrize("bad", ["gzip", "zstd:0", "zstd:x", "jpeg:101", "lz4:3", 5, {"x": "bogus"}, {1.5: "zstd"},
                                 "jpeg", "webp:90", {None: "jpeg:90"}])
def test_unknown_codecs_are_refused_before_any_work(tmp_path, bad):
    with pytest.raises(CodecSpecError):
        build(tmp_path, Rows(photo, 3), bad)
    assert not os.path.exists(tmp_path / "c")


def test_a_damaged_column_description_is_corrupt():
    from edcache.format.columnar.schema import ColumnSpec

    doc = {"key": "a", "kind": "fixed", "stem": "0000", "dtype": "|u1", "shape": [4, 4, 3], "py": "array"}
    assert ColumnSpec.from_json({**doc, "codec": "jpeg:90"}, "m").codec == "jpeg:90"
    for codec in ("bogus", "jpeg:900", "zstd:03", 7):
        with pytest.raises(CorruptCacheError, match="codec"):
            ColumnSpec.from_json({**doc, "codec": codec}, "m")
    with pytest.raises(CorruptCacheError, match="codec"):
        ColumnSpec.from_json({**doc, "dtype": "<f4", "codec": "png"}, "m")
    with pytest.raises(CorruptCacheError, match="codec"):
        ColumnSpec.from_json({"key": "a", "kind": "str", "stem": "0001", "codec": "zstd:3"}, "m")


def test_a_missing_library_names_the_extra(tmp_path, monkeypatch):
    ds = build(tmp_path, Rows(photo, 4), {"x": "jpeg"})
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    reopened = edcache.CachedDataset.from_cache(path=ds.path)
    with pytest.raises(MissingExtraError, match=r"edcache\[codecs\]"):
        reopened[0]
    with pytest.raises(MissingExtraError, match="simplejpeg"):
        build(tmp_path, Rows(photo, 4), {"x": "jpeg"}, name="d")


# -- defaults and auto ------------------------------------------------------------------------
def test_a_default_codec_applies_where_it_saves_space(tmp_path):
    rng = np.random.default_rng(1)
    noise = [rng.random(64).astype(np.float64) for _ in range(12)]

    class Mixed(Rows):
        def __getitem__(self, i):
            return {"zeros": np.zeros((16, 16), np.float32), "noise": noise[i], "name": str(i), "n": i,
                    "img": photo(i)}

    ds = build(tmp_path, Mixed(None), "zstd")
    cols = columns(ds.path)
    assert cols["zeros"]["codec"] == "zstd:3" and cols["img"]["codec"] == "zstd:3"
    assert "codec" not in cols["noise"] and "codec" not in cols["name"] and "codec" not in cols["n"]
    assert np.array_equal(ds[5]["noise"], noise[5]) and np.array_equal(ds[5]["img"], photo(5))
    ds = build(tmp_path, Mixed(None), {None: "auto", "img": "raw"}, name="auto")
    cols = columns(ds.path)
    assert cols["zeros"]["codec"] == "zstd:3" and "codec" not in cols["img"] and "codec" not in cols["noise"]


def test_auto_is_decided_by_the_first_chunk(tmp_path):
    """Chunk 0 compresses, chunk 1 does not: the column keeps chunk 0's codec and chunk 1
    is stored in it too (exactly)."""
    rng = np.random.default_rng(2)
    values = [np.zeros(256, np.uint8) if i < 5 else rng.integers(0, 256, 256).astype(np.uint8) for i in range(10)]
    ds = build(tmp_path, Rows(values.__getitem__, 10), "auto", num_workers=2)
    assert columns(ds.path)["x"]["codec"] == "zstd:3"
    assert all(np.array_equal(ds[i]["x"], values[i]) for i in range(10))
    values.reverse()
    ds = build(tmp_path, Rows(values.__getitem__, 10), "auto", name="r")
    assert "codec" not in columns(ds.path)["x"]
    assert all(np.array_equal(ds[i]["x"], values[i]) for i in range(10))


def test_labels_of_a_coded_column_are_decoded(tmp_path):
    ds = build(tmp_path, Rows(lambda i: np.full(3, i, np.int32), 9, in_memory_keys=["x"]), {"x": "zstd"})
    labels = ds.labels["x"]
    assert isinstance(labels, np.ndarray) and np.array_equal(labels, np.repeat(np.arange(9), 3).reshape(9, 3))


# -- determinism, DataLoader ------------------------------------------------------------------
def test_same_bytes_whatever_the_workers(tmp_path):
    codecs = {"x": "jpeg:90"}
    a = build(tmp_path, Rows(photo, 23), codecs, name="a", num_workers=0)
    b = build(tmp_path, Rows(photo, 23), codecs, name="b", num_workers=2, chunk_size=5)
    for d in ("columns",):
        names = sorted(os.listdir(os.path.join(a.path, d)))
        assert names == sorted(os.listdir(os.path.join(b.path, d)))
        for n in names:
            assert read(a.path, d, n) == read(b.path, d, n)
    assert read(a.path, "checksums.npy") == read(b.path, "checksums.npy")


def test_dataloader_workers_decode(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = build(tmp_path, Rows(photo, 16), {"x": "png"})
    seen = 0
    for batch in DataLoader(ds, batch_size=4, num_workers=2):
        for img, i in zip(batch["x"], batch["i"]):
            assert torch.equal(img, torch.from_numpy(photo(int(i))))
            seen += 1
    assert seen == 16


# -- damage -----------------------------------------------------------------------------------
def _damage(path, stem, offset, data):
    with open(os.path.join(path, "columns", f"{stem}.data"), "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "png", "jpeg", "webp", "webp:lossless"])
def test_damaged_rows_never_crash_the_decoder(tmp_path, codec):
    rng = np.random.default_rng(3)
    ds = build(tmp_path, Rows(photo, 6), {"x": codec})
    path = ds.path
    size = os.path.getsize(os.path.join(path, "columns", "0000.data"))
    for trial in range(40):
        offset = int(rng.integers(0, size))
        original = read(path, "columns", "0000.data")
        _damage(path, "0000", offset, bytes([original[offset] ^ int(rng.integers(1, 256))]))
        fresh = edcache.cache(Rows(photo, 6), tmp_path / "c", progress=False)
        for i in range(6):
            try:
                got = fresh[i]["x"]
            except CorruptCacheError as exc:
                assert "'x'" in str(exc) and f"row {i}" in str(exc)
                continue
            assert got.shape == photo(i).shape and got.dtype == np.uint8
            if codec == "zstd":  # checksummed rows: exact or an error
                assert np.array_equal(got, photo(i))
        checked = edcache.cache(Rows(photo, 6), tmp_path / "c", progress=False, verify=True)
        with pytest.raises(CorruptCacheError, match="checksum"):
            for i in range(6):
                checked[i]
        _damage(path, "0000", 0, original)


def test_a_damaged_index_is_corrupt_and_verify_names_it(tmp_path):
    ds = build(tmp_path, Rows(photo, 6), {"x": "zstd"})
    index = os.path.join(ds.path, "columns", "0000.index")
    with open(index, "r+b") as f:  # row 2's length: past the data
        f.seek(2 * 8 * 5 + 8)
        f.write((1 << 40).to_bytes(8, "little"))
    fresh = edcache.cache(Rows(photo, 6), tmp_path / "c", progress=False)
    with pytest.raises(CorruptCacheError, match="row 2"):
        fresh[2]
    from edcache.cli.main import main

    assert main(["verify", ds.path]) != 0


def test_verify_deep_decodes_every_coded_row(tmp_path, capsys):
    from edcache.cli.main import main

    ds = build(tmp_path, Rows(photo, 6), {"x": "png"})
    assert main(["verify", "--deep", ds.path]) == 0
    data = os.path.join(ds.path, "columns", "0000.data")
    with open(data, "r+b") as f:  # a PNG signature byte: the row no longer decodes
        f.seek(1)
        f.write(b"X")
    assert main(["verify", ds.path]) != 0
    assert "0000.data" in capsys.readouterr().out


# -- info and CLI -----------------------------------------------------------------------------
def test_info_shows_codec_stored_and_raw_bytes(tmp_path):
    from edcache.cli.info import describe

    ds = build(tmp_path, Rows(lambda i: np.zeros((64, 64), np.float32), 10), {"x": "zstd"})
    text = describe(ds.path)
    assert "codecs:      x=zstd:3" in text
    line = next(l for l in text.splitlines() if l.startswith("  'x'"))
    assert "zstd:3, " in line and "160.0 KiB raw" in line and "ratio 0.0" in line
    assert "'i': fixed <i8 (), raw" in text
    assert [c["raw_bytes"] for c in ds.store.columns() if c["key"] == "x"] == [10 * 64 * 64 * 4]


def test_cli_codec_option():
    from edcache.cli.parser import codecs_argument as _codecs_argument

    assert _codecs_argument(["image=jpeg:90", "mask=png", "0=zstd"]) == {"image": "jpeg:90", "mask": "png", 0: "zstd"}
    assert _codecs_argument(["zstd"]) == "zstd" and _codecs_argument(["*=lz4"]) == "lz4"
    assert _codecs_argument([]) is None


def test_resuming_with_other_codecs_is_refused(tmp_path):
    from edcache.errors import CacheMismatchError
    from edcache.format.columnar import prepare_cache_dir
    from edcache.format.columnar.codecs import normalize_codecs

    sink = prepare_cache_dir(str(tmp_path / "r"), length=10, chunk_size=5, dataset="d", in_memory_keys=[],
                             allow_pickle=False, keep_existing=True, codecs=normalize_codecs({"x": "zstd"}))
    from edcache.format.base import ChunkTask

    task = ChunkTask(0, 0, 5)
    sink.commit(sink.encoder(staged=False).encode(task, [{"x": np.zeros(4)} for _ in range(5)]))
    sink.close()
    with pytest.raises(CacheMismatchError, match="codecs"):
        prepare_cache_dir(str(tmp_path / "r"), length=10, chunk_size=5, dataset="d", in_memory_keys=[],
                          allow_pickle=False, keep_existing=True, codecs=normalize_codecs({"x": "lz4"}))


def test_manifest_codecs_entry_is_validated():
    from edcache.format.columnar.manifest import Manifest

    doc = {"length": 4, "chunk_size": 2}
    assert Manifest.from_doc({**doc, "codecs": [["image", "jpeg:90"], [None, "zstd:3"]]}, "m").codecs
    for bad in ([["image", "jpeg"]], [[None, "jpeg:90"]], "zstd", [["a"]], [[["a"], "png"]]):
        with pytest.raises(CorruptCacheError):
            Manifest.from_doc({**doc, "codecs": bad}, "m")
