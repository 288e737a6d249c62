"""``edcache``: build, inspect, verify and convert caches from a shell.

Usage::

    edcache --dataset pkg.module.factory [--workers N] [--chunk-size N] [--force] [--no-keep-existing]
    edcache --server --dataset pkg.module.factory [...]     # coordinate a cluster build
    edcache --address HOST[:PORT] --dataset pkg.module.factory [...]   # a worker host
    edcache info PATH
    edcache verify PATH
    edcache convert SRC DST
    edcache demo [--root DIR] [-n N] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import EdcacheError

SUBCOMMANDS = ("info", "verify", "convert", "demo")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edcache",
        description="Cache a map-style dataset: compute every example once, read it back fast. "
        "Subcommands: info PATH, verify PATH, convert SRC DST, demo.",
    )
    p.add_argument("--dataset", metavar="FACTORY", help="import path of a callable returning the dataset")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores; 0: in-process)")
    p.add_argument("--chunk-size", type=int, default=64, help="examples per chunk / shard (default 64)")
    p.add_argument("--force", action="store_true", help="run caching even if the cache is complete")
    p.add_argument("--no-keep-existing", action="store_true", help="recompute examples that are already cached")
    p.add_argument("--legacy", action="store_true", help="write edflow's zip layout (<root>/cached/<name>.zip)")
    p.add_argument("--allow-pickle", action="store_true", help="store values the safe codec cannot hold as pickles")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    try:
        from .distributed import add_distributed_arguments
    except ImportError:
        p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--address", default=None, help=argparse.SUPPRESS)
    else:
        add_distributed_arguments(p)
    return p


def _build(args: argparse.Namespace) -> int:
    from ..build.worker import import_factory
    from ..cached import CachedDataset

    if not args.dataset:
        print("edcache: --dataset FACTORY is required (e.g. edcache --dataset edcache.demo.make_demo)", file=sys.stderr)
        return 2
    dataset = import_factory(args.dataset)()
    ds = CachedDataset(
        dataset,
        force_cache=args.force,
        keep_existing=not args.no_keep_existing,
        _legacy=True if args.legacy else None,
        chunk_size=args.chunk_size,
        num_workers=args.workers,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
    )
    print(f"cache complete: {ds.path} ({len(ds)} examples)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edcache`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv[0], argv[1:])
        args = _build_parser().parse_args(argv)
        if args.server or args.address:
            try:
                from . import distributed
            except ImportError as exc:
                print(f"edcache: --server/--address need the distributed extra "
                      f"(pip install 'edcache[distributed]'): {exc}", file=sys.stderr)
                return 2
            return distributed.dispatch(args)
        return _build(args)
    except EdcacheError as exc:
        print(f"edcache: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edcache: interrupted; committed chunks are kept, run again to resume", file=sys.stderr)
        return 130


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "info":
        p = argparse.ArgumentParser(prog="edcache info", description="Describe a cache.")
        p.add_argument("path", help="cache directory or edflow zip")
        args = p.parse_args(argv)
        from .info import describe

        print(describe(args.path))
        return 0
    if name == "demo":
        p = argparse.ArgumentParser(prog="edcache demo", description="Cache the built-in JPEG demo dataset on all cores.")
        p.add_argument("--root", default=None, help="folder for images and cache (default ~/.cache/edcache-demo)")
        p.add_argument("-n", type=int, default=2000, help="number of images (default 2000)")
        p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
        p.add_argument("--no-progress", action="store_true")
        args = p.parse_args(argv)
        from .demo import run_demo

        return run_demo(args.root, args.n, args.workers, progress=not args.no_progress)
    if name == "verify":
        from ..verify import main_verify

        return main_verify(argv)
    if name == "convert":
        p = argparse.ArgumentParser(prog="edcache convert", description=(
            "Convert between formats: an edflow zip or folder to the new format, or the new format "
            "to an edflow zip (when DST ends in .zip). DST is the cache's own path."))
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--allow-pickle", action="store_true", help="trust pickles in SRC that need other globals")
        p.add_argument("--no-progress", action="store_true")
        args = p.parse_args(argv)
        from ..convert import convert

        convert(args.src, args.dst, allow_pickle=args.allow_pickle, progress=not args.no_progress)
        print(f"converted {args.src} -> {args.dst}")
        return 0
    raise AssertionError(name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
