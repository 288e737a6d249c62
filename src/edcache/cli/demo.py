"""``edcache demo``: cache the JPEG demo on all cores and compare read throughput."""

from __future__ import annotations

import time


def run_demo(root: str | None, n: int, workers: int | None, progress: bool = True) -> int:
    from ..cached import CachedDataset
    from ..demo import DEFAULT_ROOT, DemoImages, read_throughput

    root = root or DEFAULT_ROOT
    start = time.perf_counter()
    raw = DemoImages(root, n=n, progress=progress, workers=workers)
    print(f"inputs: {n} JPEGs in {raw.image_dir} (ready in {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    cached = CachedDataset(raw, num_workers=workers, progress=progress)
    took = time.perf_counter() - start
    print(f"cache: {cached.path} ({len(cached)} examples, ready in {took:.1f} s)")
    probe = min(len(raw), 300)
    raw_rate = read_throughput(raw, probe)
    read_throughput(cached, probe)  # warm the page cache
    cached_rate = read_throughput(cached, probe * 10)
    print(f"random reads, raw (decode+resize+normalize): {raw_rate:10.0f} examples/s")
    print(f"random reads, cached:                        {cached_rate:10.0f} examples/s "
          f"({cached_rate / raw_rate:.0f}x)")
    train = (cached.labels["split"] == "train").sum()
    print(f"labels: {train} train / {len(cached) - train} validation examples, selected without reading any")
    from .info import disk_usage

    print(f"the demo wrote {disk_usage(root) / 2**20:.0f} MiB under {root}; remove it with: rm -r {root}")
    return 0
