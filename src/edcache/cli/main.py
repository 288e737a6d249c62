"""``edcache``: build, inspect, verify and convert caches from a shell.

Usage::

    edcache --dataset pkg.module.factory [--workers N] [--chunk-size N] [--force] [--no-keep-existing]
    edcache --server --dataset pkg.module.factory [...]     # coordinate a cluster build
    edcache --address HOST[:PORT] --dataset pkg.module.factory [...]   # a worker host
    edcache info PATH [--allow-pickle]
    edcache verify PATH [--deep] [--allow-pickle]
    edcache convert SRC DST [--allow-pickle]
    edcache demo [--root DIR] [-n N] [--workers N]

Errors print one line (``edcache: error: ...``) with what to do, and a non-zero status.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import EdcacheError

SUBCOMMANDS = ("info", "verify", "convert", "demo")

COMMANDS = """commands:
  edcache --dataset pkg.module.factory [options]   build (or resume, or open) a cache locally
  edcache info PATH [--allow-pickle]                length, size, completeness, label keys
  edcache verify PATH [--deep] [--allow-pickle]     check every file against its checksum
  edcache convert SRC DST [--allow-pickle]          edflow zip/folder <-> new format
  edcache demo [--root DIR] [-n N] [--workers N]    cache the demo dataset, compare read speed
  edcache --server / --address HOST ...             multi-machine builds (docs/distributed.md)
Run 'edcache COMMAND --help' for a command's options."""

PICKLE_HINT = "on the command line: --allow-pickle, if you trust the cache's files"


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edcache",
        description="Cache a map-style dataset: compute every example once, read it back fast.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", metavar="FACTORY", help="import path of a callable returning the "
                   "dataset (modules in the current directory are found, as with python -m)")
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
    from ..building.compute import import_factory
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


def _import_from_cwd() -> None:
    """Let ``--dataset mymodule.factory`` find ``mymodule.py`` in the working directory, as
    ``python -m`` would (a console script's ``sys.path`` starts with its own folder).
    Worker processes inherit the path (fork) or are given it (spawn)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _hint(exc: Exception) -> str:
    """What to do about ``exc``, when the message does not say it already."""
    from ..errors import CacheNotFoundError, DatasetInterfaceError, UnsafePickleError

    if isinstance(exc, CacheNotFoundError):
        return " (give a cache directory, <root>/cached/<name>, or an edflow .zip)"
    if isinstance(exc, UnsafePickleError) or "allow_pickle=True" in str(exc):
        return f" ({PICKLE_HINT})"
    if isinstance(exc, DatasetInterfaceError) and "cannot import module" in str(exc):
        return (" (modules are looked up in the current directory and on PYTHONPATH: run edcache "
                "where the module is, or add its folder to PYTHONPATH)")
    return ""


def _quiet_broken_pipe() -> int:
    """stdout was closed early (``edcache info PATH | head -3``): exit quietly, as cat does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail too
    return 141  # 128 + SIGPIPE, what a shell reports for a program killed by it


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edcache`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:  # a first look: what the commands are, not every build option
            print("edcache: compute a map-style dataset once into a fast, checksummed cache.\n")
            print(COMMANDS.replace("Run 'edcache COMMAND --help'",
                                   "Run 'edcache --help' for every build option, 'edcache COMMAND --help'"))
            return 0
        if argv[0] in SUBCOMMANDS:
            return _subcommand(argv[0], argv[1:])
        args = _build_parser().parse_args(argv)
        _import_from_cwd()
        if args.server or args.address:
            try:
                from . import distributed
            except ImportError as exc:
                print(f"edcache: --server/--address need the distributed extra "
                      f"(pip install 'edcache[distributed]'): {exc}", file=sys.stderr)
                return 2
            return distributed.dispatch(args)
        return _build(args)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except EdcacheError as exc:
        print(f"edcache: error: {exc}{_hint(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file we were pointed at: missing, unreadable, in the way
        print(f"edcache: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edcache: interrupted; committed chunks are kept, run again to resume", file=sys.stderr)
        return 130


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "info":
        p = argparse.ArgumentParser(prog="edcache info", description="Describe a cache.")
        p.add_argument("path", help="cache directory or edflow zip")
        p.add_argument("--allow-pickle", action="store_true",
                       help="open a cache built with allow_pickle=True (trust its files)")
        args = p.parse_args(argv)
        print(_describe(args.path, args.allow_pickle))
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
        return _verify(argv)
    if name == "convert":
        p = argparse.ArgumentParser(prog="edcache convert", description=(
            "Convert between formats: an edflow zip or folder to the new format, or the new format "
            "to an edflow zip (when DST ends in .zip). DST is the cache's own path."))
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--allow-pickle", action="store_true",
                       help="trust SRC's pickles (values needing other globals, an allow_pickle=True cache)")
        p.add_argument("--no-progress", action="store_true")
        args = p.parse_args(argv)
        from ..convert import convert

        try:
            convert(args.src, args.dst, allow_pickle=args.allow_pickle, progress=not args.no_progress)
        except FileExistsError as exc:
            print(f"edcache: error: {exc} (convert never overwrites: delete DST or choose another "
                  "path)", file=sys.stderr)
            return 1
        except ValueError as exc:  # the two paths do not make a conversion
            print(f"edcache: error: {exc}", file=sys.stderr)
            return 2
        print(f"converted {args.src} -> {args.dst}")
        return 0
    raise AssertionError(name)


def _describe(path: str, allow_pickle: bool) -> str:
    from . import info

    return info.describe(path, allow_pickle=allow_pickle)


def _verify(argv: list[str]) -> int:
    """``edcache verify PATH [--deep] [--allow-pickle]``: 0 intact, 1 damaged, 2 no cache."""
    from ..errors import CacheNotFoundError
    from ..verify import verify_cache

    p = argparse.ArgumentParser(
        prog="edcache verify",
        description="Check every shard, label column and index file of a cache against its "
        "recorded sizes and xxh3 checksums; name each damaged file and the examples it holds.",
    )
    p.add_argument("path", help="cache directory (<root>/cached/<name>) or edflow .zip")
    p.add_argument("--deep", action="store_true",
                   help="also decode every record (catches damage a checksum cannot: a file "
                   "rewritten with a matching checksum, a codec bug); slower")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --deep, decode pickled values of a trusted allow_pickle cache")
    args = p.parse_args(argv)
    try:
        report = verify_cache(args.path, deep=args.deep, allow_pickle=args.allow_pickle)
    except CacheNotFoundError as exc:
        print(f"edcache: error: {exc}{_hint(exc)}", file=sys.stderr)
        return 2
    lines = str(report).splitlines()
    if report.format == "edcache":
        depth = ("records: every record decoded (--deep)" if args.deep
                 else "records: checksums only (--deep also decodes every record)")
    elif report.format == "edflow zip":  # nothing is unpickled to verify a zip
        depth = "records: each member's CRC-32 checked" + (" (--deep adds nothing for a zip)" if args.deep else "")
    else:
        depth = ""
    if depth:
        lines.insert(min(3, len(lines)), f"  {depth}")
    print("\n".join(lines))
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
