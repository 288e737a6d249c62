"""Malicious files (issue 6, suite 3): a format-v2 cache whose files (column data and
index files, labels, manifest, checksums.npy, commits.log) are replaced, one at a time,
by pickles whose ``__reduce__`` would create a marker file. Opening, reading, labels,
``verify``, ``info`` and ``convert`` never execute them. For the four datasets (mixed
values, uniform, variable-shape, mixed-schema), complete and incomplete; plus a
well-formed record column of pickled values whose sizes and checksums a rewritten
manifest and ``checksums.npy`` vouch for. (The edflow zip side is covered by
tests/test_legacy_*.)
"""

from __future__ import annotations

import io
import os
import pickle
import shutil

import numpy as np
import pytest

from edcache import CachedDataset
from edcache.errors import EdcacheError, UnsafePickleError
from edcache.format.columnar.manifest import read_manifest, write_manifest
from edcache.verify import verify_cache

from reliability_datasets import DATASETS, MixedDataset, SlowDataset, mixed_example

NAME = "evil"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class ShellPayload(Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payloads(marker: str) -> dict[str, bytes]:
    """Pickles of every protocol, plus a .npy of an object array (pickled elements)."""
    out = {f"pickle-p{p}": pickle.dumps(Payload(marker), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)}
    out["pickle-os.system"] = pickle.dumps(ShellPayload(marker))
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)] * 3, dtype=object), allow_pickle=True)
    out["npy-object"] = buf.getvalue()
    out["pickle-in-dict"] = pickle.dumps({"label": Payload(marker), "v": [Payload(marker)]})
    return out


#: reference state -> (complete, dataset kind)
STATES = {
    "slow-complete": (True, "slow"), "slow-incomplete": (False, "slow"),
    "uniform-complete": (True, "uniform"), "ragged-complete": (True, "ragged"),
    "mixed-complete": (True, "mixed"), "mixed-incomplete": (False, "mixed"),
}
#: CI plants 2 of the 9 payloads in each file (rotating, so every payload lands in
#: some files); ``-m long`` plants all 9 in every file
CI_PAYLOADS = 2


def _build(root: str, complete: bool, dataset: type = SlowDataset) -> str:
    ds = dataset(root, NAME, 24, fail_at=None if complete else 20)
    try:
        CachedDataset(ds, chunk_size=8, num_workers=0, progress=False)
    except EdcacheError:
        assert not complete
    return os.path.join(root, "cached", NAME)


def _cache_files(cache_dir: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), cache_dir) for d, _, fs in os.walk(cache_dir) for f in fs
    )


def _every_operation(root: str, cache_dir: str, marker: str, dataset: type = SlowDataset) -> int:
    """Run every reading operation; return how many raised an EdcacheError."""
    refused = 0

    def attempt(fn):
        nonlocal refused
        try:
            fn()
        except EdcacheError:
            refused += 1
        assert not os.path.exists(marker), f"a payload ran during {fn.__name__}"

    for verify in (False, True):
        def open_and_read_all(verify=verify):
            ds = CachedDataset.from_cache(root, NAME, verify=verify)
            for i in range(len(ds)):
                try:
                    ds[i]
                except EdcacheError:
                    pass
            ds.get_batch(list(range(min(len(ds), 8))))

        def labels(verify=verify):
            CachedDataset.from_cache(root, NAME, verify=verify).labels

        attempt(open_and_read_all)
        attempt(labels)

    def construct_with_dataset():
        # a complete cache opens, an incomplete one is resumed: never unpickling anything
        ds = CachedDataset(dataset(root, NAME, 24), chunk_size=8, num_workers=0, progress=False)
        ds[0]
        ds.get_batch([5, 0, 23])
        ds.labels

    def verify():
        report = verify_cache(cache_dir, deep=True)  # (format v2 or not: it must not unpickle)
        if not report.ok:
            raise EdcacheError(str(report))

    def info():
        from edcache.cli.info import describe

        describe(cache_dir)

    def convert():
        from edcache.convert import convert as conv

        dst = os.path.join(os.path.dirname(root), "converted.zip")
        try:
            conv(cache_dir, dst, progress=False)
        finally:
            if os.path.exists(dst):
                os.unlink(dst)

    for fn in (verify, info, convert, construct_with_dataset):  # the last one may write
        attempt(fn)
    return refused


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    base = tmp_path_factory.mktemp("evil-ref")
    refs = {state: _build(str(base / state), complete, DATASETS[kind])
            for state, (complete, kind) in STATES.items()}
    for state, path in refs.items():
        files = _cache_files(path)
        assert any(f.startswith("columns/") for f in files), (state, files)
        assert ("commits.log" in files) == (not STATES[state][0]), (state, files)
    return refs


def _no_payload_ever_runs(references, tmp_path, state, per_file):
    ref = references[state]
    dataset = DATASETS[STATES[state][1]]
    marker = str(tmp_path / "PWNED")
    tried = 0
    every = list(payloads(marker).items())
    for n, rel in enumerate(_cache_files(ref)):
        for kind, data in [every[(n * per_file + k) % len(every)] for k in range(per_file)]:
            root = str(tmp_path / f"case-{tried}")
            cache_dir = os.path.join(root, "cached", NAME)
            shutil.copytree(ref, cache_dir)
            with open(os.path.join(cache_dir, rel), "wb") as f:
                f.write(data)
            refused = _every_operation(root, cache_dir, marker, dataset)
            assert refused >= 1, f"{rel} replaced by {kind} went unnoticed"
            # the dataset's own build repairs it (or refuses), still without running it
            try:
                CachedDataset(dataset(root, NAME, 24), chunk_size=8, num_workers=0, progress=False,
                              force_cache=True)
            except EdcacheError:
                pass
            assert not os.path.exists(marker), f"a payload in {rel} ran during a rebuild"
            tried += 1
    print(f"\nmalicious ({state}): {tried} plantings ({len(_cache_files(ref))} files x {per_file} payloads), "
          "0 payloads executed")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("state", sorted(STATES))
def test_no_payload_ever_runs(references, tmp_path, state):
    _no_payload_ever_runs(references, tmp_path, state, CI_PAYLOADS)


@pytest.mark.long
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("state", sorted(STATES))
def test_no_payload_ever_runs_long(references, tmp_path, state):
    _no_payload_ever_runs(references, tmp_path, state, len(payloads("x")))


def test_pickled_value_in_shard_needs_opt_in(tmp_path):
    """A cache built with allow_pickle=True holds pickles: refused without the opt-in, and
    still refused when the manifest is rewritten to claim allow_pickle=False."""
    marker = str(tmp_path / "PWNED")

    class Evil(SlowDataset):
        def get_example(self, i):
            ex = super().get_example(i)
            ex["trap"] = Payload(marker)
            return ex

    root = str(tmp_path / "r")
    # build in this process (the class is local); pickling the value does not run it
    ds = CachedDataset(Evil(root, NAME, 16), chunk_size=8, num_workers=0, progress=False,
                       allow_pickle=True)
    path = ds.path
    del ds
    assert not os.path.exists(marker)
    with pytest.raises(UnsafePickleError, match="was built with allow_pickle=True"):
        CachedDataset.from_cache(root, NAME)
    m = read_manifest(path)
    m.allow_pickle = False
    write_manifest(path, m)  # a well-formed, checksummed manifest that lies
    ds = CachedDataset.from_cache(root, NAME)
    with pytest.raises(UnsafePickleError, match="holds a pickled value"):
        ds[3]
    assert verify_cache(path).ok  # bytes intact
    deep = verify_cache(path, deep=True)  # decoding refused (the manifest lies), nothing run
    assert not deep.ok and "pickled value" in str(deep) and (0, 8) in deep.damaged_ranges, str(deep)
    assert not os.path.exists(marker)


def _forge_record_column(cache_dir: str, key: str, values: list) -> None:
    """Replace the record column ``key`` by a well-formed one holding ``values``
    (encoded with allow_pickle=True) and rewrite ``checksums.npy`` and the manifest
    (sizes, per-chunk checksums, the table's checksum) to vouch for it."""
    import xxhash

    from edcache.format.columnar.records import encode_row
    from edcache.format.shards.codec import Encoder

    m = read_manifest(cache_dir)
    spec = next(c for c in m.schema.columns if c.key == key)
    assert spec.kind == "record", spec
    data_rel, index_rel = spec.files()
    enc = Encoder(allow_pickle=True)
    rows = [encode_row(v, enc) for v in values]  # pickling runs nothing
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype("<u8")
    data, index = b"".join(rows), offsets.tobytes()
    for rel, blob in ((data_rel, data), (index_rel, index)):
        with open(os.path.join(cache_dir, rel), "wb") as f:
            f.write(blob)
    files = m.schema.files()
    table = np.load(os.path.join(cache_dir, "checksums.npy"))
    cs = m.chunk_size
    for c in range(m.num_chunks):
        stop = min((c + 1) * cs, m.length)
        d0, d1 = int(offsets[c * cs]), int(offsets[stop])
        i0, i1 = (0 if c == 0 else 8 * (c * cs + 1)), 8 * (stop + 1)
        for rel, blob, a, b in ((data_rel, data, d0, d1), (index_rel, index, i0, i1)):
            j = files.index(rel)
            table[c, j] = (b, xxhash.xxh3_64_intdigest(blob[a:b]))
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    with open(os.path.join(cache_dir, "checksums.npy"), "wb") as f:
        f.write(buf.getvalue())
    m.files = [(f, len(data) if f == data_rel else len(index) if f == index_rel else n) for f, n in m.files]
    m.table = {"nbytes": len(buf.getvalue()), "xxh3": xxhash.xxh3_64_hexdigest(buf.getvalue())}
    write_manifest(cache_dir, m)  # a manifest that vouches for the planted file


def test_pickled_records_in_forged_column_never_run(references, tmp_path):
    """The ``meta`` record column of a complete mixed-schema cache replaced by a
    well-formed column of 24 rows holding pickled values (ext 6), with
    ``checksums.npy`` and the manifest rewritten (checksummed) to record its sizes and
    per-chunk checksums: every read refuses the pickles (the manifest says
    allow_pickle=False), ``verify=True`` too, nothing runs, and a forced rebuild does
    not run them either."""
    marker = str(tmp_path / "PWNED")
    root = str(tmp_path / "r")
    cache_dir = os.path.join(root, "cached", NAME)
    shutil.copytree(references["mixed-complete"], cache_dir)
    values = []
    for i in range(24):
        meta = dict(mixed_example(i)["meta"])
        meta["trap"] = Payload(marker) if i % 2 else ShellPayload(marker)
        values.append(meta)
    _forge_record_column(cache_dir, "meta", values)
    assert not os.path.exists(marker)
    refused = _every_operation(root, cache_dir, marker, MixedDataset)
    assert refused >= 4, "reads of pickled records were not refused"
    for verify in (False, True):
        ds = CachedDataset.from_cache(root, NAME, verify=verify)  # checksums match: opens
        for i in (0, 1, 23):
            with pytest.raises(UnsafePickleError, match="holds a pickled value"):
                ds[i]
        with pytest.raises(UnsafePickleError):
            ds.get_batch([0, 1])
    try:
        CachedDataset(MixedDataset(root, NAME, 24), chunk_size=8, num_workers=0, progress=False,
                      force_cache=True)
    except EdcacheError:
        pass
    assert not os.path.exists(marker)
