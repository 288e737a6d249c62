"""``edcache serve`` / ``edcache join`` (edflow's ``edcache --server`` / ``edcache --address``).

The options are those of :mod:`edcache.cli.parser`; the exit statuses those of
:mod:`edcache.cli.exits` (a bad ``--dataset`` is a usage error, 2; a refused or
unreachable cluster 3; a failed build 4). ``python -m edcache.cli.distributed`` runs
the same two modes on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .exits import Exit, cluster_failure, fail
from .parser import codecs_argument

#: The message when the ``distributed`` extra is missing.
_EXTRA = "serve/join (--server/--address) need the distributed extra (pip install 'edcache[distributed]')"


def _run(body: Callable[[], Any]) -> int:
    try:
        return int(body())
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("dask", "distributed", "cryptography", "cloudpickle"):
            raise
        return fail(f"{_EXTRA}: {exc}", Exit.USAGE)
    except (KeyboardInterrupt, Exception) as exc:  # cluster_failure re-raises what it does not map
        return cluster_failure(exc)


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the cluster's credentials group, as both modes take them."""
    return {"credentials": args.credentials, "ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key,
            "verbose": args.verbose}


def run_server(args: argparse.Namespace) -> int:
    """``edcache serve`` (``edcache --server``): returns the exit status."""

    def serve() -> int:
        from ..distributed.server import run_server as serve

        return serve(
            args.dataset,
            host=args.host,
            port=args.port,
            chunk_size=args.chunk_size,
            local_workers=args.local_workers,
            shared_fs=args.shared_fs,
            worker_ttl=args.worker_ttl,
            allowed_failures=args.allowed_failures,
            dashboard=args.dashboard,
            force=args.force,
            keep_existing=not args.no_keep_existing,
            legacy=True if args.legacy else None,
            allow_pickle=args.allow_pickle,
            progress=not args.no_progress,
            codecs=codecs_argument(args.codec),
            **_credentials(args),
        )

    return _run(serve)


def run_worker(args: argparse.Namespace) -> int:
    """``edcache join`` (``edcache --address``): returns the exit status."""

    def join() -> int:
        from ..distributed.worker import run_worker as work

        return work(
            args.address,
            dataset=args.dataset,
            nworkers=args.nworkers,
            timeout=args.timeout,
            **_credentials(args),
        )

    return _run(join)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edcache.cli.distributed --server ...`` or ``... --address HOST ...``."""
    from .parser import build_parser, with_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--server" or a.startswith("--address") for a in argv):
        return fail("give --server or --address HOST", Exit.USAGE)
    try:
        args = build_parser().parse_args(with_command(argv))
    except ValueError as exc:
        return fail(str(exc), Exit.USAGE)
    return run_server(args) if args.command == "serve" else run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
