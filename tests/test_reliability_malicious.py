"""Malicious files (issue 6, suite 3): a new-format cache whose files are replaced, one at a
time, by pickles whose ``__reduce__`` would create a marker file. Opening, reading,
labels, ``verify``, ``info`` and ``convert`` never execute them. Also for a packed cache
(:class:`UniformDataset`: ``packed.shard``), including a well-formed packed.shard full of
pickled records whose size and checksum the manifest was rewritten to match. (The
edflow zip side is covered by tests/test_legacy_*.)
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
from edcache.format.shards.manifest import read_manifest, write_manifest
from edcache.verify import verify_cache

from reliability_datasets import DATASETS, SlowDataset, UniformDataset, uniform_example

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
STATES = {"complete": (True, "slow"), "incomplete": (False, "slow"), "packed": (True, "uniform")}


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
        report = verify_cache(cache_dir, deep=True)
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
    assert "packed.shard" in os.listdir(refs["packed"]) and "shards" not in os.listdir(refs["packed"])
    return refs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("state", ["complete", "incomplete", "packed"])
def test_no_payload_ever_runs(references, tmp_path, state):
    ref = references[state]
    dataset = DATASETS[STATES[state][1]]
    marker = str(tmp_path / "PWNED")
    tried = 0
    for rel in _cache_files(ref):
        for kind, data in payloads(marker).items():
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
    print(f"\nmalicious ({state}): {tried} files x payloads planted, 0 payloads executed")


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
    assert verify_cache(path, deep=True).ok  # bytes intact; decoding refused, nothing run
    assert not os.path.exists(marker)


def test_pickled_records_in_packed_shard_never_run(references, tmp_path):
    """packed.shard replaced by a well-formed shard of 24 records holding pickled values
    (ext 6), and the manifest rewritten (checksummed) to record its size and checksum:
    every read refuses the pickles (the manifest says allow_pickle=False), nothing runs,
    and a forced rebuild does not run them either."""
    from edcache.format.shards.shard import checksum, encode_shard

    marker = str(tmp_path / "PWNED")
    root = str(tmp_path / "r")
    cache_dir = os.path.join(root, "cached", NAME)
    shutil.copytree(references["packed"], cache_dir)
    examples = []
    for i in range(24):
        ex = uniform_example(i)
        ex["trap"] = Payload(marker) if i % 2 else ShellPayload(marker)
        examples.append(ex)
    data = encode_shard(examples, 0, None, allow_pickle=True)  # pickling runs nothing
    with open(os.path.join(cache_dir, "packed.shard"), "wb") as f:
        f.write(data)
    m = read_manifest(cache_dir)
    m.packed = {"nbytes": len(data), "xxh3": checksum(data)}
    write_manifest(cache_dir, m)  # a manifest that vouches for the planted file
    assert not os.path.exists(marker)
    refused = _every_operation(root, cache_dir, marker, UniformDataset)
    assert refused >= 4, "reads of pickled records were not refused"
    for verify in (False, True):
        ds = CachedDataset.from_cache(root, NAME, verify=verify)
        for i in (0, 1, 23):
            with pytest.raises(UnsafePickleError, match="holds a pickled value"):
                ds[i]
        with pytest.raises(UnsafePickleError):
            ds.get_batch([0, 1])
    try:
        CachedDataset(UniformDataset(root, NAME, 24), chunk_size=8, num_workers=0, progress=False,
                      force_cache=True)
    except EdcacheError:
        pass
    assert not os.path.exists(marker)
