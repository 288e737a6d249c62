"""Where the time goes per example on the read path (small shape): edcache vs LMDB
(the fastest peer for small random reads) vs the in-memory floor.

    python bench/profile_read.py [--n 20000] [--reads 20000] [--out bench/results/profile_small.txt]

Prints a table of microseconds per step (each step timed on its own over the same
random indices, fastest of 7 passes, gc paused) and the top functions from cProfile
(and a pyinstrument tree when it is installed) of the full ``ds[i]`` + touch loop."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pickle
import pstats
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (os.path.join(REPO, "src"), REPO):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

from bench.common import gc_paused, make_examples, random_sequence, touch  # noqa: E402
from bench.stores.edcache_store import EdcacheStore  # noqa: E402
from bench.stores.lmdb_store import LmdbStore, _key  # noqa: E402


def per_call_us(fn, args, reps=7) -> float:
    """Fastest pass (time / len(args)) of ``fn(a)`` over ``args``: per-step attribution
    wants the cost without interference from other processes (min, not median)."""
    times = []
    for _ in range(reps + 1):
        with gc_paused():
            t0 = time.perf_counter()
            for a in args:
                fn(a)
            times.append(time.perf_counter() - t0)
    return float(np.min(times[1:])) / len(args) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--workdir", default="/tmp/edcache-bench/profile")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile_small.txt"))
    args = ap.parse_args(argv)

    n = args.n
    shutil.rmtree(args.workdir, ignore_errors=True)
    examples = make_examples("small", n)
    ed = EdcacheStore(os.path.join(args.workdir, "edcache"), "small", False)
    lm = LmdbStore(os.path.join(args.workdir, "lmdb"), "small", False)
    for st in (ed, lm):
        st.clear()
        st.write(iter(examples), n)
        st.open()
    idx = random_sequence(n, args.reads)
    rows: list[tuple[str, str, float]] = []

    def row(store, step, fn, a=idx):
        fn(a[0])
        rows.append((store, step, per_call_us(fn, a)))

    # -- floor -----------------------------------------------------------------------
    data = examples
    row("memory", "list[i]", data.__getitem__)
    row("memory", "list[i] + touch page", lambda i: touch(data[i], "page"))

    # -- edcache ---------------------------------------------------------------------
    ds = ed.ds
    reader = ds.fork_safe_zip
    row("edcache", "ds[i] + touch page (the benchmark figure)", lambda i: touch(ds[i], "page"))
    row("edcache", "ds[i]", ds.__getitem__)
    row("edcache", "reader.read(i)", reader.read)
    cs = reader._chunk_size if hasattr(reader, "_chunk_size") else None
    if cs and hasattr(reader, "shard"):
        for c in range((n + cs - 1) // cs):
            reader.shard(c)
        shards = reader._shards
        pairs = [(shards[i // cs], i % cs) for i in idx]
        row("edcache", "shard.read(row) (decode only)", lambda p: p[0].read(p[1]), pairs)
        row("edcache", "divmod(i, chunk) + shards.get", lambda i: shards.get(divmod(i, cs)[0]))
        sf = shards[0]
        rows_ = [i % cs for i in idx]
        for key, get in getattr(sf, "_fields", None) or []:
            row("edcache", f"  column getter {key!r}", get, rows_)
        if getattr(sf, "_fields", None):
            fields = sf._fields
            row("edcache", "  dict build (getters as no-ops)", lambda r: {k: r for k, _ in fields}, rows_)
    ex0 = ds[0]
    row("edcache", "touch page of one example", lambda i: touch(ex0, "page"))
    if hasattr(ds, "_finish"):
        raw0 = reader.read(0)
        row("edcache", "ds._finish(example, i) (adds index_)", lambda i: ds._finish(raw0, i))

    # -- LMDB ------------------------------------------------------------------------
    txn = lm.txn
    keys = [_key(i) for i in idx]
    blobs = [bytes(txn.get(k)) for k in keys[:2000]]
    row("lmdb", "read(i) + touch page (the benchmark figure)", lambda i: touch(lm.read(i), "page"))
    row("lmdb", "read(i) = loads(txn.get(key(i)))", lm.read)
    row("lmdb", "key encode b'%010d' % i", _key)
    row("lmdb", "txn.get(key) (zero-copy buffer)", txn.get, keys)
    row("lmdb", "pickle.loads(value)", pickle.loads, blobs)
    ex1 = lm.read(0)
    row("lmdb", "touch page of one example", lambda i: touch(ex1, "page"))

    # -- batched / collate -------------------------------------------------------------
    bidx = [idx[k : k + 256] for k in range(0, min(len(idx), 256 * 40), 256)]
    for name in ("get_batch", "__getitems__"):
        if hasattr(ds, name):
            fn = getattr(ds, name)
            rows.append(("edcache", f"{name}(256) per example", per_call_us(fn, bidx) / 256))
    rows.append(("lmdb", "loop of 256 reads per example", per_call_us(lambda b: [lm.read(i) for i in b], bidx) / 256))
    try:
        from torch.utils.data import default_collate, default_convert

        b64 = [ds[i] for i in idx[:64]]
        l64 = [lm.read(i) for i in idx[:64]]
        rows.append(("edcache", "default_collate(64 examples) per example", per_call_us(default_collate, [b64] * 50) / 64))
        rows.append(("lmdb", "default_collate(64 examples) per example", per_call_us(default_collate, [l64] * 50) / 64))
        if hasattr(ds, "get_batch"):
            g = ds.get_batch(idx[:64])
            rows.append(("edcache", "default_convert(get_batch(64)) per example", per_call_us(default_convert, [g] * 50) / 64))
    except Exception as e:  # torch missing
        rows.append(("-", f"collate not measured: {e!r}", float("nan")))

    out = io.StringIO()
    out.write(f"small shape, n={n}, {len(idx)} random reads, warm page cache, gc paused; us per call (fastest of 7 passes)\n\n")
    out.write(f"{'store':9s} {'step':52s} {'us':>8s}\n")
    for s, step, us in rows:
        out.write(f"{s:9s} {step:52s} {us:8.3f}\n")

    # -- cProfile of the benchmark loops -------------------------------------------------
    for label, fn in (("edcache ds[i] + touch page", lambda i: touch(ds[i], "page")), ("lmdb read(i) + touch page", lambda i: touch(lm.read(i), "page"))):
        pr = cProfile.Profile()
        pr.enable()
        for i in idx:
            fn(i)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
        out.write(f"\n== cProfile: {label} (tottime; cProfile inflates per-call costs)\n")
        out.write("\n".join(ln for ln in s.getvalue().splitlines() if ln.strip())[:4000] + "\n")
    try:
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0001)
        prof.start()
        for _ in range(5):
            for i in idx:
                touch(ds[i], "page")
        prof.stop()
        out.write("\n== pyinstrument: edcache ds[i] + touch page (5 passes)\n")
        out.write(prof.output_text(unicode=False, color=False, show_all=False)[:6000])
    except Exception as e:
        out.write(f"\n(pyinstrument not run: {e!r})\n")

    text = out.getvalue()
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
