"""Computing chunks on a Dask cluster (``edcache --server`` / ``scheduler=`` in Python).

Dask runs a task *at least* once: after a worker dies it recomputes what the worker
was running, and also finished results that lived only in its memory. This executor
therefore hands every result to the coordinator (``on_result``, which commits
idempotently) as soon as it arrives, and then releases it from the cluster, so a
committed chunk is never computed again.

Workers get the dataset once per process: each chunk task carries the pickled
:class:`DatasetSource` and encoder (or, when that is big, depends on one "source" task
holding it), and each worker process unpickles it (importing a factory by name, or
unpickling the dataset object) the first time it runs a chunk of this build.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ..building.compute import DatasetSource, compute_chunk
from ..building.executors.base import Executor
from ..errors import BuildError, ClusterError, EdcacheError, ExampleError
from ..format.base import ChunkEncoder, ChunkResult, ChunkTask
from .config import DEFAULT_PORT, print_status
from .security import as_security, tls_address

# -- worker-process side ---------------------------------------------------------------
_LOADED: dict[str, tuple[Any, ChunkEncoder]] = {}
_LOAD_LOCK = threading.Lock()


def _source_value(payload: bytes) -> bytes:
    """The "source" task: its value is the pickled (source, encoder) of the build.

    Being a task (not scattered data), it is recomputed if every worker holding it dies.
    """
    return payload


def _worker_state(token: str, payload: bytes) -> tuple[Any, ChunkEncoder]:
    state = _LOADED.get(token)
    if state is None:
        with _LOAD_LOCK:
            state = _LOADED.get(token)
            if state is None:
                import cloudpickle

                source, encoder = cloudpickle.loads(payload)
                state = (source.load(), encoder)
                _LOADED.clear()  # one build at a time per process: drop older datasets
                _LOADED[token] = state
    return state


def _run_chunk(task: ChunkTask, token: str, payload: bytes) -> ChunkResult:
    dataset, encoder = _worker_state(token, payload)
    return compute_chunk(dataset, encoder, task)


# -- coordinator side ------------------------------------------------------------------
def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10 (no ``add_note`` there: the note goes to
    ``__notes__`` directly, where the edcache CLI prints it from)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]


def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``call(*args, **kwargs)``, ignoring its errors (cleanup of a cluster that may be gone)."""
    with contextlib.suppress(Exception):
        call(*args, **kwargs)


class DaskExecutor(Executor):
    """Computes chunks on a Dask cluster and commits each result as it arrives.

    Parameters
    ----------
    scheduler : str or distributed.Client
        ``tls://host:port`` (or ``host:port``) of an edcache server or Dask scheduler,
        or a connected ``Client`` (left open afterwards).
    security : str, distributed.Security, False or None
        For an address: an edcache credentials file, a ``Security``, or ``None`` for
        the default credentials file (``~/.edcache/credentials.pem``). ``False``
        allows a plain ``tcp://`` address to a cluster you secured otherwise.
    staged : bool
        Workers share the cache's file system: they write their shard files next to
        the cache themselves and send only metadata (the coordinator still commits).
        Default: results travel back through Dask, so workers need no shared storage.
    factory : str or None
        ``pkg.module.factory`` that workers import and call to get the dataset,
        instead of receiving the pickled dataset object.
    on_status : callable or None
        ``on_status(message, n_workers)`` for cluster events (workers joining or
        leaving, waiting for workers). Default: print them to stderr.
    status_interval : float
        Seconds between checks of the connected workers.
    connect_timeout : str or float
        How long to try to reach the scheduler.
    gather_timeout : float
        Seconds a direct transfer of finished results from workers may take before
        they are fetched through the scheduler instead (see :meth:`_gather`).
    inline_payload : int
        The pickled source and encoder travel with every task up to this many bytes
        (no transfers between workers); a bigger one (a dataset object holding data)
        becomes one task that each worker fetches once.
    """

    staged = False

    def __init__(
        self,
        scheduler: Any,
        security: Any = None,
        *,
        staged: bool = False,
        factory: str | None = None,
        on_status: Callable[[str, int], None] | None = None,
        status_interval: float = 1.0,
        connect_timeout: str | float = "30s",
        gather_timeout: float = 60.0,
        inline_payload: int = 64 * 1024,
    ) -> None:
        self.scheduler = scheduler
        self.security = security
        self.staged = bool(staged)
        self.factory = factory
        self.on_status = on_status or print_status
        self.status_interval = status_interval
        self.connect_timeout = connect_timeout
        self.gather_timeout = gather_timeout
        self.inline_payload = inline_payload
        self.workers = 0  # connected workers at the last check

    # -- connection --------------------------------------------------------------------
    def _connect(self) -> tuple[Any, bool]:
        from distributed import Client

        if isinstance(self.scheduler, Client):
            return self.scheduler, False
        address = str(self.scheduler)
        if self.security is False:
            security = None
        else:
            address = tls_address(address, DEFAULT_PORT)
            security = as_security(self.security)
        try:
            client = Client(
                address, security=security, timeout=self.connect_timeout,
                set_as_default=False,
            )
        except Exception as exc:
            raise ClusterError(
                f"cannot connect to the scheduler at {address}: {type(exc).__name__}: {exc}. "
                "Is the server running, and do you hold its credentials file?"
            ) from exc
        return client, True

    def _count_workers(self, client: Any) -> int:
        try:
            return len(client.nthreads())
        except Exception:
            return self.workers

    def _watch_workers(self, client: Any, stop: threading.Event) -> None:
        """Report workers joining and leaving, and say so while none is connected."""
        said = 0.0
        while not stop.is_set():
            n = self._count_workers(client)
            now = time.monotonic()
            if n != self.workers or (n == 0 and now - said > 60):
                if self.progress_bar is not None:
                    self.progress_bar.set_postfix(workers=n)
                if n == 0:
                    self.on_status("no worker connected; waiting for workers", 0)
                elif n > self.workers:
                    self.on_status(f"{n} worker(s) connected", n)
                else:
                    self.on_status(f"{self.workers - n} worker(s) left; {n} connected", n)
                said = now
                self.workers = n
            stop.wait(self.status_interval)

    # -- the run -----------------------------------------------------------------------
    def run(
        self,
        source: DatasetSource,
        encoder: ChunkEncoder,
        tasks: Sequence[ChunkTask],
        on_result: Callable[[ChunkResult], None],
    ) -> None:
        import cloudpickle
        from distributed import as_completed

        if self.factory is not None:
            source = DatasetSource(factory=self.factory)
        try:
            payload = cloudpickle.dumps((source, encoder))
        except Exception as exc:
            raise BuildError(
                f"the dataset cannot be pickled to send it to the Dask workers ({exc}); "
                "build with `edcache --server --dataset pkg.module.factory` instead, which "
                "imports the factory on each worker"
            ) from exc
        token = hashlib.sha256(payload).hexdigest()[:16]
        client, owned = self._connect()
        pending: dict[str, Any] = {}
        source_future = None
        stop_watching = threading.Event()
        try:
            if len(payload) <= self.inline_payload:  # e.g. a factory path: send with every task
                sent: Any = payload
            else:  # a big dataset object: one task whose value each worker fetches once
                sent = source_future = client.submit(
                    _source_value, payload, key=f"edcache-source-{token}", pure=False
                )
            futures = client.map(
                _run_chunk, list(tasks), token=token, payload=sent,
                key=[f"edcache-chunk-{token}-{t.chunk_id}" for t in tasks], pure=False,
            )
            chunk_of = {f.key: t for f, t in zip(futures, tasks, strict=False)}
            pending = {f.key: f for f in futures}
            completed = as_completed(futures, loop=client.loop)
            del futures
            self.workers = -1
            threading.Thread(
                target=self._watch_workers, args=(client, stop_watching), daemon=True,
                name="edcache-dask-status",
            ).start()
            while pending:
                self._commit_batch(client, completed.next_batch(block=True), pending, chunk_of, on_result)
        except BaseException:
            if pending:
                _quietly(client.cancel, list(pending.values()), force=True)
            raise
        finally:
            stop_watching.set()
            pending.clear()
            if source_future is not None:
                _quietly(source_future.release)
            if owned:
                _quietly(client.close, timeout=10)

    def _commit_batch(self, client: Any, batch: list, pending: dict[str, Any], chunk_of: dict[str, ChunkTask],
                      on_result: Callable[[ChunkResult], None]) -> None:
        """Hand the finished futures of ``batch`` to ``on_result`` and release them; raise
        for the first failed one."""
        finished = [f for f in batch if f.status == "finished"]
        if len(finished) < len(batch):
            raise self._failure(self._failed(batch, pending), chunk_of)
        try:
            results = self._gather(client, finished)
        except Exception as exc:  # e.g. a result was lost and its recomputation failed
            failed = self._failed(finished, pending)
            if failed:
                raise self._failure(failed, chunk_of) from None
            raise ClusterError(
                f"fetching finished chunks from the workers failed: {type(exc).__name__}: "
                f"{exc}. Committed chunks are kept; run again to resume."
            ) from exc
        for f, result in zip(finished, results, strict=False):
            on_result(result)
            pending.pop(f.key, None)
            f.release()  # committed: never let the cluster recompute it

    def _gather(self, client: Any, futures: list) -> list:
        """Fetch finished results, straight from the workers that hold them.

        A direct transfer from a host that hangs (stopped, cut off) would wait for it
        forever, so after ``gather_timeout`` seconds the results are fetched through
        the scheduler instead: it drops silent workers (``worker-ttl``), which aborts
        its transfer and has the chunk recomputed elsewhere. (Going through the
        scheduler always would cost a second TLS hop: about half the throughput for
        large chunks.)
        """
        async def direct() -> list:
            return await asyncio.wait_for(client.gather(futures, direct=True, asynchronous=True),
                                          self.gather_timeout)

        try:
            return client.sync(direct)
        except (TimeoutError, asyncio.TimeoutError):  # distinct types before Python 3.11
            return client.gather(futures, direct=False)

    @staticmethod
    def _failed(batch: list, pending: dict[str, Any]) -> list:
        """The futures of ``batch`` that did not finish, plus any other errored one.

        Chunks that were running on the same dying worker fail together; waiting a
        moment lets the message name all of them.
        """
        time.sleep(0.3)
        failed = {f.key: f for f in batch if f.status != "finished"}
        failed.update((k, f) for k, f in pending.items() if f.status == "error")
        return list(failed.values())

    def _failure(self, futures: list, chunk_of: dict[str, ChunkTask]) -> BaseException:
        """The exception to raise for chunk tasks that errored or were cancelled.

        An exception raised by the dataset wins (it names the index and carries the
        worker's traceback). Chunks that were running on workers that kept dying are
        listed together: Dask counts every chunk a dying worker was busy with.
        """
        from distributed import KilledWorker

        def span(future: Any) -> str:
            task = chunk_of[future.key]
            return f"chunk {task.chunk_id} (examples {task.start}..{task.stop - 1})"

        killed, cancelled = [], []
        for future in sorted(futures, key=lambda f: chunk_of[f.key].chunk_id):
            if future.status == "cancelled":
                cancelled.append(future)
                continue
            exc = future.exception()
            if isinstance(exc, KilledWorker):
                killed.append(future)
                continue
            if isinstance(exc, ExampleError):
                return exc  # carries the index and the worker's traceback
            remote = "".join(traceback.format_exception(type(exc), exc, future.traceback()))
            if isinstance(exc, EdcacheError):
                add_note(exc, f"Traceback in the worker:\n{remote}")
                return exc
            return BuildError(
                f"{span(future)} failed on a worker: {type(exc).__name__}: {exc}\n\n"
                f"Traceback in the worker:\n{remote}"
            )
        if killed:
            return ClusterError(
                f"{', '.join(span(f) for f in killed)}: the workers computing "
                f"{'it' if len(killed) == 1 else 'them'} died more often than the scheduler's "
                "allowed-failures (distributed.scheduler.allowed-failures; edcache --server "
                "--allowed-failures N). A dataset that crashes or exhausts memory on these "
                "indices? Committed chunks are kept; run again to resume."
            )
        return ClusterError(
            f"the cluster dropped {', '.join(span(f) for f in cancelled)}: the connection to the "
            "scheduler was lost or the task was cancelled. Committed chunks are kept; run again "
            "to resume."
        )


__all__ = ["DaskExecutor"]
