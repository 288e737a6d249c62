"""The HPC recipes of docs/distributed.md, as far as they run without a batch system."""

from __future__ import annotations

import os

import pytest

from dist_datasets import EDCACHE, HERE, SRC, Proc, Squares, free_port, subprocess_env, tree_files
from edcache import CachedDataset
from edcache.distributed.security import ensure_credentials, make_security

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def _local_reference(tmp_path, n: int, chunk: int) -> dict:
    root = str(tmp_path / "local")
    CachedDataset(Squares(root, n=n, delay=0), chunk_size=chunk, num_workers=0, progress=False)
    return tree_files(os.path.join(root, "cached"))


def test_dask_jobqueue_workers_with_edcache_credentials(tmp_path, monkeypatch):
    """dask-jobqueue's job script (run by its local test backend instead of sbatch) joins over TLS."""
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue.local import LocalCluster as JobQueueLocal
    from distributed import Client

    creds, _ = ensure_credentials(str(tmp_path / "cluster.pem"))
    sec = make_security(creds)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SRC, HERE]))  # the "job" inherits it
    cluster = JobQueueLocal(
        cores=1, processes=1, memory="1GB", protocol="tls://", security=sec,
        # (no dashboard: Dask would add its placeholder route to the global config)
        scheduler_options={"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"},
        worker_extra_args=["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
    )
    try:
        script = cluster.job_script()
        assert f"--tls-key {creds}" in script and "tls://127.0.0.1:" in script
        cluster.scale(jobs=2)
        with Client(cluster, security=sec) as client:
            client.wait_for_workers(2, timeout=90)
            root = str(tmp_path / "dist")
            CachedDataset(Squares(root, n=40, delay=0.002), chunk_size=8, scheduler=client, progress=False)
    finally:
        cluster.close()
    assert tree_files(os.path.join(root, "cached")) == _local_reference(tmp_path, 40, 8)


def test_array_job_style_workers(tmp_path):
    """`sbatch --array=1-N --wrap "edcache --address ..."`: N independent worker commands."""
    creds, _ = ensure_credentials(str(tmp_path / "cluster.pem"))
    port = free_port()
    root = str(tmp_path / "dist")
    env = subprocess_env(EDCACHE_TEST_ROOT=root, EDCACHE_TEST_N="48", EDCACHE_TEST_DELAY="0.005")
    procs = []
    try:
        for task_id in range(1, 4):  # what each array task runs, started before the server
            procs.append(Proc(f"task{task_id}", [*EDCACHE, "--address", f"127.0.0.1:{port}",
                                                 "--dataset", "dist_datasets.make", "--credentials", creds,
                                                 "--nworkers", "1", "--timeout", "15"],
                              dict(env, SLURM_ARRAY_TASK_ID=str(task_id)), str(tmp_path)))
        server = Proc("server", [*EDCACHE, "--server", "--dataset", "dist_datasets.make", "--host",
                                 "127.0.0.1", "--port", str(port), "--chunk-size", "8",
                                 "--credentials", creds], env, str(tmp_path))
        procs.append(server)
        assert server.wait(120) == 0, server.output()
        told = 0
        for p in procs[:-1]:
            # a task whose worker the server reached at the end is told the cache is
            # complete: 0. One that came too late (its worker registered after the server
            # said so, or not before it stopped) finds no server for --timeout seconds: 1,
            # as an array task that starts after the job has ended does.
            code = p.wait(60)
            if "reports the cache complete" in p.stderr():
                told += 1
                assert code == 0, p.output()
            else:
                assert code == 1 and "giving up" in p.stderr(), p.output()
        assert told >= 1
    finally:
        for p in procs:
            p.stop()
    assert tree_files(os.path.join(root, "cached")) == _local_reference(tmp_path, 48, 8)
