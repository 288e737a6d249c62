"""Reading a cache through torch's DataLoader prints no warning (issue 11 item 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = """
import warnings
import torch
from torch.utils.data import DataLoader
from edcache import CachedDataset
from parity_datasets import Images

ds = CachedDataset(Images({root!r}), num_workers=0, progress=False)
ex = ds[3]
assert not ex["image"].flags.writeable and ex["image"].base is not None  # still zero-copy views
if __name__ == "__main__":
    for mode in ("fork", "spawn"):
        loader = DataLoader(ds.subset(list(range(0, 40, 2))) if mode == "spawn" else ds,
                            batch_size=8, num_workers=2, multiprocessing_context=mode,
                            collate_fn=None)
        for epoch in range(3 if mode == "fork" else 1):  # spawned workers import torch: slow
            for batch in loader:
                assert batch["image"].dtype == torch.uint8
    for batch in DataLoader(ds, batch_size=8, num_workers=0):
        pass
    # the filter is that narrow: the same warning from other code still shows
    import numpy as np
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        warnings.warn_explicit("The given NumPy array is not writable", UserWarning, "user.py", 1,
                               module="user")
    assert len(seen) == 1, seen
    print("done")
"""


def test_dataloader_over_a_cache_prints_no_warning(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent(SCRIPT.format(root=str(tmp_path))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, *sys.path]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "not writable" not in proc.stderr and "UserWarning" not in proc.stderr, proc.stderr
