"""``edcache --address HOST[:PORT]``: worker processes that join an edcache server.

Each *slot* is a Dask ``Nanny`` supervising one single-threaded worker process (dataset
code usually holds the GIL, so one process per core). The nanny restarts a worker
process that crashes. Around each nanny runs a reconnect loop, so a slot

* started before the server waits for it and joins;
* whose server was killed and restarted joins the new one;
* that was dropped (hung or cut-off host, ``worker-ttl``) comes back;
* stops when the server broadcasts that the cache is complete (exit status 0), or
  when no server was reachable for ``timeout`` seconds (exit status 1).

The factory named by ``--dataset`` is imported before anything connects, so a worker
host that lacks the user's code fails at once with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClusterError
from .config import DEFAULT_PORT, configure_logging, dask_config


def mark_done(dask_worker: Any = None) -> int:
    """Run by the server on every nanny (``client.run(..., nanny=True)``) when the build is done.

    Dask passes the nanny itself as ``dask_worker``; the slot running it sees the mark
    when the nanny has closed and exits instead of reconnecting.
    """
    if dask_worker is not None:
        dask_worker._edcache_done = True
        try:  # close this nanny and its worker process cleanly
            dask_worker.close_gracefully(reason="edcache-cache-complete")
            asyncio.get_running_loop().call_later(
                0.2, lambda: asyncio.ensure_future(dask_worker.close(reason="edcache-cache-complete"))
            )
        except Exception:  # the flag alone is enough: the slot exits when the nanny does
            pass
    return os.getpid()


def listen_host_for(scheduler_address: str) -> str | None:
    """The interface a worker should listen on to be reachable by ``scheduler_address``.

    Loopback schedulers get loopback workers; otherwise the local address that routes
    to the scheduler (found without sending a packet), else Dask's default.
    """
    from distributed.comm import get_address_host

    host = get_address_host(scheduler_address)
    if host in ("localhost", "::1") or host.startswith("127."):
        return "::1" if host == "::1" else "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect: picks a route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return None


@dataclass
class SlotOptions:
    """Settings shared by all worker slots of one ``edcache --address`` process."""

    address: str
    security: Any
    timeout: float | None = 600.0  # give up after this long without a server (None: never)
    name_prefix: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    local_directory: str | None = None
    listen_host: str | None = None  # default: the interface that routes to the scheduler
    verbose: bool = False
    extra_nanny_kwargs: dict[str, Any] = field(default_factory=dict)


class WorkerSlot:
    """One nanny plus its reconnect loop (see the module docstring)."""

    def __init__(self, index: int, options: SlotOptions, stop: asyncio.Event) -> None:
        self.index = index
        self.options = options
        self.stop = stop
        self.nanny: Any = None
        self.joined = 0  # how often this slot joined a server
        self.refused: BaseException | None = None

    async def run(self) -> str:
        """Return ``"done"``, ``"stopped"``, ``"timeout"`` or ``"refused"``."""
        from distributed.comm.core import FatalCommClosedError

        opts = self.options
        last_seen = time.monotonic()
        delay = 0.5
        while True:
            if self.stop.is_set():
                return "stopped"
            if opts.timeout and time.monotonic() - last_seen > opts.timeout:
                return "timeout"
            deadline = last_seen + opts.timeout if opts.timeout else None
            try:
                up = await wait_for_scheduler(
                    opts.address, opts.security, self.stop, deadline,
                    on_wait=lambda exc: _say(
                        f"slot {self.index}: waiting for the server at {opts.address} ({_short(exc)})"
                    ),
                )
            except FatalCommClosedError as exc:
                self.refused = exc
                return "refused"
            if not up:
                continue  # stopped, or timed out: decided at the top of the loop
            if self.stop.is_set():
                return "stopped"
            nanny = self._nanny()
            self.nanny = nanny
            try:
                started = await self._start(nanny)
            except Exception as exc:  # the server went away again meanwhile, or refused us
                await _quiet_close(nanny)
                outcome = self._after_failed_start(nanny, exc)
                if outcome is not None:
                    return outcome
                await _sleep_or_stop(self.stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            if not started:  # marked done (or stopped) while it was starting
                await _quiet_close(nanny)
                self.nanny = None
                return self._done(nanny) or "stopped"
            self.joined += 1
            delay = 0.5
            _say(f"slot {self.index}: joined {opts.address}" + (" again" if self.joined > 1 else ""))
            stop_task = asyncio.ensure_future(self.stop.wait())
            done_task = asyncio.ensure_future(nanny.finished())
            await asyncio.wait([stop_task, done_task], return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if not done_task.done():
                await _quiet_close(nanny)
                done_task.cancel()
            else:
                await _quiet_close(nanny)
            self.nanny = None
            last_seen = time.monotonic()
            if self._done(nanny):
                return "done"
            if not self.stop.is_set():
                _say(f"slot {self.index}: lost the server; reconnecting")


    def _nanny(self) -> Any:
        """A new nanny for this slot (not started)."""
        from distributed import Nanny

        opts = self.options
        return Nanny(
            opts.address,
            nthreads=1,
            security=opts.security,
            name=f"{opts.name_prefix}-{self.index}",
            host=opts.listen_host or listen_host_for(opts.address),
            dashboard_address="127.0.0.1:0",  # the worker's HTTP routes: loopback only
            death_timeout=opts.timeout or None,
            local_directory=opts.local_directory,
            silence_logs=logging.INFO if opts.verbose else logging.ERROR,
            **opts.extra_nanny_kwargs,
        )

    def _done(self, nanny: Any) -> str | None:
        """``"done"`` if the server marked ``nanny`` done (then the other slots of this
        host are done as well), else None."""
        if getattr(nanny, "_edcache_done", False):
            self.stop.set()
            return "done"
        return None

    def _after_failed_start(self, nanny: Any, exc: BaseException) -> str | None:
        """The slot's outcome after ``nanny`` failed to start: done, refused, or None (retry)."""
        from distributed.comm.core import FatalCommClosedError

        if self._done(nanny):
            return "done"
        cause = _root_cause(exc)
        if isinstance(cause, FatalCommClosedError):
            self.refused = cause
            return "refused"
        return None

    async def _start(self, nanny: Any) -> bool:
        """Start ``nanny``; False if the server marked it done (or this host was stopped)
        before the start completed.

        The server marks every nanny when the cache is complete, including one still
        starting, whose start may then never return (seen with Python 3.10): watch for the
        mark instead of waiting on the start alone.
        """
        task = asyncio.ensure_future(nanny.start())
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and (getattr(nanny, "_edcache_done", False) or self.stop.is_set()):
                task.cancel()
                with contextlib.suppress(BaseException):  # cancelled, or failed while being cancelled
                    await task
                return False
        task.result()  # a failed start raises here, as before
        return True


async def wait_for_scheduler(
    address: str,
    security: Any,
    stop: asyncio.Event,
    deadline: float | None = None,
    on_wait: Any = None,
    probe_timeout: float = 3.0,
    period: float = 0.5,
) -> bool:
    """Wait until a TLS connection to ``address`` succeeds: True, or False at ``deadline``/stop.

    Probes every ``period`` seconds with a short timeout, so a worker started before
    its server joins within about a second of the server coming up (Dask's own
    connect backs off for up to several seconds). ``on_wait(exc)`` is called once when
    the first probe fails. Raises ``FatalCommClosedError`` if the peer's certificate
    is not trusted (foreign credentials).
    """
    from distributed.comm import connect
    from distributed.comm.core import FatalCommClosedError

    args = security.get_connection_args("worker")
    waited = False
    while not stop.is_set():
        try:
            comm = await connect(address, timeout=probe_timeout, **args)
        except FatalCommClosedError:
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            if not waited and on_wait is not None:
                on_wait(_root_cause(exc))
            waited = True
            if deadline is not None and time.monotonic() > deadline:
                return False
            await _sleep_or_stop(stop, period)
            continue
        await comm.close()
        return True
    return False


async def _quiet_close(nanny: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nanny.close(reason="edcache-slot-exit"), timeout=15)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _say(message: str) -> None:
    print(f"edcache worker: {message}", file=sys.stderr, flush=True)


async def run_slots(options: SlotOptions, n: int, stop: asyncio.Event) -> list[str]:
    """Run ``n`` worker slots until each is done, stopped, refused or timed out."""
    slots = [WorkerSlot(i, options, stop) for i in range(n)]
    outcomes = await asyncio.gather(*(slot.run() for slot in slots))
    refused = next((s.refused for s in slots if s.refused is not None), None)
    if refused is not None:
        raise ClusterError(
            f"the server at {options.address} refused this worker's credentials, or presented "
            f"credentials this worker does not trust ({_short(refused)}). Use the credentials "
            "file of that server (--credentials FILE)."
        )
    return list(outcomes)


def run_worker(
    address: str,
    *,
    dataset: str | None = None,
    nworkers: int | None = None,
    credentials: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float | None = 600.0,
    local_directory: str | None = None,
    verbose: bool = False,
) -> int:
    """The body of ``edcache --address``; returns the process exit status.

    0: the server said the cache is complete; 1: no server was reachable for ``timeout``
    seconds; 130: stopped by SIGINT/SIGTERM. Import errors of ``dataset`` and
    refused credentials raise (the CLI prints them and exits 2 / 3).
    """
    import dask

    from ..building.compute import import_factory
    from .security import make_security, tls_address

    if dataset:
        import_factory(dataset)  # fail fast, before joining, if this host cannot import it
    if nworkers is None:
        from ..building.coordinator import default_num_workers

        nworkers = default_num_workers()
    if nworkers < 1:
        raise ClusterError(f"--nworkers must be >= 1, got {nworkers}")
    addr = tls_address(address, DEFAULT_PORT)
    security = make_security(credentials, ca=ca, cert=cert, key=key)
    configure_logging(verbose)
    options = SlotOptions(
        address=addr, security=security, timeout=timeout or None, local_directory=local_directory,
        verbose=verbose,
    )

    async def main() -> list[str]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        _say(f"{nworkers} worker process(es) for {addr}")
        return await run_slots(options, nworkers, stop)

    with dask.config.set(dask_config()):
        outcomes = asyncio.run(main())
    if "done" in outcomes:
        _say("the server reports the cache complete; exiting")
        return 0
    if "timeout" in outcomes:
        _say(f"no server at {addr} for {timeout:.0f} s; giving up")
        return 1
    _say("stopped")
    return 130  # SIGINT / SIGTERM


__all__ = ["SlotOptions", "WorkerSlot", "listen_host_for", "mark_done", "run_slots", "run_worker"]
