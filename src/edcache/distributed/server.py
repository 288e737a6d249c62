"""``edcache --server``: a Dask scheduler and the build coordinator in one process.

The scheduler runs on a private event-loop thread of this process; the coordinator
(the usual :func:`~edcache.building.coordinator.run_build` loop, driven through
:class:`~edcache.CachedDataset`) connects to it with a :class:`DaskExecutor` and is the
only writer of the cache. Workers join with ``edcache --address`` (the exact command
is printed on start); ``--local-workers N`` also runs N workers here.

Cluster settings (see ``docs/distributed.md``):

* mutual TLS with the cluster's credentials file (created 0600 on first start);
  ``require-encryption`` on; plain TCP and foreign certificates are refused;
* the HTTP routes of the scheduler and workers (health, metrics, optional dashboard)
  listen on 127.0.0.1 only;
* ``worker-ttl`` 60 s: a hung or cut-off host is dropped within about a minute and
  its chunks are recomputed elsewhere;
* ``allowed-failures`` 10: preemptible hosts dying under a healthy chunk do not make
  the build fail (a chunk that kills 11 workers does).

A killed server loses nothing that was committed: starting it again resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ClusterError
from .config import (
    DEFAULT_ALLOWED_FAILURES,
    DEFAULT_PORT,
    DEFAULT_WORKER_TTL,
    configure_logging,
    dask_config,
    print_status,
)
from .worker import SlotOptions, listen_host_for, mark_done, run_slots


def public_host(host: str) -> str:
    """The name workers should use for a server bound to ``host``.

    For a wildcard bind: the host's fully qualified name if it resolves to a
    non-loopback address, else the address of the interface with the default route
    (found by a UDP ``connect``, which sends nothing), else the host name.
    """
    if host not in ("", "0.0.0.0", "::", "[::]"):
        return host
    name = socket.getfqdn()
    try:
        if not socket.gethostbyname(name).startswith("127."):
            return name
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only a route lookup
            ip = s.getsockname()[0]
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    except OSError:
        pass
    return socket.gethostname()


class InProcessCluster:
    """A TLS Dask scheduler (plus optional local worker slots) on a private loop thread."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: Any,
        local_workers: int = 0,
        dashboard: int | None = None,
        verbose: bool = False,
        worker_ttl: float | None = DEFAULT_WORKER_TTL,
    ) -> None:
        self.worker_ttl = worker_ttl
        self.host = host
        self.port = port
        self.security = security
        self.local_workers = local_workers
        self.dashboard = dashboard
        self.verbose = verbose
        self.scheduler: Any = None
        self.address: str | None = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._slots: Any = None
        self._watchdog: Any = None

    def _call(self, coro: Any, timeout: float | None = 120) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> str:
        """Start the scheduler (and local workers); return its ``tls://`` address."""
        if self.address is not None:
            return self.address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edcache-scheduler", daemon=True)
        self._thread.start()
        self.address = self._call(self._start())
        return self.address

    async def _start(self) -> str:
        from distributed import Scheduler

        dash = self.dashboard is not None
        self.scheduler = Scheduler(
            host=self.host or None,
            port=self.port,
            protocol="tls",
            security=self.security,
            dashboard=dash,
            dashboard_address=f"127.0.0.1:{self.dashboard if dash else 0}",
        )
        try:
            await self.scheduler
        except Exception as exc:
            raise ClusterError(
                f"cannot start the scheduler on {self.host or '*'}:{self.port}: {exc}"
            ) from exc
        self._stop = asyncio.Event()
        if self.worker_ttl:
            self._watchdog = asyncio.ensure_future(self._drop_silent_workers(self.worker_ttl))
        if self.local_workers:
            # listen where remote workers can reach them (they fetch data from peers)
            public = f"tls://{public_host(self.host)}:{self.scheduler.port}"
            options = SlotOptions(
                address=self.connect_address(), security=self.security, timeout=None,
                listen_host=listen_host_for(public), verbose=self.verbose,
            )
            self._slots = asyncio.ensure_future(run_slots(options, self.local_workers, self._stop))
        return self.scheduler.address

    async def _drop_silent_workers(self, ttl: float) -> None:
        """Remove a worker silent for ``ttl`` seconds (hung or cut-off host) at once.

        Dask's own ``worker-ttl`` check runs only every ``ttl`` seconds and first asks the
        host's nanny for a restart (30 s timeout), so a hung host would linger for up to
        ``2 * ttl + 30`` s. Removing it here bounds that by about ``1.1 * ttl``; its
        chunks are then recomputed by the other workers. A host that comes back is told
        it is unknown, shuts its worker down, and its slot reconnects.
        """
        from distributed.metrics import time as dask_time

        log = logging.getLogger("edcache.distributed")
        while True:
            await asyncio.sleep(max(0.5, ttl / 10))
            now = dask_time()
            for ws in list(self.scheduler.workers.values()):
                silent = now - ws.last_seen
                if silent > ttl:
                    log.warning("worker %s silent for %.0f s; dropping it", ws.address, silent)
                    with contextlib.suppress(Exception):  # already gone
                        await self.scheduler.remove_worker(
                            ws.address, stimulus_id=f"edcache-worker-ttl-{now}", close=True
                        )

    def connect_address(self) -> str:
        """Where a client on this host reaches the scheduler."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "[::1]"
        return f"tls://{host}:{self.scheduler.port if self.scheduler else self.port}"

    def client(self) -> Any:
        """A synchronous client of the scheduler (created once)."""
        if self._client is None:
            from distributed import Client

            self._client = Client(
                self.connect_address(), security=self.security, timeout="60s",
                set_as_default=False,
            )
        return self._client

    def n_workers(self) -> int:
        return len(self.scheduler.workers) if self.scheduler is not None else 0

    def announce_done(self) -> None:
        """Tell every connected ``edcache --address`` process that the cache is complete."""
        if self._client is None:
            return
        with contextlib.suppress(Exception):  # a worker leaving at this moment: it times out on its own
            self._client.run(mark_done, nanny=True, on_error="ignore")
        deadline = time.monotonic() + 10  # let them close before the scheduler does
        while self.n_workers() and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        """Stop local workers, close the scheduler (remote workers are told to close)."""
        if self._loop is None:
            return
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=10)
            self._client = None

        async def _close() -> None:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._stop is not None:
                self._stop.set()
            if self._slots is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._slots, timeout=30)
            if self.scheduler is not None:
                await self.scheduler.close(reason="edcache-server-exit")

        with contextlib.suppress(Exception):
            self._call(_close(), timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None


def worker_command(
    address: str,
    dataset: str | None,
    credentials: str | None,
    tls: tuple[str | None, str | None, str | None] = (None, None, None),
) -> str:
    """The exact ``edcache --address ...`` command a worker host runs."""
    argv = ["edcache", "--address", address]
    if dataset:
        argv += ["--dataset", dataset]
    ca, cert, key = tls
    if ca or cert:
        argv += ["--tls-ca", os.path.abspath(ca or ""), "--tls-cert", os.path.abspath(cert or "")]
        if key:
            argv += ["--tls-key", os.path.abspath(key)]
    elif credentials:
        argv += ["--credentials", credentials]
    return shlex.join(argv)


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM stop the server like Ctrl-C (workers are told, locks released)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, old)

    return restore


def run_server(
    dataset: str | None,
    *,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    chunk_size: int = 64,
    local_workers: int = 0,
    credentials: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    shared_fs: bool = False,
    worker_ttl: float = DEFAULT_WORKER_TTL,
    allowed_failures: int = DEFAULT_ALLOWED_FAILURES,
    dashboard: int | None = None,
    force: bool = False,
    keep_existing: bool = True,
    legacy: bool | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    verbose: bool = False,
    codecs: str | dict | None = None,
) -> int:
    """The body of ``edcache --server``; returns the process exit status (0: complete).

    With ``dataset=None`` the server only runs the scheduler (for ``CachedDataset(...,
    scheduler=...)`` clients) until it is interrupted.
    """
    import dask

    from ..building.compute import import_factory
    from ..cached import CachedDataset
    from .executor import DaskExecutor
    from .security import ensure_credentials, make_security

    configure_logging(verbose)
    dask.config.set(dask_config(worker_ttl, allowed_failures))
    ds = import_factory(dataset)() if dataset else None

    own_tls = bool(ca or cert or key)
    cred_path = None
    if not own_tls:
        cred_path, created = ensure_credentials(credentials)
        if created:
            print(f"edcache server: created the cluster credentials {cred_path} (mode 0600); "
                  "copy this file to every worker host", file=sys.stderr, flush=True)
    security = make_security(cred_path, ca=ca, cert=cert, key=key)
    cluster = InProcessCluster(
        host=host, port=port, security=security, local_workers=local_workers,
        dashboard=dashboard, verbose=verbose, worker_ttl=worker_ttl,
    )

    def start_cluster() -> str:
        cluster.start()
        shown = f"{public_host(host)}:{cluster.scheduler.port}"
        print(f"edcache server: scheduler at tls://{shown}"
              + (f", {local_workers} local worker(s)" if local_workers else ""), file=sys.stderr)
        print("edcache server: on each worker host run:", file=sys.stderr, flush=True)
        print(worker_command(shown, dataset, cred_path, (ca, cert, key)), flush=True)
        if dashboard is not None:
            print(f"edcache server: dashboard at http://127.0.0.1:{dashboard}/status (this host only)",
                  file=sys.stderr, flush=True)
        return shown

    restore = _sigterm_as_interrupt()
    try:
        if ds is None:
            shown = start_cluster()
            print(f"edcache server: from Python: CachedDataset(dataset, scheduler='tls://{shown}', "
                  f"security={cred_path!r})", file=sys.stderr, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
            return 0

        def executor() -> DaskExecutor:  # the cluster starts only if a build is needed
            start_cluster()
            return DaskExecutor(
                cluster.client(), staged=shared_fs, factory=dataset,
                on_status=functools.partial(print_status, prefix="edcache server"),
                gather_timeout=max(worker_ttl, 1.0),
            )

        cached = CachedDataset(
            ds, force_cache=force, keep_existing=keep_existing, _legacy=legacy,
            chunk_size=chunk_size, allow_pickle=allow_pickle, progress=progress, executor=executor,
            codecs=codecs,
        )
        cluster.announce_done()
        print(f"edcache server: the cache at {cached.path} is complete ({len(cached)} examples)",
              file=sys.stderr, flush=True)
        return 0
    finally:
        restore()
        cluster.close()


__all__ = [
    "DEFAULT_ALLOWED_FAILURES",
    "DEFAULT_PORT",
    "DEFAULT_WORKER_TTL",
    "InProcessCluster",
    "dask_config",
    "public_host",
    "run_server",
    "worker_command",
]
