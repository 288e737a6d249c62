"""Ctrl-C and dying worker processes during a local build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from edcache import CachedDataset
from edcache.format.columnar.log import read_log
from core_datasets import DiesOnce, Toy, expected
from helpers import assert_same

TESTS = os.path.dirname(__file__)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}

BUILD = """
import sys
from edcache import CachedDataset
from core_datasets import Toy
CachedDataset(Toy(sys.argv[1], n=400, delay=0.01), num_workers=2, chunk_size=20, progress=False)
"""


def test_ctrl_c_stops_promptly_and_keeps_committed_chunks(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "cached" / "toy"
    deadline = time.time() + 60
    while time.time() < deadline:
        state = read_log(str(cache)) if cache.exists() else None
        if state is not None and state.committed >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert time.time() - sent < 10  # stops promptly: the workers are not waited for
    committed = read_log(str(cache)).committed  # chunks 0 .. committed-1
    assert 2 <= committed < 20
    ds = CachedDataset(Toy(tmp_path, n=400), num_workers=0, chunk_size=20, progress=False)
    assert_same(ds[399], {**expected(399), "index_": 399})
    assert not [n for d, _, fs in os.walk(cache) for n in fs if n.startswith(".tmp-")]


def test_worker_process_death_is_survived(tmp_path):
    marker = tmp_path / "died"
    ds = CachedDataset(DiesOnce(tmp_path, n=120, die_at=70, marker=str(marker)), num_workers=2,
                       chunk_size=10, progress=False)
    assert marker.exists()  # a worker really died
    assert ds.complete
    for i in (0, 70, 119):
        assert_same(ds[i], {**expected(i), "index_": i})
