"""Issue 16 hardening of the local worker pool: naming the chunk a worker died on
(item 14), torch threads in build workers (items 18, 19), spawn without a
``__main__`` guard (item 20)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edcache
from edcache import CachedDataset, DatasetMixin
from edcache.errors import BuildError

SRC = os.path.dirname(os.path.dirname(os.path.abspath(edcache.__file__)))  # the edcache under test


class DiesAt(DatasetMixin):
    """Its worker process dies (``os._exit`` or a segfault) whenever it reaches ``at``."""

    def __init__(self, root, at, how="exit", n=12):
        self.root, self.name, self.n, self.at, self.how = str(root), "dies", n, at, how

    def __len__(self):
        return self.n

    def get_example(self, i):
        if i == self.at:
            if self.how == "exit":
                os._exit(9)
            import ctypes

            ctypes.string_at(0)  # SIGSEGV
        return {"i": i, "x": np.full(4, i)}


# -- item 14: name the chunk and example a worker died on -----------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how,reason", [("exit", "exit code 9"), ("segv", "killed by SIGSEGV")])
def test_worker_death_names_the_chunk_and_example_it_died_on(tmp_path, how, reason):
    with pytest.raises(BuildError) as err:
        CachedDataset(DiesAt(tmp_path, 3, how), chunk_size=2, num_workers=2, progress=False)
    msg = str(err.value)
    assert f"a worker process died ({reason}) 3 times while example 3 (chunk 1) was being computed" in msg
    for other in (0, 2, 3, 4, 5):
        assert f"chunk {other}" not in msg
    # chunks that finished are committed; the chunk that kills its worker is not
    from edcache.format.shards.manifest import read_commits, read_manifest

    cache_dir = str(tmp_path / "cached" / "dies")
    assert 1 not in read_commits(cache_dir, read_manifest(cache_dir).num_chunks)
