"""Command-line wiring of the distributed mode: ``edcache --server`` / ``edcache --address``.

``edcache.cli.main`` calls :func:`add_distributed_arguments` on its parser and, when
``--server`` or ``--address`` is given, :func:`run_server` / :func:`run_worker`.
``python -m edcache.cli.distributed`` runs the same two modes on their own.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

EXIT_OK = 0
EXIT_TIMEOUT = 1
EXIT_USAGE = 2  # bad --dataset, bad arguments
EXIT_CLUSTER = 3  # credentials refused, scheduler unreachable, cluster failure
EXIT_BUILD = 4  # the dataset raised, or the build failed otherwise


def _add(parser: Any, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has one of its flags (main.py's own)."""
    existing = getattr(parser, "_option_string_actions", {})
    if any(flag in existing for flag in flags):
        return
    parser.add_argument(*flags, **kwargs)


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--server`` / ``--address`` options (and the few they share with a local build)."""
    from ..distributed.config import DEFAULT_ALLOWED_FAILURES, DEFAULT_PORT, DEFAULT_WORKER_TTL

    _add(parser, "--dataset", metavar="pkg.module.factory",
         help="import path of a callable returning the dataset to cache")
    _add(parser, "--chunk-size", type=int, default=64, metavar="N",
         help="consecutive examples per chunk (unit of work and of one shard file; default 64)")
    g = parser.add_argument_group(
        "distributed caching (Dask)",
        "One server: `edcache --server --dataset F`; any number of worker hosts: the "
        "`edcache --address ...` command the server prints.",
    )
    _add(g, "--server", action="store_true",
         help="run the scheduler and the build coordinator; exit 0 when the cache is complete")
    _add(g, "--address", metavar="HOST[:PORT]",
         help=f"join the server at HOST (port {DEFAULT_PORT} unless given) as a worker host")
    _add(g, "--host", default="0.0.0.0",
         help="server: interface to listen on (default all; the cluster is mutual-TLS only)")
    _add(g, "--port", type=int, default=DEFAULT_PORT, help=f"server: port (default {DEFAULT_PORT})")
    _add(g, "--local-workers", type=int, default=0, metavar="N",
         help="server: also run N worker processes on this host")
    _add(g, "--nworkers", type=int, default=None, metavar="N",
         help="worker host: number of single-threaded worker processes (default: all cores)")
    _add(g, "--credentials", metavar="FILE",
         help="the cluster's credentials file (server: created 0600 if missing; default "
              "$EDCACHE_CREDENTIALS or ~/.edcache/credentials.pem)")
    _add(g, "--tls-ca", metavar="PEM", help="your own CA certificate (instead of --credentials)")
    _add(g, "--tls-cert", metavar="PEM", help="your own certificate (instead of --credentials)")
    _add(g, "--tls-key", metavar="PEM", help="the key of --tls-cert, if not inside it")
    _add(g, "--shared-fs", action="store_true",
         help="server: workers see the cache directory (shared file system) and write shard "
              "files there themselves; only metadata travels")
    _add(g, "--worker-ttl", type=float, default=DEFAULT_WORKER_TTL, metavar="SECONDS",
         help=f"server: drop a silent worker host after this long (default {DEFAULT_WORKER_TTL:.0f})")
    _add(g, "--allowed-failures", type=int, default=DEFAULT_ALLOWED_FAILURES, metavar="N",
         help="server: worker deaths a chunk may see before the build fails "
              f"(default {DEFAULT_ALLOWED_FAILURES}; raise it on preemptible hosts)")
    _add(g, "--timeout", type=float, default=600.0, metavar="SECONDS",
         help="worker host: give up after this long without a server (default 600; 0 = never)")
    _add(g, "--dashboard", type=int, default=None, metavar="PORT",
         help="server: serve Dask's dashboard on 127.0.0.1:PORT (off by default)")
    _add(g, "--verbose", action="store_true", help="log Dask's messages")
    # options main.py has for local builds, for `python -m edcache.cli.distributed`
    _add(parser, "--force", action="store_true", help=argparse.SUPPRESS)
    _add(parser, "--no-keep-existing", action="store_true", help=argparse.SUPPRESS)
    _add(parser, "--legacy", action="store_true", help=argparse.SUPPRESS)
    _add(parser, "--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    _add(parser, "--no-progress", action="store_true", help=argparse.SUPPRESS)


def _fail(message: str, code: int) -> int:
    print(f"edcache: error: {message}", file=sys.stderr, flush=True)
    return code


def _handle(fn: Any) -> int:
    from ..errors import ClusterError, DatasetInterfaceError, EdcacheError, ExampleError

    try:
        return int(fn())
    except DatasetInterfaceError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ClusterError as exc:
        return _fail(str(exc), EXIT_CLUSTER)
    except ExampleError as exc:
        return _fail(f"{exc}\nCommitted chunks are kept; fix the dataset and run again to resume.",
                     EXIT_BUILD)
    except EdcacheError as exc:
        notes = "".join(f"\n{n}" for n in getattr(exc, "__notes__", ()))
        return _fail(f"{exc}{notes}", EXIT_BUILD)
    except KeyboardInterrupt:
        return _fail("interrupted; committed chunks are kept", 130)


def run_server(args: argparse.Namespace) -> int:
    """``edcache --server``: returns the exit status."""
    from ..distributed.server import run_server as serve

    return _handle(lambda: serve(
        args.dataset,
        host=args.host,
        port=args.port,
        chunk_size=args.chunk_size,
        local_workers=args.local_workers,
        credentials=args.credentials,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        shared_fs=args.shared_fs,
        worker_ttl=args.worker_ttl,
        allowed_failures=args.allowed_failures,
        dashboard=args.dashboard,
        force=bool(getattr(args, "force", False)),
        keep_existing=not getattr(args, "no_keep_existing", False),
        legacy=True if getattr(args, "legacy", False) else None,
        allow_pickle=bool(getattr(args, "allow_pickle", False)),
        progress=not getattr(args, "no_progress", False),
        verbose=bool(getattr(args, "verbose", False)),
    ))


def run_worker(args: argparse.Namespace) -> int:
    """``edcache --address``: returns the exit status."""
    from ..distributed.worker import run_worker as work

    return _handle(lambda: work(
        args.address,
        dataset=args.dataset,
        nworkers=args.nworkers,
        credentials=args.credentials,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        timeout=args.timeout,
        verbose=bool(getattr(args, "verbose", False)),
    ))


def dispatch(args: argparse.Namespace) -> int | None:
    """Run ``--server`` / ``--address`` if one was given; ``None`` otherwise."""
    if getattr(args, "server", False) and getattr(args, "address", None):
        return _fail("--server and --address exclude each other", EXIT_USAGE)
    if getattr(args, "server", False):
        return run_server(args)
    if getattr(args, "address", None):
        return run_worker(args)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edcache", description="Cache a dataset on many hosts (Dask, mutual TLS)."
    )
    add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    code = dispatch(args)
    if code is None:
        parser.error("give --server or --address HOST")
    return code


if __name__ == "__main__":
    sys.exit(main())
