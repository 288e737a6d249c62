"""Build throughput: the Dask backend against the local process pool, same CPU-bound dataset.

Run from the repository root::

    PYTHONPATH=src python -m bench.dask_build [--n 2000] [--repeats 3] [--workers 2]

Both sides use ``--workers`` single-threaded worker processes on this machine and the
same chunk size, and build the same cache from scratch:

* **pool**: ``CachedDataset(ds, num_workers=W)`` (``LocalPoolExecutor``, forkserver);
  timed from the call to the complete cache, pool start-up included.
* **dask**: what ``edcache --server --local-workers W`` runs: an in-process TLS
  scheduler with W nanny-supervised worker processes; the build goes through
  ``CachedDataset(ds, scheduler=client)`` (``DaskExecutor``: results fetched from the
  workers over TLS and committed as they arrive).
  Timed from the call to the complete cache, with the cluster already running (workers
  in ``edcache --address`` mode are long-lived), through one persistent client as in
  ``edcache --server``; the cluster's own start-up is reported separately.

Two payloads: ``small`` (a 32x32x3 image per example: compute-bound) and ``large``
(a 256x256x3 image per example: 12 MB per chunk through TLS). Each is also built in
``--shared-fs`` mode (workers write the shards, only metadata travels). The figure of
merit is the throughput ratio dask/pool (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from edcache import CachedDataset, DatasetMixin


class CpuBound(DatasetMixin):
    """``work`` iterations of pure-Python integer arithmetic per example (holds the GIL)."""

    def __init__(self, root: str, n: int, work: int, side: int) -> None:
        self.root, self.n, self.work, self.side = root, n, work, side
        self.name = f"cpubound-{side}"
        self.in_memory_keys = ["label"]

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict:
        acc = i
        for k in range(self.work):
            acc = (acc * 1103515245 + 12345 + k) & 0xFFFFFFFF
        image = np.random.default_rng(i).integers(0, 256, (self.side, self.side, 3), dtype=np.uint8)
        return {"image": image, "label": i % 10, "acc": acc}


def time_example(work: int) -> float:
    ds = CpuBound("/tmp", 50, work, 32)
    t = time.perf_counter()
    for i in range(50):
        ds[i]
    return (time.perf_counter() - t) / 50


def run_pool(ds_args: tuple, workers: int, chunk: int) -> float:
    root = tempfile.mkdtemp(prefix="edcache-bench-pool-")
    try:
        ds = CpuBound(root, *ds_args)
        t = time.perf_counter()
        CachedDataset(ds, chunk_size=chunk, num_workers=workers, progress=False)
        return time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _SharedFsCachedDataset(CachedDataset):
    """What ``edcache --server --shared-fs`` builds with: workers write the shard files."""

    def _executor(self, num_workers: int) -> object:
        from edcache.distributed.executor import DaskExecutor

        return DaskExecutor(self.scheduler, staged=True)


def run_dask(ds_args: tuple, client: object, chunk: int, shared_fs: bool = False) -> float:
    root = tempfile.mkdtemp(prefix="edcache-bench-dask-")
    try:
        ds = CpuBound(root, *ds_args)
        cls = _SharedFsCachedDataset if shared_fs else CachedDataset
        t = time.perf_counter()
        cls(ds, chunk_size=chunk, scheduler=client, progress=False)
        return time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="examples (default 2000)")
    ap.add_argument("--ms", type=float, default=5.0, help="target CPU ms per example (default 5)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--payloads", default="small,large")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    from edcache.distributed.security import ensure_credentials, make_security
    from edcache.distributed.config import dask_config
    from edcache.distributed.server import InProcessCluster

    import dask

    dask.config.set(dask_config())
    per_unit = time_example(10_000) / 10_000
    work = max(1, int(args.ms / 1000 / per_unit))
    print(f"{os.cpu_count()} cores, python {sys.version.split()[0]}; {args.n} examples, "
          f"~{time_example(work) * 1000:.1f} ms CPU each, chunk {args.chunk_size}, "
          f"{args.workers} worker processes, {args.repeats} repeats (median)", flush=True)

    tmp = tempfile.mkdtemp(prefix="edcache-bench-creds-")
    creds, _ = ensure_credentials(os.path.join(tmp, "cluster.pem"))
    t = time.perf_counter()
    cluster = InProcessCluster(host="127.0.0.1", port=0, security=make_security(creds),
                               local_workers=args.workers)
    results: dict = {"n": args.n, "workers": args.workers, "chunk_size": args.chunk_size, "payloads": {}}
    try:
        cluster.start()
        while cluster.n_workers() < args.workers:
            time.sleep(0.05)
        client = cluster.client()  # the server's coordinator keeps one client for the build
        startup = time.perf_counter() - t
        results["dask_cluster_startup_s"] = startup
        print(f"dask cluster start-up (scheduler + {args.workers} workers, TLS): {startup:.2f} s")
        for payload in args.payloads.split(","):
            side = {"small": 32, "large": 256}[payload]
            ds_args = (args.n, work, side)
            run_dask((args.chunk_size * 2, work, side), client, args.chunk_size)  # warm-up
            pool_t, dask_t, shared_t = [], [], []
            for _ in range(args.repeats):  # interleaved, so drifts hit all sides alike
                pool_t.append(run_pool(ds_args, args.workers, args.chunk_size))
                dask_t.append(run_dask(ds_args, client, args.chunk_size))
                shared_t.append(run_dask(ds_args, client, args.chunk_size, shared_fs=True))
            p, d, sh = (statistics.median(t) for t in (pool_t, dask_t, shared_t))
            mb = args.n * side * side * 3 / 1e6
            results["payloads"][payload] = {
                "pool_s": pool_t, "dask_s": dask_t, "dask_shared_fs_s": shared_t,
                "pool_ex_per_s": args.n / p, "dask_ex_per_s": args.n / d,
                "dask_shared_fs_ex_per_s": args.n / sh, "ratio": p / d, "ratio_shared_fs": p / sh,
                "payload_mb": mb,
            }
            print(f"{payload:5s} ({mb:4.0f} MB): pool {args.n / p:6.1f} ex/s   dask {args.n / d:6.1f} ex/s "
                  f"(dask/pool = {p / d:.2f}x)   dask --shared-fs {args.n / sh:6.1f} ex/s "
                  f"({p / sh:.2f}x)", flush=True)
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
