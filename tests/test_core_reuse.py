"""Issue 16 item 2: a dataset that decodes into one preallocated buffer (and returns the
same dict every call) is cached correctly everywhere: each example is taken apart as
soon as the dataset returns it, in-process, in the local pool, on Dask, for both
formats."""

from __future__ import annotations

import numpy as np
import pytest

from edcache import CachedDataset
from test_core_format_v2 import ReusesBuffer


def _check(ds, n=40):
    for i in range(n):
        ex = ds[i]
        assert (ex["image"] == i).all() and (ex["meta"]["arr"] == i).all(), i
        assert ex["boxes"].shape == (i % 3, 4) and (ex["boxes"] == -i).all(), i


class ReusesLabels(ReusesBuffer):
    in_memory_keys = ["image"]  # a label that is the reused array itself


@pytest.mark.parametrize("workers", [0, 2])
def test_edflow_zip_of_a_reusing_dataset(tmp_path, workers):
    ds = CachedDataset(ReusesLabels(tmp_path), _legacy=True, chunk_size=8, num_workers=workers,
                       progress=False)
    assert ds.path.endswith(".zip")
    _check(CachedDataset.from_cache(str(tmp_path), "reuse"))
    labels = ds.labels["image"]
    assert [int(np.asarray(labels[i]).flat[0]) for i in range(40)] == list(range(40))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_dask_build_of_a_reusing_dataset(tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    # (in-process: no network at all)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        ds = CachedDataset(ReusesBuffer(tmp_path), chunk_size=8, scheduler=client, progress=False)
    _check(ds)
