"""Measurements, each run in a fresh subprocess by run.py:

    python -m bench.tasks TASK '{"json": "args"}'

The last stdout line is ``@@RESULT@@ {json}``."""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import sys
import time
import traceback
from typing import Any

import numpy as np

from .common import (
    SHAPES,
    as_dict,
    du,
    is_ragged,
    is_tuple,
    make_examples,
    median,
    random_sequence,
    raw_example_bytes,
    shape_n,
    time_batches,
    time_pass,
    touch,
    warm_page_cache,
)
from .stores import get_store_class
from .stores.base import Skip

MIN_READS = 10  # slow stores: at least this many reads per timed pass
MAX_REPS = 15


def _store(a: dict):
    cls = get_store_class(a["store"])
    cls.check()
    if is_tuple(a["shape"]) and not cls.tuples:
        raise Skip(f"{cls.label} stores dict examples only; shape {a['shape']} holds tuples of tensors")
    return cls(a["path"], a["shape"], a["quick"])


# -- write ------------------------------------------------------------------------------


def task_write(a: dict) -> dict:
    st = _store(a)
    n = shape_n(a["shape"], a["quick"])
    examples = make_examples(a["shape"], n)
    st.clear()
    gc.collect()
    t0 = time.perf_counter()
    st.write(iter(examples), n)
    dt = time.perf_counter() - t0
    raw = n * raw_example_bytes(a["shape"], n)
    nbytes = st.nbytes()
    out = {"n": n, "write_s": dt, "write_eps": n / dt, "nbytes": nbytes, "raw_bytes": raw, "disk_ratio": nbytes / raw}
    note = _note(a["store"])
    if note:
        out["note"] = note
    return out


def _note(store: str) -> str | None:
    if store == "mds":
        from .stores import mds_store

        return mds_store.NOTE
    return None


# -- reads ------------------------------------------------------------------------------


def _reps(pass_s: float, target_s: float, reps: int) -> int:
    """Short passes get more repetitions (median of up to MAX_REPS)."""
    return int(min(MAX_REPS, max(reps, target_s * reps / max(pass_s, 1e-9))))


def _probe(read, indices, mode: str, limit_s: float) -> float:
    """Seconds per read over at most ``indices``, stopping after ``limit_s / 2``."""
    t = time.perf_counter
    t0 = t()
    c = 0
    for i in indices:
        touch(read(i), mode)
        c += 1
        if t() - t0 > limit_s / 2:
            break
    return max((t() - t0) / c, 1e-8)


def _measure(read, n: int, order: str, mode: str, target_s: float, reps: int, cap: int) -> dict:
    """Examples/s over ``count`` reads: every store whose reads are fast enough does the
    same ``cap`` reads (the same indices); slow stores do fewer (>= MIN_READS)."""
    probe = random_sequence(n, 32) if order == "random" else list(range(min(32, n)))
    _probe(read, probe, mode, target_s)  # warm the probe
    est = _probe(read, probe, mode, target_s)
    count = cap  # may exceed n: the random stream is consecutive permutations, seq wraps
    if est * count > target_s:
        count = int(max(MIN_READS, min(count, target_s / est)))
    idx = random_sequence(n, count) if order == "random" else [k % n for k in range(count)]
    time_pass(read, idx, mode)  # warm-up pass over exactly what is timed
    times = [time_pass(read, idx, mode)]
    times += [time_pass(read, idx, mode) for _ in range(_reps(times[0], target_s, reps) - 1)]
    return {"eps": count / median(times), "count": count, "reps_s": times}


def _measure_batches(fn, n: int, target_s: float, reps: int, bs: int = 256) -> dict:
    seq = random_sequence(n, bs * 40, seed=7)
    first = time_batches(fn, [seq[:bs]], "page")  # warms and estimates
    nb = int(min(40, max(1, target_s / max(first, 1e-7))))
    batches = [seq[k * bs : (k + 1) * bs] for k in range(nb)]
    if nb > 1:
        time_batches(fn, batches, "page")
    times = [time_batches(fn, batches, "page")]
    times += [time_batches(fn, batches, "page") for _ in range(_reps(times[0], target_s, reps) - 1)]
    return {"eps": nb * bs / median(times), "batches": nb, "reps_s": times}


def task_read(a: dict) -> dict:
    st = _store(a)
    n = shape_n(a["shape"], a["quick"])
    target, reps = a["target_s"], a["reps"]
    files = st.data_files()
    out: dict[str, Any] = {}
    if files:
        t0 = time.perf_counter()
        out["warm_bytes"] = warm_page_cache(files)
        out["warm_s"] = time.perf_counter() - t0
    # open: first open in this process, then the median of 5 re-opens (each after a
    # close: LMDB allows one open environment per path and process)
    t0 = time.perf_counter()
    st.open()
    first = time.perf_counter() - t0
    if getattr(st, "has_open", True):
        st.close()
        opens = []
        for _ in range(5):
            st2 = type(st)(st.path, st.shape, st.quick)
            t0 = time.perf_counter()
            st2.open()
            opens.append(time.perf_counter() - t0)
            st2.close()
        st.open()
        out["open_first_ms"] = first * 1e3
        out["open_ms"] = median(opens) * 1e3
    # correctness spot check against the generated data (arrays with their shapes, and
    # scalars): example 2 and, for ragged shapes, the first with no boxes, no tokens and
    # the most boxes
    check = [2 if n > 2 else 0]
    ref = make_examples(a["shape"], min(n, 4096) if is_ragged(a["shape"]) else min(n, 3))
    if is_ragged(a["shape"]):
        for key, want in (("boxes", 0), ("tokens", 0), ("boxes", 20)):
            i = next((i for i, ex in enumerate(ref) if len(ex[key]) == want), None)
            if i is not None:
                check.append(i)
    for i in check:
        got, exp = as_dict(a["shape"], st.read(i)), as_dict(a["shape"], ref[i])
        for k, v in exp.items():
            g = got[k]
            if isinstance(v, np.ndarray):
                g = np.asarray(g)
                if v.size == 0 and g.size == 0 and g.shape != v.shape:
                    # a finding about what the store's users get, not a wrong value
                    out.setdefault("notes", []).append(
                        f"empty `{k}` reads back with shape {g.shape} {g.dtype} (written {v.shape} {v.dtype})")
                elif getattr(st, "lossy", False) and g.shape == v.shape:
                    err = float(np.abs(g.astype(np.int16) - v).mean())
                    out.setdefault("lossy_mean_abs_error", err)
                    if err > 8:
                        raise AssertionError(f"{a['store']}: example {i} key {k!r} is far from the written data "
                                             f"(mean abs error {err:.1f})")
                elif not np.array_equal(g, v):
                    raise AssertionError(f"{a['store']}: example {i} key {k!r} differs from the written data "
                                         f"(shape {np.shape(g)}, written {v.shape})")
            elif isinstance(v, str):
                assert str(g) == v, (k, g, v)
            else:
                assert float(g) == float(v), (k, g, v)
    out["checked"] = check
    del ref
    variants = {"": st.read}
    variants.update(st.read_variants())
    for vname, fn in variants.items():
        for order in ("random", "seq"):
            for mode in ("page", "full"):
                key = f"{order}_{mode}" + (f"@{vname}" if vname else "")
                out[key] = _measure(fn, n, order, mode, target, reps, a["cap"])
    # batched reads of 256 random indices (not for 'large': a 256 MiB batch)
    if a["shape"] == "large":
        st.close()
        return out
    batch = {"loop": _measure_batches(st.read_batch, n, target, reps)}
    for bname, fn in st.batch_methods().items():
        try:
            batch[bname] = _measure_batches(fn, n, target, reps)
        except Exception as e:  # a fast path that is broken is a finding, not a crash
            batch[bname] = {"error": f"{type(e).__name__}: {e}"}
    out["batch256"] = batch
    st.close()
    out["nbytes_after_read"] = st.nbytes()  # MDS keeps a decompressed copy of what it read
    return out


# -- DataLoader -------------------------------------------------------------------------


def _mem(pid: int) -> tuple[int, int]:
    """(USS, Private_Dirty) bytes of a process. USS (psutil) = Private_Clean +
    Private_Dirty: it includes clean file-backed pages of mmapped files that only this
    process maps (page cache, reclaimable, not a copy). Private_Dirty counts heap and
    copy-on-write copies only: the 'copy-on-read blowup' part."""
    import psutil

    uss = psutil.Process(pid).memory_full_info().uss
    dirty = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Private_Dirty:"):
                    dirty = int(line.split()[1]) * 1024
    except OSError:
        pass
    return uss, dirty


class BatchedView:
    """``view[list_of_indices]`` -> ``ds.get_batch(indices)``: a DataLoader with
    ``batch_size=None`` and a BatchSampler then fetches collated batches (one gather per
    field) and only converts them to tensors (``default_convert``)."""

    def __init__(self, ds, n: int) -> None:
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, indices):
        return self.ds.get_batch(indices)


class ConstantDataset:
    """Returns one fixed example for every index: the DataLoader's own ceiling (worker
    IPC, collate, shared-memory tensors) with no storage at all."""

    def __init__(self, example: dict, n: int) -> None:
        self.example, self.n = example, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.example


def pad_var(arrays: list, dtype=None) -> tuple:
    """Variable-shape arrays (first dimension 0..k) -> (zero-padded array of shape
    (len, max k, ...), int64 lengths): what a detection / token pipeline does per batch
    (one tensor per field instead of one per example)."""
    lens = np.fromiter((len(x) for x in arrays), np.int64, len(arrays))
    # row shape and dtype from a non-empty array (a store may return an empty one as (0,))
    ref = np.asarray(next((x for x in arrays if len(x)), arrays[0]))
    out = np.zeros((len(arrays), int(lens.max(initial=0)), *ref.shape[1:]), dtype or ref.dtype)
    for j, x in enumerate(arrays):
        if lens[j]:
            out[j, : lens[j]] = x
    return out, lens


def collate_var(batch: list, var_keys: frozenset) -> dict:
    """Default collate, except that each variable-shape field (``var_keys``) is padded to
    the longest in the batch, with its lengths in ``<key>_len``."""
    from torch.utils.data import default_collate, default_convert

    out = {}
    for k in batch[0]:
        if k in var_keys:
            padded, lens = pad_var([ex[k] for ex in batch])
            out[k], out[k + "_len"] = default_convert(padded), default_convert(lens)
        else:
            out[k] = default_collate([ex[k] for ex in batch])
    return out


def convert_var(batch: dict, var_keys: frozenset) -> dict:
    """``get_batch`` output (a list of arrays for each variable-shape field) padded as in
    ``collate_var``, then converted to tensors."""
    from torch.utils.data import default_convert

    out = {}
    for k, v in batch.items():
        if k in var_keys and isinstance(v, list):
            v, out[k + "_len"] = pad_var(v)
        out[k] = v
    return default_convert(out)


def task_dataloader(a: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    torch.set_num_threads(1)
    st = _store(a)
    n = shape_n(a["shape"], a["quick"])
    bs = 64
    k = int(max(bs * 12, a["count"]))
    k -= k % bs
    max_s = a.get("max_s", 10.0)
    if st.data_files():
        warm_page_cache(st.data_files())
    if a["store"] == "memory":
        st.open()
    ds = st.torch_dataset()
    if a.get("ceiling"):
        ds = ConstantDataset(st.read(0), n)
    kw = dict(batch_size=bs, num_workers=2, persistent_workers=True)
    var_keys = frozenset(k for k, kind, _, _ in SHAPES[a["shape"]]["fields"] if kind == "vararray")
    if var_keys:
        kw["collate_fn"] = functools.partial(collate_var, var_keys=var_keys)
    if a.get("batched"):
        from torch.utils.data import BatchSampler

        g = torch.Generator().manual_seed(0)
        sampler = BatchSampler(RandomSampler(range(n), num_samples=k, generator=g), bs, drop_last=False)
        bkw = {"collate_fn": functools.partial(convert_var, var_keys=var_keys)} if var_keys else {}
        dl = DataLoader(BatchedView(ds, n), batch_size=None, sampler=sampler, num_workers=2, persistent_workers=True, **bkw)
    elif st.iterable:
        dl = DataLoader(ds, **kw)
    else:
        # shuffled; num_samples may exceed n (then: consecutive permutations)
        g = torch.Generator().manual_seed(0)
        dl = DataLoader(ds, sampler=RandomSampler(range(n), num_samples=k, generator=g), **kw)
    gc.collect()
    t_start = time.perf_counter()
    holder = {}

    def epochs():  # iterable stores may be shorter than k: go on with the next epoch
        while True:
            it = iter(dl)
            holder.setdefault("it", it)
            yield from it

    tuple_batches = is_tuple(a["shape"])

    def size(b):
        if isinstance(b, dict):
            return len(b[next(iter(b))])
        return len(b[0]) if tuple_batches else len(b)  # default collate: [images, labels, ...]

    stream = epochs()
    warm = 3  # baseline after a few batches (workers started, prefetch queues full)
    got = 0
    for _ in range(warm):
        got += size(next(stream))
    t0 = time.perf_counter()
    seen = got
    pids = [w.pid for w in getattr(holder["it"], "_workers", [])]
    mem0 = [_mem(p) for p in pids]
    for b in stream:
        got += size(b)
        if got >= k or time.perf_counter() - t0 > max_s:
            break
    t1 = time.perf_counter()
    mem1 = [_mem(p) for p in pids]
    uss_growth = sum(m1[0] - m0[0] for m0, m1 in zip(mem0, mem1))
    anon_growth = sum(m1[1] - m0[1] for m0, m1 in zip(mem0, mem1))
    read_bytes = (got - seen) * raw_example_bytes(a["shape"], n)
    stream.close()
    del stream, holder, dl
    return {
        "examples": got,
        "eps": (got - seen) / (t1 - t0),
        "eps_incl_startup": got / (t1 - t_start),
        "startup_s": t0 - t_start,
        "warmup_batches": warm,
        "uss_worker_start_mb": [m[0] / 2**20 for m in mem0],
        "uss_growth_mb": uss_growth / 2**20,
        "dirty_growth_mb": anon_growth / 2**20,
        "read_mb": read_bytes / 2**20,
        "uss_growth_frac": uss_growth / max(read_bytes, 1),
        "dirty_growth_frac": anon_growth / max(read_bytes, 1),
        "shuffle": "store's own (IterableDataset)" if st.iterable else "RandomSampler",
    }


# -- build ------------------------------------------------------------------------------


def _cpu() -> float:
    """CPU seconds of this process plus its waited-for children (pool workers)."""
    import resource

    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def task_build(a: dict) -> dict:
    """Raw compute (no caching) vs CachedDataset builds with 0, 1, 2 workers. Raw is
    timed before and after the builds (the minimum is used); CPU seconds (incl. the
    pool's workers) are recorded too, as they do not depend on other load."""
    from edcache import CachedDataset

    from .toy import CPUBound, calibrate_iters

    n = a["n"]
    iters = calibrate_iters(a["ms"])
    root = a["path"]

    def raw_pass():
        ds = CPUBound(root, "toy", n, iters)
        c0, t0 = _cpu(), time.perf_counter()
        for i in range(n):
            ds.get_example(i)
        return time.perf_counter() - t0, _cpu() - c0

    raw1, raw_cpu1 = raw_pass()
    out: dict[str, Any] = {"n": n, "iters": iters}
    for w in a["workers"]:
        shutil.rmtree(root, ignore_errors=True)
        ds = CPUBound(root, "toy", n, iters)
        c0, t0 = _cpu(), time.perf_counter()
        cd = CachedDataset(ds, num_workers=w)
        dt, dc = time.perf_counter() - t0, _cpu() - c0
        assert len(cd) == n
        del cd
        out[f"build_w{w}_s"] = dt
        out[f"build_w{w}_cpu_s"] = dc
    raw2, raw_cpu2 = raw_pass()
    raw, raw_cpu = min(raw1, raw2), min(raw_cpu1, raw_cpu2)
    out.update({"raw_s": raw, "raw_s_before_after": [raw1, raw2], "raw_cpu_s": raw_cpu, "ms_per_example": raw / n * 1e3})
    for w in a["workers"]:
        dt, dc = out[f"build_w{w}_s"], out[f"build_w{w}_cpu_s"]
        out[f"overhead_w{w}_pct"] = (dt - raw) / raw * 100
        out[f"cpu_overhead_w{w}_pct"] = (dc - raw_cpu) / raw_cpu * 100
        out[f"speedup_w{w}"] = raw / dt
    shutil.rmtree(root, ignore_errors=True)
    return out


def _disk_use(path: str) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, files) under ``path``; files vanishing while a
    build renames or deletes them are skipped."""
    size = alloc = files = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:
                continue
            size += st.st_size
            alloc += st.st_blocks * 512
            files += 1
    return size, alloc, files


def peak_disk(build, path: str, every_s: float = 0.02) -> dict:
    """Run ``build()`` while a thread polls the disk use of ``path`` every ``every_s``;
    peak / final size, apparent (st_size) and allocated (st_blocks)."""
    import threading

    peak = [0, 0]
    samples = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            size, alloc, _ = _disk_use(path)
            peak[0], peak[1] = max(peak[0], size), max(peak[1], alloc)
            samples[0] += 1
            stop.wait(every_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        build()
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
    size, alloc, files = _disk_use(path)
    peak = [max(peak[0], size), max(peak[1], alloc)]
    return {"build_s": dt, "samples": samples[0], "final_bytes": size, "final_alloc": alloc, "files": files,
            "peak_bytes": peak[0], "peak_alloc": peak[1], "peak_ratio": peak[0] / max(size, 1),
            "peak_alloc_ratio": peak[1] / max(alloc, 1)}


def task_build_disk(a: dict) -> dict:
    """Peak disk use during an edcache build of the medium shape (256x256x3 uint8 +
    label, generated per index) with ``workers`` processes, divided by the final size."""
    from edcache import CachedDataset

    from .toy import Images

    shutil.rmtree(a["path"], ignore_errors=True)
    os.makedirs(a["path"])
    ds = Images(a["path"], "images", a["n"])
    out = peak_disk(lambda: CachedDataset(ds, num_workers=a["workers"], progress=False), os.path.join(a["path"], "cached"))
    shutil.rmtree(a["path"], ignore_errors=True)
    return {"n": a["n"], "workers": a["workers"], "chunk_bytes": 64 * 256 * 256 * 3, **out}


# -- scale ------------------------------------------------------------------------------


def task_scale_build(a: dict) -> dict:
    from edcache import CachedDataset

    from .toy import Tiny

    shutil.rmtree(a["path"], ignore_errors=True)
    ds = Tiny(a["path"], "tiny", a["n"])
    t0 = time.perf_counter()
    CachedDataset(ds, num_workers=a.get("workers"))
    dt = time.perf_counter() - t0
    cpath = os.path.join(a["path"], "cached", "tiny")
    files = sum(len(fs) for _, _, fs in os.walk(cpath))
    return {"n": a["n"], "build_s": dt, "build_eps": a["n"] / dt, "nbytes": du(cpath), "files": files,
            "fields": len(ds.get_example(0))}


def task_scale_open(a: dict) -> dict:
    import psutil

    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    import edcache  # noqa: F401  (import cost is not open cost)
    from edcache import CachedDataset

    rss_import = proc.memory_info().rss
    t0 = time.perf_counter()
    ds = CachedDataset.from_cache(a["path"], "tiny")
    first_open = time.perf_counter() - t0
    rss_open = proc.memory_info().rss
    assert len(ds) == a["n"]
    t0 = time.perf_counter()
    total = np.asarray(ds.labels["label"]).sum()
    first_labels = time.perf_counter() - t0
    rss_labels = proc.memory_info().rss
    expect = sum(i % 1000 for i in range(a["n"]))
    assert int(total) == expect, (total, expect)
    opens, labels = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        d2 = CachedDataset.from_cache(a["path"], "tiny")
        opens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.asarray(d2.labels["label"]).sum()
        labels.append(time.perf_counter() - t0)
    return {
        "n": a["n"],
        "open_first_ms": first_open * 1e3,
        "open_ms": median(opens) * 1e3,
        "labels_first_ms": first_labels * 1e3,
        "labels_ms": median(labels) * 1e3,
        "rss_before_import_mb": rss0 / 2**20,
        "rss_after_import_mb": rss_import / 2**20,
        "rss_after_open_mb": rss_open / 2**20,
        "rss_after_labels_mb": rss_labels / 2**20,
    }


def _dl_runs(a: dict, rate: float) -> dict:
    """The DataLoader figures of one store: the run, plus the ceiling (memory) and the
    get_batch loader (edcache), sized from the store's random-read rate."""
    sized = {"count": int(rate * 2 * a["dl_s"]), "max_s": 3 * a["dl_s"]}

    def guarded(extra: dict) -> dict:
        gc.collect()
        try:
            return task_dataloader({**a, **sized, **extra})
        except Skip as e:
            return {"skipped": str(e)}
        except Exception as e:
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"[:500]}

    res = {"dataloader": guarded({})}
    if a["store"] == "memory":
        res["dataloader_ceiling"] = guarded({"ceiling": True})
    if a["store"] == "edcache" and a["shape"] != "large":
        try:
            st = _store(a)
            st.open()
            has = hasattr(st.ds, "get_batch")
            st.close()
        except Exception:
            has = False
        if has:
            res["dataloader_batched"] = guarded({"batched": True})
    return res


def task_read_dl(a: dict) -> dict:
    """Reads, then (same process, fresh store object) the DataLoader runs sized from the
    measured random-read rate: saves one interpreter start and library import."""
    out = task_read(a)
    gc.unfreeze()
    gc.collect()
    rate = out.get("random_page", {}).get("eps", 5000.0)
    return {"read": out, **_dl_runs(a, rate)}


def task_write_read(a: dict) -> dict:
    """Quick mode: write, then read in the same process."""
    w = task_write(a)
    gc.collect()
    try:
        rd = task_read(a)
    except Skip as e:
        rd = {"skipped": str(e)}
    except Exception as e:
        traceback.print_exc()
        rd = {"error": f"{type(e).__name__}: {e}"[:500]}
    return {"write": w, "read": rd}


def task_dataloader_all(a: dict) -> dict:
    """Quick mode: the DataLoader runs of every store of one shape in one process (torch
    is imported once); ``a["stores"]`` maps store -> (path, random-read rate)."""
    out = {}
    for store, (path, rate) in a["stores"].items():
        out[store] = _dl_runs({**a, "store": store, "path": path}, rate)
    return out


TASKS = {
    "write_read": task_write_read,
    "dataloader_all": task_dataloader_all,
    "write": task_write,
    "read": task_read,
    "read_dl": task_read_dl,
    "dataloader": task_dataloader,
    "build": task_build,
    "build_disk": task_build_disk,
    "scale_build": task_scale_build,
    "scale_open": task_scale_open,
}


def main() -> None:
    name, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        res = TASKS[name](args)
    except Skip as e:
        res = {"skipped": str(e)}
    except Exception as e:
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"[:500]}
    sys.stdout.flush()
    print("@@RESULT@@ " + json.dumps(res, default=float), flush=True)


if __name__ == "__main__":
    main()
