"""Run the edcache benchmark suite.

    python bench/run.py                 # full run (a few hundred MB per store and shape)
    python bench/run.py --quick         # tens of MB, a couple of minutes
    python bench/run.py --only edcache,lmdb,memory --shapes small
    python bench/run.py --shapes images --only memory,edcache,hf,mds,litdata --codecs --out bench/results/images

Writes bench/results/results.json, results.md and plot.png. Every measurement runs in
a fresh subprocess (python -m bench.tasks ...) on the same generated data."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import SHAPES, machine_info  # noqa: E402
from bench.stores import CODEC_STORES, STORES  # noqa: E402

ORDER = ["memory", "edcache", "lmdb", "zip", "folder", "hf", "mds", "litdata"]


def _env() -> dict:
    env = dict(os.environ)
    # the working tree's edcache first (src layout), then the bench package
    parts = [REPO, os.path.join(REPO, "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


class Runner:
    def __init__(self, args):
        self.args = args
        self.log = open(os.path.join(args.workdir, "tasks.log"), "a")

    def task(self, name: str, timeout: float, **kw) -> dict:
        cmd = [sys.executable, "-m", "bench.tasks", name, json.dumps(kw)]
        label = f"{name} {kw.get('store', '')} {kw.get('shape', '')}".strip()
        t0 = time.perf_counter()
        self.log.write(f"\n===== {label} {json.dumps(kw)}\n")
        self.log.flush()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=self.log, text=True, timeout=timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT@@ ")]
            res = json.loads(lines[-1][11:]) if lines else {"error": f"no result (exit {p.returncode}); see {self.log.name}"}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {timeout:.0f} s"}
        dt = time.perf_counter() - t0
        def st(r):
            return "skipped: " + r["skipped"] if "skipped" in r else ("ERROR: " + r["error"] if "error" in r else "ok")

        if name == "dataloader_all" and "error" not in res:
            status = "; ".join(f"{k} {st(v.get('dataloader', {}))}" for k, v in res.items())
        elif "read" not in res:
            status = st(res)
        else:
            status = f"read {st(res['read'])}" + (f"; dataloader {st(res['dataloader'])}" if "dataloader" in res else "")
        if "write" in res and isinstance(res["write"], dict):
            status = f"write {st(res['write'])}; " + status
        print(f"  [{dt:6.1f}s] {label}: {status[:160]}", flush=True)
        return res


def _rep_rates(fig: dict) -> list[float]:
    per = fig["count"] if "count" in fig else fig["batches"] * 256
    return [per / t for t in fig["reps_s"]]


def merge_rounds(r1: dict, r2: dict) -> dict:
    """Pool the repetitions of two read rounds: each figure's rate becomes the median of
    all repetitions' rates; each round's own median is kept in ``round_eps``."""
    import statistics

    def merge_fig(a: dict, b: dict) -> dict:
        rates = _rep_rates(a) + _rep_rates(b)
        return {**a, "eps": statistics.median(rates), "round_eps": [a["eps"], b["eps"]],
                "reps_s": a["reps_s"] + b["reps_s"], "rep_eps": rates}

    out = dict(r1)
    out["rounds"] = 2
    for k, b in r2.items():
        a = r1.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and "reps_s" in a and "reps_s" in b:
            if "count" in a and "count" in b or "batches" in a and "batches" in b:
                out[k] = merge_fig(a, b)
        elif k == "batch256" and isinstance(a, dict):
            out[k] = {m: (merge_fig(a[m], v) if isinstance(a.get(m), dict) and "reps_s" in a[m] and "reps_s" in v else a.get(m, v))
                      for m, v in b.items()}
        elif k == "open_ms" and a is not None:
            out[k] = statistics.median([a, b])
            out["open_ms_rounds"] = [a, b]
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except Exception:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, short timings (~2-3 min)")
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated stores (%(default)s)")
    ap.add_argument("--shapes", default=",".join(s for s in SHAPES if s != "images"),
                    help="comma-separated shapes (%(default)s; also: images)")
    ap.add_argument("--codecs", action="store_true",
                    help="add the compressed stores (" + ", ".join(CODEC_STORES) + "); they run on the images shape")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: reads,dataloader,build,scale")
    ap.add_argument("--workdir", default="/tmp/edcache-bench", help="where the stores are written (%(default)s)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory (%(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the written stores")
    args = ap.parse_args(argv)

    stores = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.codecs:
        stores += [s for s in CODEC_STORES if s not in stores]
    for s in stores:
        if s not in STORES:
            ap.error(f"unknown store {s!r}; choose from {', '.join(STORES)}")
    if "memory" not in stores:
        print("note: 'memory' (the floor) not selected: ratios to the floor will be missing")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    quick = args.quick
    mode = "quick" if quick else "full"
    workdir = os.path.join(args.workdir, mode)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    args.workdir = workdir
    os.makedirs(args.out, exist_ok=True)
    runner = Runner(args)

    results = {
        "meta": {**machine_info(), "mode": mode, "git_commit": git_commit(), "argv": sys.argv[1:],
                 "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "shapes": {},
        "build": None,
        "build_disk": None,
        "scale": None,
    }
    out_json = os.path.join(args.out, "results.json")

    def save():
        with open(out_json, "w") as fh:
            json.dump(results, fh, indent=1, default=float)

    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes will skew the timings")
    target_s = 0.05 if quick else 0.25
    reps = 3
    cap = 2000 if quick else 10000
    rounds = 1 if quick else 2
    t_all = time.perf_counter()
    for shape in shapes:
        print(f"== shape {shape}", flush=True)
        per = results["shapes"].setdefault(shape, {})
        for store in stores:
            path = os.path.join(workdir, shape, store)
            base = dict(store=store, shape=shape, quick=quick, path=path)
            r = per.setdefault(store, {})
            dl_s = 0.3 if quick else 1.5
            if quick and "reads" not in skip:
                # one process per store writes and reads; the DataLoader runs of all
                # stores follow in one process per shape (torch imported once)
                res = runner.task("write_read", 900, target_s=target_s, reps=reps, cap=cap, **base)
                if "write" in res:
                    r.update(res)
                else:
                    r["write"] = res
                save()
                continue
            w = runner.task("write", 900, **base)
            r["write"] = w
            save()
            if "skipped" in w or "error" in w:
                continue
            if "reads" not in skip and "dataloader" not in skip:
                rd = runner.task("read_dl", 900, target_s=target_s, reps=reps, cap=cap, dl_s=dl_s, **base)
                if "read" in rd:
                    r.update(rd)
                else:
                    r["read"] = rd
                save()
            elif "reads" not in skip:
                r["read"] = runner.task("read", 600, target_s=target_s, reps=reps, cap=cap, **base)
                save()
            elif "dataloader" not in skip:
                r["dataloader"] = runner.task("dataloader", 600, count=int(5000 * 2 * dl_s), max_s=3 * dl_s, **base)
                save()
        if quick and "reads" not in skip and "dataloader" not in skip:
            todo = {}
            for store in stores:
                r = per.get(store, {})
                if "eps" in (r.get("read") or {}).get("random_page", {}):
                    todo[store] = (os.path.join(workdir, shape, store), r["read"]["random_page"]["eps"])
            if todo:
                dls = runner.task("dataloader_all", 900, stores=todo, shape=shape, quick=quick, dl_s=0.3)
                for store in todo:
                    per[store].update(dls.get(store) or {"dataloader": {"error": dls.get("error", "no result")}})
                save()
        # second round of reads, after every store's first: timings spread over time,
        # so a burst of load on the machine does not decide one store's figures
        if "reads" not in skip and rounds > 1:
            for store in stores:
                r = per.get(store, {})
                if "error" in r.get("write", {"error": 1}) or "read" not in r or "error" in r["read"]:
                    continue
                path = os.path.join(workdir, shape, store)
                r2 = runner.task("read", 600, target_s=target_s, reps=reps, cap=cap, store=store, shape=shape, quick=quick, path=path)
                if "error" not in r2 and "skipped" not in r2:
                    r["read"] = merge_rounds(r["read"], r2)
                save()
        if not args.keep:
            shutil.rmtree(os.path.join(workdir, shape), ignore_errors=True)

    if "build" not in skip and "edcache" in stores:
        print("== build (CPU-bound toy dataset)", flush=True)
        results["build"] = runner.task(
            "build", 900, path=os.path.join(workdir, "build"), n=400 if quick else 1200, ms=3.0, workers=[0, 1, 2]
        )
        save()
        print("== build, peak disk (medium shape)", flush=True)
        from bench.common import shape_n

        results["build_disk"] = runner.task(
            "build_disk", 900, path=os.path.join(workdir, "build_disk"), n=shape_n("medium", quick), workers=2
        )
        save()
    if "scale" not in skip and "edcache" in stores:
        print("== scale (tiny examples)", flush=True)
        n = 100_000 if quick else 1_000_000
        path = os.path.join(workdir, "scale")
        b = runner.task("scale_build", 900, path=path, n=n)
        results["scale"] = {"build": b}
        if "error" not in b and "skipped" not in b:
            results["scale"]["open"] = runner.task("scale_open", 300, path=path, n=n)
        save()
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)

    results["meta"]["total_s"] = time.perf_counter() - t_all
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    from bench.report import write_report

    md, png = write_report(results, args.out)
    print(f"done in {results['meta']['total_s']:.0f} s: {out_json}, {md}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
