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
    from edcache.format.columnar.log import read_log

    cache_dir = str(tmp_path / "cached" / "dies")
    assert read_log(cache_dir).committed <= 1  # chunks are committed in order: 1 is not


# -- items 18, 19: torch in build workers ----------------------------------------------------
TORCH_SCRIPT = """
import sys
import torch
from edcache import CachedDataset, DatasetMixin


class TorchOps(DatasetMixin):
    name = "torchops"

    def __init__(self, root):
        self.root = root

    def __len__(self):
        return 48

    def get_example(self, i):
        x = torch.randn(192, 192, generator=torch.Generator().manual_seed(i))
        y = (x @ x).relu().mean(0)
        return {{"y": y.numpy(), "threads": torch.get_num_threads()}}


if __name__ == "__main__":
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    (a @ a).sum()  # the parent has used torch's intra-op thread pool
    ds = CachedDataset(TorchOps(sys.argv[1]), chunk_size=8, num_workers=2, progress=False,
                       mp_context={mp_context!r})
    print("threads in workers:", sorted({{int(ds[i]["threads"]) for i in range(len(ds))}}))
    print("threads in parent:", torch.get_num_threads())
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mp_context", [None, "spawn", "forkserver"])
def test_torch_parent_threads_then_build_does_not_hang_and_workers_use_one_thread(tmp_path, mp_context):
    """The exact scenario of issue 16 item 18 (default fork pool; the build hung forever),
    and item 19: each build worker runs torch with one thread, as DataLoader workers do."""
    pytest.importorskip("torch")
    script = tmp_path / "build_with_torch.py"
    script.write_text(TORCH_SCRIPT.format(mp_context=mp_context))
    env = dict(os.environ, PYTHONPATH=SRC)
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "root")], capture_output=True,
                              text=True, timeout=120, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("the build hung (torch used in the parent, then a pool of workers running torch ops)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "threads in workers: [1]" in proc.stdout
    assert "threads in parent: 2" in proc.stdout  # the calling process is left alone


# -- item 20: spawn without a __main__ guard ---------------------------------------------------
UNGUARDED_SCRIPT = """
import sys
from edcache import CachedDataset, DatasetMixin


class Numbers(DatasetMixin):
    name = "numbers"
    root = {root!r}

    def __len__(self):
        return 20

    def get_example(self, i):
        return {{"i": i}}


# no `if __name__ == "__main__":` guard
ds = CachedDataset(Numbers(), chunk_size=4, num_workers=2, progress=False, mp_context={method!r})
print("built", len(ds))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawn_without_main_guard_fails_with_advice_instead_of_hanging(tmp_path, method):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT.format(root=str(tmp_path / "root"), method=method))
    env = dict(os.environ, PYTHONPATH=SRC)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=120, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("the build hung: spawned workers re-ran the unguarded script and waited on the lock")
    assert proc.returncode != 0
    assert "built" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("edcache.errors.BuildError: the worker processes died while starting"), last
    assert 'if __name__ == "__main__":' in last and "mp_context='fork'" in last
    # the children said why, too
    assert "is a worker process that is re-running the main script" in proc.stderr


def test_guarded_spawn_script_builds(tmp_path):
    script = tmp_path / "guarded.py"
    body = UNGUARDED_SCRIPT.format(root=str(tmp_path / "root"), method="spawn")
    head, _, tail = body.partition("# no `if __name__")
    tail = tail.split("\n", 1)[1]
    script.write_text(head + 'if __name__ == "__main__":\n' + textwrap.indent(tail, "    "))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=SRC), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built 20" in proc.stdout
