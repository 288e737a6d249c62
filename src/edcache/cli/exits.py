"""The exit statuses of every ``edcache`` command, and which error gives which (one table)."""

from __future__ import annotations

import sys
from enum import IntEnum

from ..errors import (
    CacheNotFoundError,
    ClusterError,
    DatasetInterfaceError,
    EdcacheError,
    ExampleError,
    UnsafePickleError,
)

PICKLE_HINT = "on the command line: --allow-pickle, if you trust the cache's files"


class Exit(IntEnum):
    """What an ``edcache`` process exits with."""

    #: Done: the cache is complete (``build``, ``serve``, ``join``), intact (``verify``), ...
    OK = 0
    #: A local command failed (any edcache error, an unusable file); ``verify``: damage
    #: found; ``join``: no server was reachable for ``--timeout`` seconds.
    FAILED = 1
    #: Bad arguments; ``serve``/``join``: a ``--dataset`` that cannot be imported;
    #: ``verify``: no cache at the path; ``convert``: the paths make no conversion.
    USAGE = 2
    #: ``serve``/``join``: credentials refused, scheduler unreachable, the cluster failed.
    CLUSTER = 3
    #: ``serve``: the dataset raised, or the build failed otherwise.
    BUILD = 4
    #: Stopped by Ctrl-C or SIGTERM (committed chunks are kept).
    INTERRUPTED = 130
    #: stdout was closed early (``edcache info PATH | head -3``), as a shell reports SIGPIPE.
    BROKEN_PIPE = 141


def fail(message: str, code: Exit) -> Exit:
    """Print ``edcache: error: message`` (one line per line of the message) and return ``code``."""
    print(f"edcache: error: {message}", file=sys.stderr, flush=True)
    return code


def hint(exc: Exception) -> str:
    """What to do about ``exc``, when the message does not say it already."""
    if isinstance(exc, CacheNotFoundError):
        return " (give a cache directory, <root>/cached/<name>, or an edflow .zip)"
    if isinstance(exc, UnsafePickleError) or "allow_pickle=True" in str(exc):
        return f" ({PICKLE_HINT})"
    if isinstance(exc, DatasetInterfaceError) and "cannot import module" in str(exc):
        return (" (modules are looked up in the current directory and on PYTHONPATH: run edcache "
                "where the module is, or add its folder to PYTHONPATH)")
    return ""


def cluster_failure(exc: BaseException) -> Exit:
    """The status and message of an error raised by ``serve`` or ``join``, which tell a
    bad ``--dataset`` (a usage error) and cluster failures apart from a failed build."""
    if isinstance(exc, KeyboardInterrupt):
        return fail("interrupted; committed chunks are kept", Exit.INTERRUPTED)
    if isinstance(exc, DatasetInterfaceError):
        return fail(str(exc), Exit.USAGE)
    if isinstance(exc, ClusterError):
        return fail(str(exc), Exit.CLUSTER)
    if isinstance(exc, ExampleError):
        return fail(f"{exc}\nCommitted chunks are kept; fix the dataset and run again to resume.", Exit.BUILD)
    if isinstance(exc, EdcacheError):
        notes = "".join(f"\n{n}" for n in getattr(exc, "__notes__", ()))
        return fail(f"{exc}{notes}", Exit.BUILD)
    raise exc


__all__ = ["PICKLE_HINT", "Exit", "cluster_failure", "fail", "hint"]
