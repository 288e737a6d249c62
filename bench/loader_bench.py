"""``ds.loader`` against the loaders a user would otherwise pick (issue 14).

    python -m bench.loader_bench              # quick: 10k small / 150 medium examples
    python -m bench.loader_bench --full       # bench/run.py's sizes (100k small, 1.5k medium)

Batch 64, 2 workers, shuffled, persistent workers, on bench/run.py's small and medium
shapes (same generated data for every store), one variant after the other in this
process; prints examples/s and the ratio to the standard DataLoader over LMDB:

- ``DataLoader(LMDB)``: the baseline, a standard per-example DataLoader over LMDB of pickles;
- ``ds.loader``: batches gathered column-wise in the workers and sent as numpy arrays;
- ``DataLoader(CachedDataset)``: the standard per-example DataLoader over edcache;
- ``MDS`` / ``litdata``: a DataLoader over their StreamingDataset (their own shuffle),
  as their documentation shows;
- ``ds.loader, 0 workers`` and ``tensors made in workers``: where the time goes.

Then the time from ``load_state_dict`` to the first batch, on a 1M-example cache
(``--skip-resume`` to leave it out).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

from .common import make_examples, shape_n, warm_page_cache
from .stores.base import Skip
from .stores.edcache_store import EdcacheStore
from .stores.litdata_store import LitdataStore
from .stores.lmdb_store import LmdbStore
from .stores.mds_store import MDSStore

BS = 64


class _TensorBatches:
    """The loader's BatchReader, converting to tensors in the worker (the alternative
    to sending numpy arrays through the pipe)."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, positions):
        batch = self.reader[positions]  # (large batches come as tensors already)
        return batch.to_torch() if hasattr(batch, "to_torch") else batch


def _identity(b):
    return b


def _size(b) -> int:
    if isinstance(b, dict):
        return len(b[next(iter(b))])
    return len(b[0]) if isinstance(b, (tuple, list)) else len(b)


def _rate(make, k: int, max_s: float) -> float:
    """examples/s of passes over the loader ``make()`` returns, for up to ``k`` examples
    (or ``max_s`` seconds), after 3 warm-up batches."""
    loader = make()

    def stream():
        while True:
            yield from loader

    s = stream()
    for _ in range(3):
        next(s)
    got, t0 = 0, time.perf_counter()
    for b in s:
        got += _size(b)
        if got >= k or time.perf_counter() - t0 > max_s:
            break
    dt = time.perf_counter() - t0
    s.close()
    gc.collect()
    return got / dt


def _tensor_loader(ds, n, BatchReader, DataLoader):
    import numpy as np

    order = np.random.default_rng(0).permutation(n)
    batches = [order[i:i + BS] for i in range(0, n, BS)]
    return DataLoader(_TensorBatches(BatchReader(ds)), batch_size=None, sampler=batches, num_workers=2,
                      persistent_workers=True, collate_fn=_identity)


def bench_shape(shape: str, quick: bool, work: str, max_s: float) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    n = shape_n(shape, quick)
    k = 3 * n if shape == "small" else 2 * n
    examples = make_examples(shape, n)
    stores = {}
    for cls in (LmdbStore, EdcacheStore, MDSStore, LitdataStore):
        try:
            cls.check()
            st = cls(os.path.join(work, shape, cls.name), shape, quick)
            st.clear()
            st.write(iter(examples), n)
            stores[cls.name] = st
        except Skip as exc:
            print(f"  ({cls.name} skipped: {exc})")
    del examples
    for st in stores.values():
        if st.data_files():
            warm_page_cache(st.data_files())
    edc = stores["edcache"]
    edc.open()
    ds = edc.ds
    from edcache.loader import BatchReader

    g = torch.Generator().manual_seed(0)
    common = dict(batch_size=BS, num_workers=2, persistent_workers=True)
    variants = {
        "DataLoader(LMDB), per example": lambda: DataLoader(
            stores["lmdb"].torch_dataset(), sampler=RandomSampler(range(n), generator=g), **common),
        "ds.loader, 2 workers": lambda: ds.loader(BS, shuffle=True, num_workers=2, persistent_workers=True),
        "DataLoader(CachedDataset), per example": lambda: DataLoader(
            ds, sampler=RandomSampler(range(n), generator=g), **common),
    }
    for name in ("mds", "litdata"):
        if name in stores:
            variants[f"{name}: DataLoader(StreamingDataset)"] = (
                lambda st=stores[name]: DataLoader(st.torch_dataset(), **common))
    variants["ds.loader, 0 workers"] = lambda: ds.loader(BS, shuffle=True, num_workers=0)
    variants["ds.loader, tensors made in workers"] = lambda: _tensor_loader(ds, n, BatchReader, DataLoader)
    rates = {}
    for name, make in variants.items():
        try:
            rates[name] = _rate(make, k, max_s)
        except Exception as exc:  # a peer's loader failing is reported, not fatal
            print(f"  {name}: failed: {type(exc).__name__}: {exc}")
        gc.collect()
    return rates


def bench_resume(work: str, n: int = 1_000_000) -> tuple[float, float]:
    """Seconds from ``load_state_dict`` (mid-epoch) to the first batch, and to the first
    batch of a fresh loader, on an ``n``-example cache (0 workers and 2 workers)."""
    from edcache import CachedDataset

    from .toy import Tiny

    ds = CachedDataset(Tiny(os.path.join(work, "resume"), "tiny", n), num_workers=2, chunk_size=4096,
                       progress=False)
    out = []
    for workers in (0, 2):
        loader = ds.loader(BS, shuffle=True, num_workers=workers)
        it = iter(loader)
        for _ in range(n // BS // 2):  # half an epoch
            next(it)
        state = loader.state_dict()
        del it, loader
        gc.collect()
        t0 = time.perf_counter()
        fresh = ds.loader(BS, shuffle=True, num_workers=workers)
        fresh.load_state_dict(state)
        next(iter(fresh))
        out.append(time.perf_counter() - t0)
        del fresh
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="bench/run.py's full sizes (default: quick)")
    ap.add_argument("--shapes", default="small,medium")
    ap.add_argument("--max-s", type=float, default=20.0, help="time limit per variant")
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    quick = not args.full
    work = args.dir or tempfile.mkdtemp(prefix="edcache-loader-bench-")
    load0 = os.getloadavg()
    print(f"edcache loader benchmark, {'quick' if quick else 'full'}, batch {BS}, 2 workers, shuffled; "
          f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    try:
        for shape in args.shapes.split(","):
            rates = bench_shape(shape, quick, work, args.max_s)
            base = rates["DataLoader(LMDB), per example"]
            print(f"{shape} ({shape_n(shape, quick)} examples):")
            for name, r in rates.items():
                print(f"  {name:42s} {r:10,.0f} examples/s  {r / base:5.2f}x LMDB")
            mine = rates["ds.loader, 2 workers"]
            for name, r in rates.items():
                if name.startswith(("mds", "litdata")):
                    print(f"  ds.loader vs {name.split(':')[0]}: {mine / r:.2f}x")
            shutil.rmtree(os.path.join(work, shape), ignore_errors=True)
        if not args.skip_resume:
            w0, w2 = bench_resume(work)
            print(f"load_state_dict mid-epoch -> first batch, 1M examples: {w0:.3f} s (0 workers), "
                  f"{w2:.3f} s (2 workers)")
        load1 = os.getloadavg()
        print(f"load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
