"""results.json -> results.md (tables with ratios to LMDB and to the in-memory floor)
and plot.png. ``python -m bench.report [results.json]`` regenerates both."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

LABELS = {
    "memory": "in-memory list (floor)",
    "edcache": "edcache",
    "lmdb": "LMDB of pickles",
    "zip": "edflow zip (deflate)",
    "folder": "folder of pickles",
    "hf": "HF datasets (Arrow)",
    "mds": "MosaicML streaming (MDS)",
    "litdata": "litdata",
    "edcache-zstd": "edcache zstd:3",
    "edcache-png": "edcache png",
    "edcache-jpeg90": "edcache jpeg:90",
    "mds-zstd": "MDS compression=zstd",
    "mds-png": "MDS png column",
    "mds-jpeg90": "MDS jpeg column (q90 files)",
    "litdata-zstd": "litdata compression=zstd",
    "litdata-jpeg90": "litdata JPEG q90 bytes (PIL decode)",
    "hf-png": "HF Image feature (PNG)",
    "hf-jpeg90": "HF Image feature (JPEG q90 bytes)",
}


RAGGED_NOTES = {
    "ragged": "Variable shapes: `boxes` float32 (k, 4) with k in 0..20 and `tokens` int32 (t,) with t in 0..40 per example, "
              "next to `image` 32x32x3 uint8 and `label`; raw = the actual mean payload. DataLoader: variable fields padded to the "
              "longest in the batch, lengths in `<key>_len` (collate_fn; `get_batch` loader likewise).",
    "ragged_fixed": "The same values as `ragged`, zero-padded to `boxes` (20, 4) and `tokens` (40,) (no lengths): the reference "
                    "for ragged `ds[i]` time.",
}


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x"


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def rate(res: dict, store: str, fig: str) -> float | None:
    r = _get(res, store, "read", fig, "eps")
    return float(r) if r is not None else None


def best_batch(res: dict, store: str) -> tuple[str | None, float | None]:
    b = _get(res, store, "read", "batch256") or {}
    best = (None, None)
    for name, v in b.items():
        if name == "loop" or not isinstance(v, dict) or "eps" not in v:
            continue
        if best[1] is None or v["eps"] > best[1]:
            best = (name, v["eps"])
    return best


def cell(x: float | None, lm: float | None, fl: float | None, higher_better: bool = True) -> str:
    if x is None:
        return "–"
    s = fmt_rate(x)
    rs = []
    if lm:
        rs.append(f"{fmt_ratio(x / lm if higher_better else lm / x)} L")
    if fl:
        rs.append(f"{fmt_ratio(x / fl if higher_better else fl / x)} F")
    return f"{s} ({', '.join(rs)})" if rs else s


def shape_table(shape: str, res: dict) -> list[str]:
    stores = list(res)
    lines = [
        f"### {shape}",
        "",
        "Rates are examples/s (k = thousand); in brackets the ratio to LMDB (L) and to the in-memory floor (F); higher is better.",
        "",
        "| store | write | open ms | random page | random full | seq page | seq full | batch 256 (best native) | disk / raw | DataLoader | worker USS growth / read (private dirty) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for st in stores:
        r = res[st]
        w = r.get("write", {})
        if "skipped" in w or "error" in w:
            why = w.get("skipped") or w.get("error")
            lines.append(f"| {LABELS.get(st, st)} | {'skipped' if 'skipped' in w else 'error'}: {why} |" + " |" * 9)
            continue
        row = [LABELS.get(st, st)]
        lw, fw = _get(res, "lmdb", "write", "write_eps"), None
        row.append(cell(w.get("write_eps"), lw, fw) if st != "memory" else "–")
        rd = r.get("read", {})
        if "error" in rd or "skipped" in rd:
            row += [f"error: {rd.get('error') or rd.get('skipped')}"] + ["–"] * 6
        else:
            row.append(f"{rd['open_ms']:.2f}" if "open_ms" in rd else "–")
            for fig in ("random_page", "random_full", "seq_page", "seq_full"):
                row.append(cell(rate(res, st, fig), rate(res, "lmdb", fig), rate(res, "memory", fig)))
            name, br = best_batch(res, st)
            loop = _get(rd, "batch256", "loop", "eps")
            if br is not None:
                row.append(f"{fmt_rate(br)} `{name}` ({fmt_ratio(br / loop)} its loop)" if loop else fmt_rate(br))
            else:
                row.append(f"loop {fmt_rate(loop)}")
            for bname, bv in (rd.get("batch256") or {}).items():
                if isinstance(bv, dict) and "error" in bv:
                    notes.append(f"{LABELS.get(st, st)} `{bname}` failed: {bv['error']}")
        row.append(f"{w['disk_ratio']:.3f}" if st != "memory" else "1 (raw)")
        dl = r.get("dataloader", {})
        if "eps" in dl:
            row.append(cell(dl["eps"], _get(res, "lmdb", "dataloader", "eps"), _get(res, "memory", "dataloader", "eps")))
            row.append(f"{dl['uss_growth_frac'] * 100:.1f}% ({dl['dirty_growth_frac'] * 100:.1f}%)")
        else:
            row.append(f"error: {dl.get('error', dl.get('skipped', '–'))}"[:120] if dl else "–")
            row.append("–")
        lines.append("| " + " | ".join(row) + " |")
        if w.get("note"):
            notes.append(f"{LABELS.get(st, st)}: {w['note']}")
        for nt in dict.fromkeys(_get(r, "read", "notes") or []):
            notes.append(f"{LABELS.get(st, st)}: {nt}")
    ceil = _get(res, "memory", "dataloader_ceiling", "eps")
    if ceil:
        notes.append(
            f"DataLoader ceiling on this machine (a dataset returning one constant example; no storage): {fmt_rate(ceil)} examples/s"
            + (f"; LMDB's loader reaches {(_get(res, 'lmdb', 'dataloader', 'eps') or 0) / ceil:.2f} of it" if _get(res, "lmdb", "dataloader", "eps") else "")
        )
    for st in stores:
        dlb = _get(res, st, "dataloader_batched")
        if dlb:
            if "eps" in dlb:
                notes.append(
                    f"{LABELS.get(st, st)} DataLoader over `get_batch` (batch_size=None + BatchSampler(64), default_convert): "
                    + cell(dlb["eps"], _get(res, "lmdb", "dataloader", "eps"), _get(res, "memory", "dataloader", "eps"))
                    + f"; worker USS growth {dlb['uss_growth_frac'] * 100:.1f}% (private dirty {dlb['dirty_growth_frac'] * 100:.1f}%)"
                )
            else:
                notes.append(f"{LABELS.get(st, st)} DataLoader over `get_batch`: {dlb.get('error') or dlb.get('skipped')}")
    # per-variant read paths (e.g. edcache's reader under ds[i])
    for st in stores:
        rd = _get(res, st, "read") or {}
        variants = sorted({k.split("@", 1)[1] for k in rd if "@" in k})
        for v in variants:
            parts = []
            for fig in ("random_page", "random_full", "seq_page", "seq_full"):
                x = _get(rd, f"{fig}@{v}", "eps")
                parts.append(f"{fig.replace('_', ' ')} {cell(x, rate(res, 'lmdb', fig), rate(res, 'memory', fig))}")
            notes.append(f"{LABELS.get(st, st)} via `{v}` (stored example, no `index_`): " + "; ".join(parts))
        b = rd.get("batch256") or {}
        if len(b) > 1:
            notes.append(
                f"{LABELS.get(st, st)} batch of 256: "
                + ", ".join(f"`{k}` {fmt_rate(v['eps'])}" for k, v in b.items() if isinstance(v, dict) and "eps" in v)
                + " examples/s"
            )
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    lines.append("")
    return lines


def targets(results: dict) -> list[tuple[str, str, str, str, bool | None]]:
    """(issue, figure, target, measured, met) rows; met is None when not measured."""
    sh = results.get("shapes", {})
    out = []

    def ratio(shape, fig, a="edcache", b="lmdb"):
        x, y = rate(sh.get(shape, {}), a, fig), rate(sh.get(shape, {}), b, fig)
        return x / y if x and y else None

    def add(issue, name, target, value, ok, fmt=fmt_ratio):
        out.append((issue, name, target, fmt(value) if value is not None else "n/a", None if value is None else ok(value)))

    def write_ratio(shape):
        we, wl = _get(sh, shape, "edcache", "write", "write_eps"), _get(sh, shape, "lmdb", "write", "write_eps")
        return we / wl if we and wl else None

    r1, r2 = ratio("small", "random_page"), ratio("small", "random_page", b="memory")
    out.append(("5", "small, random, touch-page", ">= 1.3x LMDB and >= 0.7x floor",
                f"{fmt_ratio(r1) if r1 else 'n/a'} LMDB, {fmt_ratio(r2) if r2 else 'n/a'} floor",
                None if r1 is None or r2 is None else (r1 >= 1.3 and r2 >= 0.7)))
    add("5", "medium, random, touch-page", ">= 3x LMDB", ratio("medium", "random_page"), lambda v: v >= 3)
    add("5", "large, random, touch-page", ">= 10x LMDB", ratio("large", "random_page"), lambda v: v >= 10)
    add("5", "large, random, full touch", ">= 1.0x LMDB", ratio("large", "random_full"), lambda v: v >= 1.0)
    s = sh.get("small", {})
    gb, loop = _get(s, "edcache", "read", "batch256", "get_batch", "eps"), _get(s, "edcache", "read", "batch256", "loop", "eps")
    add("5", "`get_batch(256)` small", ">= 5x the per-example loop", gb / loop if gb and loop else None, lambda v: v >= 5)
    de, dl = _get(s, "edcache", "dataloader", "eps"), _get(s, "lmdb", "dataloader", "eps")
    add("5", "DataLoader end-to-end, small", ">= 1.5x LMDB", de / dl if de and dl else None, lambda v: v >= 1.5)
    ceil = _get(s, "memory", "dataloader_ceiling", "eps")
    if ceil and dl:
        out.append(("5", "  (DataLoader ceiling: constant example, no storage)", "-", f"{fmt_rate(ceil)}/s = {ceil / dl:.2f}x LMDB's loader", None))
    db = _get(s, "edcache", "dataloader_batched", "eps")
    if db:
        add("5", "DataLoader end-to-end, small, over `get_batch` (batch_size=None)", ">= 1.5x LMDB (per-example LMDB loader)",
            db / dl if dl else None, lambda v: v >= 1.5)
    sc = _get(results, "scale", "open") or {}
    n = sc.get("n")
    add("5, 10", f"open, {n or '?'} examples", "<= 2 ms (10: O(1) in N)", sc.get("open_ms"), lambda v: v <= 2,
        lambda v: f"{v:.2f} ms (first {sc.get('open_first_ms', 0):.2f} ms)")
    add("5", f"labels of {n or '?'} examples", "<= 20 ms", sc.get("labels_ms"), lambda v: v <= 20, lambda v: f"{v:.2f} ms (first {sc.get('labels_first_ms', 0):.2f} ms)")
    b = results.get("build") or {}
    add("5", "build overhead vs raw compute (1 worker)", "<= 5%", b.get("overhead_w1_pct"), lambda v: v <= 5,
        lambda v: f"{v:.1f}% wall, {b.get('cpu_overhead_w1_pct', float('nan')):.1f}% CPU (in-process: {b.get('overhead_w0_pct', float('nan')):.1f}% wall, {b.get('cpu_overhead_w0_pct', float('nan')):.1f}% CPU)")
    sp = b["build_w1_s"] / b["build_w2_s"] if b.get("build_w1_s") and b.get("build_w2_s") else None
    add("5", "build, 2 workers vs 1 (CPU-bound)", ">= 1.8x", sp, lambda v: v >= 1.8)
    add("5, 10", "write, small, 1 process", ">= 1.0x LMDB", write_ratio("small"), lambda v: v >= 1.0)
    ratios = {k: _get(v, "edcache", "write", "disk_ratio") for k, v in sh.items()}
    ratios = {k: v for k, v in ratios.items() if v is not None}
    add("5", "disk / raw, uncompressed", "<= 1.05", max(ratios.values()) if ratios else None, lambda v: v <= 1.05,
        lambda v: ", ".join(f"{k} {x:.3f}" for k, x in ratios.items()))
    uss = {k: _get(v, "edcache", "dataloader", "uss_growth_frac") for k, v in sh.items()}
    dirty = {k: _get(v, "edcache", "dataloader", "dirty_growth_frac") for k, v in sh.items()}
    uss = {k: v for k, v in uss.items() if v is not None}
    worst = max(max(uss.values()), max(dirty[k] for k in uss)) if uss else None
    add("5", "DataLoader worker USS growth over an epoch (USS and private dirty)", "< 5% of data read", worst, lambda v: v < 0.05,
        lambda v: ", ".join(f"{k} USS {x * 100:.1f}% / dirty {dirty.get(k, 0) * 100:.1f}%" for k, x in uss.items()))
    # issue 10 (format v2)
    for shape in ("medium", "large", "ragged"):
        add("10", f"write, {shape}, 1 process", ">= 1.0x LMDB", write_ratio(shape), lambda v: v >= 1.0)
    for shape, want in (("small", 3), ("medium", 4), ("large", 8)):
        add("10", f"{shape}, random, touch-page", f">= {want}x LMDB", ratio(shape, "random_page"), lambda v, w=want: v >= w)
    # time per ds[i] of the ragged data over the same data with fixed shapes (= rate
    # fixed / rate ragged), same run; LMDB's in brackets for scale
    rr, rf = rate(sh.get("ragged", {}), "edcache", "random_page"), rate(sh.get("ragged_fixed", {}), "edcache", "random_page")
    lr, lf = rate(sh.get("ragged", {}), "lmdb", "random_page"), rate(sh.get("ragged_fixed", {}), "lmdb", "random_page")
    add("10", "random `ds[i]`, touch-page, ragged vs ragged_fixed (time)", "<= 1.3x", rf / rr if rr and rf else None, lambda v: v <= 1.3,
        lambda v: f"{fmt_ratio(v)} ({1e6 / rr:.2f} vs {1e6 / rf:.2f} µs; LMDB {fmt_ratio(lf / lr) if lr and lf else 'n/a'})")
    bd = results.get("build_disk") or {}
    if bd.get("peak_ratio") is not None:
        add("10", f"peak disk during a build / final size (medium, {bd.get('workers')} workers, polled every 20 ms)",
            "<= 1.05 (+ chunks in flight)", max(bd["peak_ratio"], bd.get("peak_alloc_ratio", 0)), lambda v: v <= 1.05,
            lambda v: f"{bd['peak_ratio']:.3f} apparent, {bd.get('peak_alloc_ratio', float('nan')):.3f} allocated "
                      f"(peak {bd['peak_bytes'] / 2**20:.1f} MiB, final {bd['final_bytes'] / 2**20:.1f} MiB, {bd.get('samples')} samples)")
    else:
        out.append(("10", "peak disk during a build / final size", "<= 1.05 (+ chunks in flight)", "n/a", None))
    # issue 12: the small data as (tensor, int, float, str) tuples against the dict form,
    # same run: time per ds[i] (touch-page, and the bare loop of batch256) and DataLoader rate
    st = sh.get("small_tensors", {})
    rt, rd = rate(st, "edcache", "random_page"), rate(s, "edcache", "random_page")
    add("12", "random `ds[i]`, touch-page, tuple of tensors vs dict of numpy (time)", "<= 1.2x",
        rd / rt if rt and rd else None, lambda v: v <= 1.2,
        lambda v: f"{fmt_ratio(v)} ({1e6 / rt:.2f} vs {1e6 / rd:.2f} µs)")
    lt, ld = _get(st, "edcache", "read", "batch256", "loop", "eps"), _get(s, "edcache", "read", "batch256", "loop", "eps")
    add("12", "`ds[i]` untouched (loop of 256 random), tuple of tensors vs dict (time)", "<= 1.2x",
        ld / lt if lt and ld else None, lambda v: v <= 1.2,
        lambda v: f"{fmt_ratio(v)} ({1e6 / lt:.2f} vs {1e6 / ld:.2f} µs)")
    dt_, dd = _get(st, "edcache", "dataloader", "eps"), _get(s, "edcache", "dataloader", "eps")
    add("12", "DataLoader end-to-end, tuple of tensors vs dict (throughput)", ">= 0.9x",
        dt_ / dd if dt_ and dd else None, lambda v: v >= 0.9)
    scb = _get(results, "scale", "build") or {}
    files, fields = scb.get("files"), scb.get("fields")
    add("10", f"files in a {scb.get('n') or '?'}-example cache ({fields or '?'} fields)", "O(columns): <= 2 per field + 4",
        files, lambda v: fields is not None and v <= 2 * fields + 4, lambda v: f"{v} files")
    return out


def write_report(results: dict, outdir: str) -> tuple[str, str]:
    m = results["meta"]
    v = m.get("versions", {})
    lines = [
        "# edcache benchmark results",
        "",
        f"- date: {m['date']}; mode: **{m['mode']}**; total {m.get('total_s', 0):.0f} s; edcache commit {m.get('git_commit')}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; load average (1/5/15 min) at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}",
        f"- python {m['python']}, numpy {m['numpy']}, " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
        "- warm page cache, one reader process; medians of >= 3 timed passes (full run: pooled from 2 rounds in separate processes) after a warm-up pass over the same indices;"
        " DataLoader: batch 64, 2 workers, default collate, shuffled",
        "",
    ]
    sh = results.get("shapes", {})
    for shape, res in sh.items():
        n = next((x["write"]["n"] for x in res.values() if "n" in x.get("write", {})), None)
        tbl = shape_table(f"{shape} (N={n})", res)
        if shape in RAGGED_NOTES:
            tbl[2:2] = [RAGGED_NOTES[shape], ""]
        lines += [f"<!-- n={n} -->"] + tbl
    lines += ["## Targets (issues 5, 10 and 12)", "", "| issue | figure | target | measured (edcache) | met |", "|---|---|---|---|---|"]
    for issue, name, target, val, ok in targets(results):
        lines.append(f"| {issue} | {name} | {target} | {val} | {'yes' if ok else ('–' if target == '-' else ('n/a' if ok is None else '**no**'))} |")
    b = results.get("build")
    lines += ["", "## Build (CPU-bound toy dataset)", ""]
    if b and "raw_s" in b:
        lines.append(
            f"{b['n']} examples at {b['ms_per_example']:.2f} ms each: raw compute {b['raw_s']:.2f} s wall "
            f"(before/after the builds: {', '.join(f'{x:.2f}' for x in b.get('raw_s_before_after', []))}), {b.get('raw_cpu_s', float('nan')):.2f} s CPU."
        )
        lines.append("")
        lines.append("| num_workers | build s | overhead vs raw (wall) | CPU s (incl. workers) | overhead (CPU) | speed-up vs raw |")
        lines.append("|---|---|---|---|---|---|")
        for w in (0, 1, 2):
            if f"build_w{w}_s" in b:
                lines.append(
                    f"| {w} | {b[f'build_w{w}_s']:.2f} | {b[f'overhead_w{w}_pct']:+.1f}% | {b.get(f'build_w{w}_cpu_s', float('nan')):.2f} | "
                    f"{b.get(f'cpu_overhead_w{w}_pct', float('nan')):+.1f}% | {b[f'speedup_w{w}']:.2f}x |"
                )
    else:
        lines.append(f"not run: {b}")
    bd = results.get("build_disk")
    if bd and "peak_bytes" in bd:
        lines += ["", (
            f"Peak disk during a build of the medium shape ({bd['n']} examples of 256x256x3 uint8 + label, "
            f"num_workers={bd['workers']}, {bd['build_s']:.2f} s; cache directory polled every 20 ms, {bd['samples']} samples): "
            f"apparent size peak {bd['peak_bytes'] / 2**20:.1f} MiB / final {bd['final_bytes'] / 2**20:.1f} MiB = {bd['peak_ratio']:.3f}; "
            f"allocated blocks peak {bd['peak_alloc'] / 2**20:.1f} MiB / final {bd['final_alloc'] / 2**20:.1f} MiB = {bd['peak_alloc_ratio']:.3f}; "
            f"{bd['files']} files; one chunk of images is {bd['chunk_bytes'] / 2**20:.1f} MiB."
        )]
    elif bd:
        lines += ["", f"Peak disk during a build: not run: {bd}"]
    sc = results.get("scale")
    lines += ["", "## Scale (tiny examples)", ""]
    if sc and "open" in sc and "open_ms" in sc["open"]:
        bb, o = sc["build"], sc["open"]
        lines.append(
            f"{o['n']:,} examples: build {bb['build_s']:.1f} s ({fmt_rate(bb['build_eps'])}/s, default workers), "
            f"{bb['nbytes'] / 2**20:.1f} MiB on disk"
            + (f" in {bb['files']} files ({bb.get('fields')} fields)" if "files" in bb else "")
            + f"; open (from_cache) {o['open_ms']:.2f} ms (first {o['open_first_ms']:.2f} ms); "
            f"all labels {o['labels_ms']:.2f} ms (first {o['labels_first_ms']:.2f} ms); RSS after import {o['rss_after_import_mb']:.0f} MiB, "
            f"after open {o['rss_after_open_mb']:.0f} MiB, after labels {o['rss_after_labels_mb']:.0f} MiB."
        )
    else:
        lines.append(f"not run: {sc}")
    lines += ["", "![plot](plot.png)", ""]
    md = os.path.join(outdir, "results.md")
    with open(md, "w") as fh:
        fh.write("\n".join(lines))
    png = os.path.join(outdir, "plot.png")
    try:
        plot(results, png)
    except Exception as e:  # the table matters more than the picture
        print(f"plot failed: {e!r}")
    return md, png


def plot(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    sh = results.get("shapes", {})
    figs = [("random_page", "random, touch page"), ("random_full", "random, full touch"), ("batch", "batch of 256 (best)"), ("dl", "DataLoader (2 workers)")]
    fig, axes = plt.subplots(len(sh), len(figs), figsize=(4.2 * len(figs), 0.45 * 8 * len(sh) + 1), squeeze=False)
    for r, (shape, res) in enumerate(sh.items()):
        stores = [s for s in res if "read" in res[s] and "error" not in res[s]["read"]]
        for c, (fig_key, title) in enumerate(figs):
            ax = axes[r][c]
            vals = []
            for s in stores:
                if fig_key == "dl":
                    vals.append(_get(res, s, "dataloader", "eps") or 0)
                elif fig_key == "batch":
                    bb = best_batch(res, s)[1]
                    vals.append(bb or _get(res, s, "read", "batch256", "loop", "eps") or 0)
                else:
                    vals.append(rate(res, s, fig_key) or 0)
            colors = ["#999999" if s == "memory" else ("#d62728" if s == "edcache" else "#1f77b4") for s in stores]
            y = range(len(stores))
            ax.barh(list(y), vals, color=colors)
            ax.set_yticks(list(y))
            ax.set_yticklabels([LABELS.get(s, s) for s in stores] if c == 0 else [""] * len(stores), fontsize=8)
            ax.invert_yaxis()
            if any(vals):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            else:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", fontsize=9)
                ax.set_xticks([])
            for yy, v in zip(y, vals):
                if v:
                    ax.text(v, yy, " " + fmt_rate(v), va="center", fontsize=7)
            ax.set_title(f"{shape}: {title}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            if r == len(sh) - 1:
                ax.set_xlabel("examples/s (log)", fontsize=8)
    m = results["meta"]
    fig.suptitle(f"edcache benchmark ({m['mode']}, {m['date']}, {m['cpu']}, {m['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "results.json")
    with open(path) as fh:
        res = json.load(fh)
    print(write_report(res, os.path.dirname(path)))
