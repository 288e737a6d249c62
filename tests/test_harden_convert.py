"""Issue 16 item 16 (a killed ``edcache convert`` resumes and leaves nothing behind) and
issue 11 item 17 (no lock file, no ``_ReaderDataset`` identity, any cache opens by path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edcache
from edcache import CachedDataset, DatasetMixin, PathCachedDataset
from edcache.convert import convert
from edcache.verify import verify_cache
from legacy_writer import IN_MEMORY_KEYS, assert_same, edflow_example, edflow_run

SRC = os.path.dirname(os.path.dirname(os.path.abspath(edcache.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
N = 20


def edflow_zip(tmp_path):
    path = str(tmp_path / "old" / "cached" / "faces.zip")
    edflow_run(path, N)
    return path


def killed_convert(src, dst, kill_in):
    """Run ``convert(src, dst)`` in a subprocess that SIGKILLs itself in ``kill_in``
    (``"verify"``: while checking the output; ``"zip"``: while writing a zip copy)."""
    code = f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS!r})
        import edcache.convert as c
        if {kill_in!r} == "verify":
            def verify(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)
            c._verify = verify
        else:
            calls = []
            example = c._LegacySource.example
            def dying(self, i):
                calls.append(i)
                if len(calls) == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return example(self, i)
            c._LegacySource.example = dying
        c.convert({src!r}, {dst!r}, progress=False)
        """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=SRC))
    assert proc.returncode == -9, proc.stderr[-2000:]


def leftovers(dst):
    """Files beside DST other than DST and edflow's completion marker of a zip
    (``<dst>.p``, the length, written for every zip built at a path: issue 11 item 5)."""
    head, tail = os.path.split(dst)
    return sorted(n for n in os.listdir(head) if n not in (tail, tail + ".p"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["zip->dir", "zip->zip", "dir->zip"], ids=lambda k: k)
def test_convert_killed_while_checking_its_output_resumes(tmp_path, kind):
    src = edflow_zip(tmp_path)
    if kind == "dir->zip":
        first = str(tmp_path / "mid" / "faces")
        convert(src, first, progress=False)
        src = first
    dst = str(tmp_path / "new" / ("faces.zip" if kind.endswith("zip") else "faces"))
    killed_convert(src, dst, "verify" if kind != "zip->zip" else "zip")
    convert(src, dst, progress=False)  # before: FileExistsError
    assert leftovers(dst) == []  # no marker, no lock, no temporary copy
    ds = PathCachedDataset(None, dst)
    for i in (0, N - 1):
        assert_same(ds[i], dict(edflow_example(i), index_=i))
    assert verify_cache(dst).ok
    with pytest.raises(FileExistsError):  # a finished conversion is still never overwritten
        convert(src, dst, progress=False)


def test_converted_cache_leaves_no_lock_and_records_no_reader_class(tmp_path):
    src = edflow_zip(tmp_path)
    root = tmp_path / "new"
    dst = str(root / "cached" / "faces")
    convert(src, dst, progress=False)
    assert os.listdir(root / "cached") == ["faces"]
    manifest = json.loads((root / "cached" / "faces" / "manifest.json").read_text())
    assert manifest["dataset"] == ""

    # a real dataset of the same length and labels opens the converted cache
    class Faces(DatasetMixin):
        in_memory_keys = IN_MEMORY_KEYS

        def __init__(self):
            self.root, self.name = str(root), "faces"

        def __len__(self):
            return N

        def get_example(self, i):
            raise AssertionError("the converted cache must be opened, not rebuilt")

    ds = CachedDataset(Faces(), progress=False)
    assert_same(ds[3], dict(edflow_example(3), index_=3))


def test_failed_conversion_leaves_no_marker(tmp_path):
    import pickle
    import zipfile

    from edcache.errors import UnsafePickleError

    src = tmp_path / "evil.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("example_0.p", pickle.dumps({"f": os.system}))  # refused, never called
        zf.writestr("labels.p", pickle.dumps({}))
    dst = str(tmp_path / "out" / "x.zip")
    with pytest.raises(UnsafePickleError):
        convert(str(src), dst, progress=False)
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_any_cache_opens_by_path(tmp_path):
    """A cache outside <root>/cached/<name> opens with PathCachedDataset(None, path)."""
    src = edflow_zip(tmp_path)
    dst = str(tmp_path / "anywhere" / "my-faces")
    convert(src, dst, progress=False)
    ds = PathCachedDataset(None, dst)
    assert len(ds) == N and list(ds.labels) == IN_MEMORY_KEYS
    zipped = PathCachedDataset(None, src)
    assert_same(zipped[4], ds[4])
