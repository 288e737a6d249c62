"""``ds.loader`` vs a standard DataLoader over LMDB (issue 14), on the small shape.

    python -m bench.loader_bench            # quick: 10k examples, ~1 min
    python -m bench.loader_bench --full     # 100k examples, as bench/run.py's small shape

Batch 64, 2 workers, shuffled, persistent workers, one process per variant run after
the other in this process. Prints examples/s of each variant and the ratio to the LMDB
DataLoader. Variants besides the two of the target, to see where the time goes:

- ``ds.loader, 0 workers``: batches gathered in the training process;
- ``ds.loader, tensors made in workers``: same batches, but converted to tensors in the
  worker (each tensor then crosses as a shared-memory file descriptor);
- ``DataLoader(CachedDataset)``: the standard per-example DataLoader over edcache.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

from .common import make_examples, shape_n, warm_page_cache
from .stores.edcache_store import EdcacheStore
from .stores.lmdb_store import LmdbStore

BS = 64


class _TensorBatches:
    """The loader's BatchReader, converting to tensors in the worker (the alternative
    to sending numpy arrays through the pipe)."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, positions):
        return self.reader[positions].to_torch()


def _identity(b):
    return b


def _rate(loader, k: int, max_s: float) -> float:
    """examples/s of passes over ``loader`` for up to ``k`` examples (or ``max_s``), after
    3 warm-up batches."""
    def size(b):
        if isinstance(b, dict):
            return len(b[next(iter(b))])
        return len(b[0]) if isinstance(b, tuple) else len(b)

    def stream():
        while True:
            yield from loader

    s = stream()
    for _ in range(3):
        next(s)
    got, t0 = 0, time.perf_counter()
    for b in s:
        got += size(b)
        if got >= k or time.perf_counter() - t0 > max_s:
            break
    dt = time.perf_counter() - t0
    s.close()
    gc.collect()
    return got / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="100k examples (default: the quick 10k)")
    ap.add_argument("--examples", type=int, default=0, help="examples to time per variant (default 3 epochs)")
    ap.add_argument("--max-s", type=float, default=20.0, help="time limit per variant")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    torch.set_num_threads(1)
    quick = not args.full
    n = shape_n("small", quick)
    k = args.examples or 3 * n
    work = args.dir or tempfile.mkdtemp(prefix="edcache-loader-bench-")
    try:
        examples = make_examples("small", n)
        stores = {}
        for cls in (LmdbStore, EdcacheStore):
            st = cls(os.path.join(work, cls.name), "small", quick)
            st.clear()
            st.write(examples, n)
            stores[cls.name] = st
        del examples
        for st in stores.values():
            warm_page_cache(st.data_files())
        edc = stores["edcache"]
        edc.open()
        ds = edc.ds
        from edcache.loader import BatchReader

        lmdb_ds = stores["lmdb"].torch_dataset()
        g = torch.Generator().manual_seed(0)
        variants = {
            "DataLoader(LMDB), per example": lambda: DataLoader(
                lmdb_ds, batch_size=BS, num_workers=2, persistent_workers=True,
                sampler=RandomSampler(range(n), generator=g)),
            "ds.loader, 2 workers": lambda: ds.loader(BS, shuffle=True, num_workers=2, persistent_workers=True),
            "ds.loader, 0 workers": lambda: ds.loader(BS, shuffle=True, num_workers=0),
            "ds.loader, tensors made in workers": lambda: _tensor_loader(ds, n, BatchReader, DataLoader),
            "DataLoader(CachedDataset), per example": lambda: DataLoader(
                ds, batch_size=BS, num_workers=2, persistent_workers=True,
                sampler=RandomSampler(range(n), generator=g)),
        }
        rates = {}
        for name, make in variants.items():
            rates[name] = _rate(make(), k, args.max_s)
            gc.collect()
        base = rates["DataLoader(LMDB), per example"]
        print(f"small shape, {n} examples, batch {BS}, shuffled, {k} examples timed per variant "
              f"(load average {os.getloadavg()[0]:.2f})")
        for name, r in rates.items():
            print(f"  {name:40s} {r:10,.0f} examples/s  {r / base:5.2f}x LMDB")
        print(f"ratio ds.loader(64, num_workers=2) / DataLoader(LMDB): "
              f"{rates['ds.loader, 2 workers'] / base:.2f}x")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _tensor_loader(ds, n, BatchReader, DataLoader):
    import numpy as np

    order = np.random.default_rng(0).permutation(n)
    batches = [order[i:i + BS] for i in range(0, n, BS)]
    return DataLoader(_TensorBatches(BatchReader(ds)), batch_size=None, sampler=batches, num_workers=2,
                      persistent_workers=True, collate_fn=_identity)


if __name__ == "__main__":
    main()
