"""The settings edcache's Dask server, workers and executor share (one place for each)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

#: The port of ``edcache --server`` (and of a ``tls://host`` address without one).
DEFAULT_PORT = 63127
#: Seconds after which a silent worker host is dropped and its chunks are recomputed.
DEFAULT_WORKER_TTL = 60.0
#: Worker deaths one chunk may see before the build fails.
DEFAULT_ALLOWED_FAILURES = 10


def dask_config(
    worker_ttl: float = DEFAULT_WORKER_TTL, allowed_failures: int = DEFAULT_ALLOWED_FAILURES
) -> dict[str, Any]:
    """The Dask settings edcache's server and workers run with."""
    return {
        "distributed.scheduler.worker-ttl": f"{worker_ttl}s",
        "distributed.scheduler.allowed-failures": int(allowed_failures),
        "distributed.comm.require-encryption": True,
        # TLS handshakes on a loaded machine can be slow; never give up too early
        "distributed.comm.timeouts.connect": "30s",
    }


def configure_logging(verbose: bool) -> None:
    """distributed logs at INFO by default; keep the CLI quiet unless ``verbose``."""
    # worker processes configure logging from the environment when they import Dask
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose else "warning")

    level = logging.INFO if verbose else logging.WARNING
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(level)


def print_status(message: str, n_workers: int = 0, *, prefix: str = "edcache") -> None:
    """Print a cluster event (workers joining or leaving) above the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"{prefix}: {message}", file=sys.stderr)
    sys.stderr.flush()


__all__ = [
    "DEFAULT_ALLOWED_FAILURES",
    "DEFAULT_PORT",
    "DEFAULT_WORKER_TTL",
    "configure_logging",
    "dask_config",
    "print_status",
]
