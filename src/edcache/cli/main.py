"""``edcache``: build, inspect, verify and convert caches from a shell.

Usage::

    edcache --dataset pkg.module.factory [--workers N] [--chunk-size N] [--force] [--no-keep-existing]
    edcache --server --dataset pkg.module.factory [...]     # coordinate a cluster build
    edcache --address HOST[:PORT] --dataset pkg.module.factory [...]   # a worker host
    edcache info PATH [--allow-pickle]
    edcache verify PATH [--deep] [--allow-pickle]
    edcache convert SRC DST [--allow-pickle]
    edcache demo [--root DIR] [-n N] [--workers N]

(``build``, ``serve`` and ``join`` are the subcommands of the first three forms; the
parser is :mod:`edcache.cli.parser`, the exit statuses :mod:`edcache.cli.exits`.)
Errors print one line (``edcache: error: ...``) with what to do, and a non-zero status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import EdcacheError
from .exits import Exit, fail, hint
from .parser import COMMANDS, build_parser, codecs_argument, with_command


def _build(args: argparse.Namespace) -> int:
    from ..building.compute import import_factory
    from ..cached import CachedDataset

    if not args.dataset:
        print("edcache: --dataset FACTORY is required (e.g. edcache --dataset edcache.demo.make_demo)", file=sys.stderr)
        return Exit.USAGE
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
        codecs=codecs_argument(args.codec),
    )
    print(f"cache complete: {ds.path} ({len(ds)} examples)")
    return Exit.OK


def _import_from_cwd() -> None:
    """Let ``--dataset mymodule.factory`` find ``mymodule.py`` in the working directory, as
    ``python -m`` would (a console script's ``sys.path`` starts with its own folder).
    Worker processes inherit the path (fork) or are given it (spawn)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _quiet_broken_pipe() -> int:
    """stdout was closed early (``edcache info PATH | head -3``): exit quietly, as cat does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail too
    return Exit.BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edcache`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:  # a first look: what the commands are
            print("edcache: compute a map-style dataset once into a fast, checksummed cache.\n")
            print(COMMANDS)
            return Exit.OK
        try:
            argv = with_command(argv)
        except ValueError as exc:
            return fail(str(exc), Exit.USAGE)
        args = build_parser().parse_args(argv)
        if args.command in ("build", "serve", "join"):
            _import_from_cwd()
        return int(COMMAND_RUNNERS[args.command](args))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except EdcacheError as exc:
        return fail(f"{exc}{hint(exc)}", Exit.FAILED)
    except OSError as exc:  # a file we were pointed at: missing, unreadable, in the way
        return fail(str(exc), Exit.FAILED)
    except KeyboardInterrupt:
        print("edcache: interrupted; committed chunks are kept, run again to resume", file=sys.stderr)
        return Exit.INTERRUPTED


def _info(args: argparse.Namespace) -> int:
    print(_describe(args.path, args.allow_pickle))
    return Exit.OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.root, args.n, args.workers, progress=not args.no_progress)


def _convert(args: argparse.Namespace) -> int:
    from ..convert import convert

    try:
        convert(args.src, args.dst, allow_pickle=args.allow_pickle, progress=not args.no_progress)
    except FileExistsError as exc:
        return fail(f"{exc} (convert never overwrites: delete DST or choose another path)", Exit.FAILED)
    except ValueError as exc:  # the two paths do not make a conversion
        return fail(str(exc), Exit.USAGE)
    print(f"converted {args.src} -> {args.dst}")
    return Exit.OK


def _serve(args: argparse.Namespace) -> int:
    from .distributed import run_server

    return run_server(args)


def _join(args: argparse.Namespace) -> int:
    from .distributed import run_worker

    return run_worker(args)


def _describe(path: str, allow_pickle: bool) -> str:
    from . import info

    return info.describe(path, allow_pickle=allow_pickle)


def _verify(args: argparse.Namespace) -> int:
    from ..verify import verify_command

    return verify_command(args.path, deep=args.deep, allow_pickle=args.allow_pickle)


#: What each subcommand runs.
COMMAND_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": _build, "serve": _serve, "join": _join, "info": _info, "verify": _verify,
    "convert": _convert, "demo": _demo,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
