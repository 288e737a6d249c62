"""The one ``edcache`` argument parser: a subcommand per task, each option group defined once.

``edcache build|serve|join|info|verify|convert|demo ...``. The edflow-style forms keep
working: ``edcache --dataset F`` is ``build``, ``edcache --server ...`` is ``serve`` and
``edcache --address HOST ...`` is ``join`` (:func:`with_command` rewrites them).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..distributed.config import DEFAULT_ALLOWED_FAILURES, DEFAULT_PORT, DEFAULT_WORKER_TTL

COMMANDS = """commands:
  edcache --dataset pkg.module.factory [options]   build (or resume, or open) a cache locally
  edcache info PATH [--allow-pickle]                length, size, completeness, label keys
  edcache verify PATH [--deep] [--allow-pickle]     check every file against its checksum
  edcache convert SRC DST [--allow-pickle]          edflow zip/folder <-> new format
  edcache demo [--root DIR] [-n N] [--workers N]    cache the demo dataset, compare read speed
  edcache --server / --address HOST ...             multi-machine builds (docs/distributed.md)
Run 'edcache COMMAND --help' for a command's options."""

#: The subcommands.
NAMES = ("build", "serve", "join", "info", "verify", "convert", "demo")
_ALLOW_PICKLE_READ = "open a cache built with allow_pickle=True (trust its files)"


def _group(title: str, description: str | None = None) -> tuple[argparse.ArgumentParser, Any]:
    """A parent parser holding one option group (commands share it via ``parents=``)."""
    parent = argparse.ArgumentParser(add_help=False)
    return parent, parent.add_argument_group(title, description)


def _dataset_options() -> argparse.ArgumentParser:
    parent, g = _group("the dataset")
    g.add_argument("--dataset", metavar="FACTORY", help="import path of a callable returning the dataset "
                   "(pkg.module.factory; modules in the current directory are found, as with python -m)")
    g.add_argument("--chunk-size", type=int, default=64, metavar="N",
                   help="consecutive examples per chunk (unit of work and of one shard file; default 64)")
    return parent


def _build_options() -> argparse.ArgumentParser:
    parent, g = _group("building")
    g.add_argument("--force", action="store_true", help="run caching even if the cache is complete")
    g.add_argument("--no-keep-existing", action="store_true", help="recompute examples that are already cached")
    g.add_argument("--legacy", action="store_true", help="write edflow's zip layout (<root>/cached/<name>.zip)")
    g.add_argument("--allow-pickle", action="store_true", help="store values the safe codec cannot hold as pickles")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--codec", action="append", default=[], metavar="FIELD=SPEC",
                   help="store FIELD with a codec (zstd[:level], lz4, png, jpeg[:quality], webp[:quality|"
                        "lossless], raw); FIELD * (or a bare SPEC) names every array column; repeatable")
    return parent


def codecs_argument(items: list[str]) -> str | dict | None:
    """``--codec FIELD=SPEC`` options as ``codecs=``: a digit FIELD is a tuple position."""
    codecs: dict = {}
    for item in items:
        field, sep, spec = item.rpartition("=")
        if not sep or field in ("", "*"):
            codecs[None] = spec
        else:
            codecs[int(field) if field.isdigit() else field] = spec
    if list(codecs) == [None]:
        return codecs[None]
    return codecs or None


def _cluster_options() -> argparse.ArgumentParser:
    parent, g = _group("the cluster's credentials (mutual TLS)")
    g.add_argument("--credentials", metavar="FILE",
                   help="the cluster's credentials file (server: created 0600 if missing; default "
                        "$EDCACHE_CREDENTIALS or ~/.edcache/credentials.pem)")
    g.add_argument("--tls-ca", metavar="PEM", help="your own CA certificate (instead of --credentials)")
    g.add_argument("--tls-cert", metavar="PEM", help="your own certificate (instead of --credentials)")
    g.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert, if not inside it")
    g.add_argument("--verbose", action="store_true", help="log Dask's messages")
    return parent


def _server_options() -> argparse.ArgumentParser:
    parent, g = _group("the server")
    g.add_argument("--host", default="0.0.0.0",
                   help="interface to listen on (default all; the cluster is mutual-TLS only)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    g.add_argument("--local-workers", type=int, default=0, metavar="N", help="also run N worker processes here")
    g.add_argument("--shared-fs", action="store_true",
                   help="workers see the cache directory (shared file system) and write shard files "
                        "there themselves; only metadata travels")
    g.add_argument("--worker-ttl", type=float, default=DEFAULT_WORKER_TTL, metavar="SECONDS",
                   help=f"drop a silent worker host after this long (default {DEFAULT_WORKER_TTL:.0f})")
    g.add_argument("--allowed-failures", type=int, default=DEFAULT_ALLOWED_FAILURES, metavar="N",
                   help="worker deaths a chunk may see before the build fails "
                        f"(default {DEFAULT_ALLOWED_FAILURES}; raise it on preemptible hosts)")
    g.add_argument("--dashboard", type=int, default=None, metavar="PORT",
                   help="serve Dask's dashboard on 127.0.0.1:PORT (off by default)")
    return parent


def _worker_options() -> argparse.ArgumentParser:
    parent, g = _group("the worker host")
    g.add_argument("--address", metavar="HOST[:PORT]", required=True,
                   help=f"the server to join (port {DEFAULT_PORT} unless given)")
    g.add_argument("--nworkers", type=int, default=None, metavar="N",
                   help="number of single-threaded worker processes (default: all cores)")
    g.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="give up after this long without a server (default 600; 0 = never)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``edcache`` command."""
    p = argparse.ArgumentParser(
        prog="edcache",
        description="Cache a map-style dataset: compute every example once, read it back fast.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    dataset, build, cluster = _dataset_options(), _build_options(), _cluster_options()

    b = sub.add_parser("build", parents=[dataset, build], help="build (or resume, or open) a cache locally "
                       "(also: edcache --dataset FACTORY ...)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores; 0: in-process)")
    sub.add_parser("serve", parents=[dataset, build, cluster, _server_options()],
                   help="run the scheduler and the build coordinator; exit 0 when the cache is complete "
                        "(also: edcache --server ...)",
                   description="One server: `edcache --server --dataset F`; any number of worker hosts: "
                               "the `edcache --address ...` command the server prints.")
    sub.add_parser("join", parents=[dataset, cluster, _worker_options()],
                   help="join a server as a worker host (also: edcache --address HOST ...)")

    info = sub.add_parser("info", help="describe a cache", description="Describe a cache.")
    info.add_argument("path", help="cache directory or edflow zip")
    info.add_argument("--allow-pickle", action="store_true", help=_ALLOW_PICKLE_READ)

    verify = sub.add_parser(
        "verify", help="check every file of a cache against its checksum",
        description="Check every shard, label column and index file of a cache against its "
        "recorded sizes and xxh3 checksums; name each damaged file and the examples it holds.",
    )
    verify.add_argument("path", help="cache directory (<root>/cached/<name>) or edflow .zip")
    verify.add_argument("--deep", action="store_true",
                        help="also decode every record (catches damage a checksum cannot: a file "
                        "rewritten with a matching checksum, a codec bug); slower")
    verify.add_argument("--allow-pickle", action="store_true",
                        help="with --deep, decode pickled values of a trusted allow_pickle cache")

    convert = sub.add_parser("convert", help="convert between formats", description=(
        "Convert between formats: an edflow zip or folder to the new format, or the new format "
        "to an edflow zip (when DST ends in .zip). DST is the cache's own path."))
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="trust SRC's pickles (values needing other globals, an allow_pickle=True cache)")
    convert.add_argument("--no-progress", action="store_true")

    demo = sub.add_parser("demo", help="cache the demo dataset and compare read speed",
                          description="Cache the built-in JPEG demo dataset on all cores.")
    demo.add_argument("--root", default=None, help="folder for images and cache (default ~/.cache/edcache-demo)")
    demo.add_argument("-n", type=int, default=2000, help="number of images (default 2000)")
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    demo.add_argument("--no-progress", action="store_true")
    return p


def with_command(argv: Sequence[str]) -> list[str]:
    """``argv`` with its subcommand first: the edflow-style ``--server`` means ``serve``,
    ``--address`` means ``join``, and other options without a command mean ``build``.

    Raises ``ValueError`` for ``--server`` together with ``--address``.
    """
    argv = list(argv)
    if not argv or argv[0] in NAMES or argv[0] in ("-h", "--help"):
        return argv
    server = "--server" in argv
    address = any(a == "--address" or a.startswith("--address=") for a in argv)
    if server and address:
        raise ValueError("--server and --address exclude each other")
    if server:
        return ["serve", *(a for a in argv if a != "--server")]
    return ["join" if address else "build", *argv]


__all__ = ["COMMANDS", "NAMES", "build_parser", "with_command"]
