"""Processes: DataLoader workers (fork and spawn), SIGKILL then resume, concurrent builders, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edcache import CachedDataset, PathCachedDataset, cachable
from edcache.errors import CacheMismatchError
from edcache.format.columnar.log import read_log
from core_datasets import Toy, expected
from helpers import assert_same, tree_bytes

TESTS = os.path.dirname(__file__)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}


def keep_list(batch):
    return batch


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_yield_what_indexing_yields(tmp_path, method):
    torch = pytest.importorskip("torch")
    ds = CachedDataset(Toy(tmp_path, n=130), num_workers=0, progress=False)
    ds[0]  # open the reader in the parent: workers must not reuse its handles blindly
    loader = torch.utils.data.DataLoader(
        ds, batch_size=16, num_workers=2, multiprocessing_context=method,
        collate_fn=keep_list,
    )
    seen = [ex for batch in loader for ex in batch]
    assert [ex["index_"] for ex in seen] == list(range(130))
    for ex in seen[::17]:
        assert_same(ex, ds[ex["index_"]])


BUILD = """
import sys
from edcache import CachedDataset
from edcache.format.columnar.log import read_log
from core_datasets import Toy
CachedDataset(Toy(sys.argv[1], n=int(sys.argv[2]), delay=float(sys.argv[3]), log_dir=sys.argv[4] or None),
              num_workers=int(sys.argv[5]), chunk_size=16, progress=False)
"""


def _build_cmd(root, n, delay, log="", workers=2):
    return [sys.executable, "-c", BUILD, str(root), str(n), str(delay), str(log), str(workers)]


def test_sigkill_then_resume_gives_identical_cache(tmp_path):
    reference = tmp_path / "ref"
    CachedDataset(Toy(reference, n=160), num_workers=0, chunk_size=16, progress=False)
    root = tmp_path / "killed"
    cache = root / "cached" / "toy"
    for attempt in range(2):
        proc = subprocess.Popen(_build_cmd(root, 160, 0.01), env=ENV, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until some chunks are committed
            state = read_log(str(cache)) if cache.exists() else None
            if state is not None and state.committed >= 2 + 3 * attempt:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cache / "checksums.npy").exists()  # it really was interrupted
    ds = CachedDataset(Toy(root, n=160), num_workers=0, chunk_size=16, progress=False)
    assert ds.complete
    assert tree_bytes(cache) == tree_bytes(reference / "cached" / "toy")


def test_concurrent_builders_build_once(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    procs = [subprocess.Popen(_build_cmd(tmp_path, 96, 0.005, log, workers=1), env=ENV) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    indices = sorted(int(name.split("-")[0]) for name in os.listdir(log))
    assert indices == list(range(96))  # every example computed exactly once
    ds = CachedDataset.from_cache(str(tmp_path), "toy")
    assert_same(ds[95], {**expected(95), "index_": 95})


def test_cachable_and_path_cached_dataset(tmp_path):
    path = str(tmp_path / "store" / "toy-cache")
    calls = []

    @cachable(path, num_workers=0, progress=False)
    def make(n, tag="a"):
        calls.append(n)
        return Toy(tmp_path, n=n)

    first = make(40)
    second = make(40)
    assert calls == [40]  # the second call opens the cache without calling the function
    assert_same(second[39], {**expected(39), "index_": 39})
    assert isinstance(first, PathCachedDataset)
    with pytest.raises(CacheMismatchError, match="was built by .*make with the arguments"):
        make(41)
    with pytest.raises(CacheMismatchError):
        make(40, tag="b")
    opened = PathCachedDataset(None, path)
    np.testing.assert_array_equal(opened.labels["cls"], np.arange(40) % 7)


def test_cachable_resumes_an_interrupted_build(tmp_path):
    path = str(tmp_path / "c")

    @cachable(path, num_workers=0, progress=False, chunk_size=10)
    def make(fail):
        return Toy(tmp_path, n=30, fail_at=25 if fail else None)

    with pytest.raises(Exception, match="broken example 25"):
        make(True)
    # the arguments differ, so the partial cache must not be reused silently
    with pytest.raises(CacheMismatchError):
        make(False)


def test_cli_build_and_info(tmp_path):
    env = {**ENV, "EDCACHE_TEST_ROOT": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "edcache.cli.main", "--dataset", "core_datasets.make_toy", "--workers", "2",
         "--chunk-size", "32", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"cache complete: {tmp_path}/cached/toy (150 examples)" in run.stdout
    info = subprocess.run([sys.executable, "-m", "edcache.cli.main", "info", f"{tmp_path}/cached/toy"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "examples:    150" in info.stdout and "complete:    yes" in info.stdout
    assert "cls: int64 (150,)" in info.stdout and "split: <U5 (150,)" in info.stdout
    assert "format:      edcache v2" in info.stdout and "columns:" in info.stdout
    assert "  'image': fixed" in info.stdout
    bad = subprocess.run([sys.executable, "-m", "edcache.cli.main", "--dataset", "nope.factory"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "edcache: error: --dataset 'nope.factory': cannot import module 'nope'" in bad.stderr


def test_cli_demo_small(tmp_path):
    pytest.importorskip("PIL")
    run = subprocess.run(
        [sys.executable, "-m", "edcache.cli.main", "demo", "--root", str(tmp_path), "-n", "40",
         "--workers", "2", "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "random reads, cached:" in run.stdout
    assert "labels: 32 train / 8 validation examples" in run.stdout


def test_script_without_main_guard_builds_on_the_pool(tmp_path):
    script = tmp_path / "build_it.py"
    script.write_text(
        "import numpy as np\n"
        "from edcache import CachedDataset, DatasetMixin\n"
        "class Local(DatasetMixin):  # defined in __main__, no if __name__ guard\n"
        f"    root = {str(tmp_path)!r}\n"
        "    name = 'local'\n"
        "    def __len__(self): return 100\n"
        "    def get_example(self, i): return {'x': np.arange(3) + i}\n"
        "ds = CachedDataset(Local(), num_workers=2, chunk_size=10, progress=False)\n"
        "print(int(ds[99]['x'][0]))\n"
    )
    run = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "99"
