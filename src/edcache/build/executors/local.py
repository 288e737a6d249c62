"""Executors on this machine: in the calling process, or a pool of worker processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import warnings
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from ...errors import BuildError
from ...format.base import ChunkEncoder, ChunkResult, ChunkTask
from ..worker import DatasetSource, compute_chunk
from .base import Executor


class InlineExecutor(Executor):
    """Computes every chunk in the calling process (``num_workers=0``)."""

    def run(
        self,
        source: DatasetSource,
        encoder: ChunkEncoder,
        tasks: Sequence[ChunkTask],
        on_result: Callable[[ChunkResult], None],
    ) -> None:
        dataset = source.load()
        for task in tasks:
            on_result(compute_chunk(dataset, encoder, task))


# -- worker-process side -------------------------------------------------------------
_WORKER_STATE: tuple[Any, ChunkEncoder] | None = None
_INHERITED: tuple[DatasetSource, ChunkEncoder] | None = None  # set before a fork start


def _init_worker(payload: bytes | None) -> None:
    global _WORKER_STATE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    source, encoder = pickle.loads(payload) if payload is not None else _INHERITED  # type: ignore[misc]
    _WORKER_STATE = (source.load(), encoder)


def _run_task(task: ChunkTask) -> ChunkResult:
    assert _WORKER_STATE is not None
    dataset, encoder = _WORKER_STATE
    return compute_chunk(dataset, encoder, task)


# -- coordinator side ----------------------------------------------------------------
class LocalPoolExecutor(Executor):
    """A pool of ``num_workers`` processes on this machine.

    The dataset and encoder are pickled once and sent to each worker when it starts,
    not with every chunk. At most ``2 * num_workers`` chunks are in flight, so memory
    stays flat. If a worker process dies (segfault, out of memory, ``kill -9``), the
    pool is rebuilt and the chunks that were in flight are computed again; a chunk
    that was in flight during ``max_crashes`` pool deaths stops the build.

    Parameters
    ----------
    num_workers : int
        Number of worker processes.
    mp_context : str or None
        Start method. Default: ``forkserver`` where available (else ``spawn``); ``fork``
        is used automatically if the dataset cannot be pickled.
    max_crashes : int
        How often a chunk may be in flight when a worker process dies.
    """

    staged = True

    def __init__(self, num_workers: int, mp_context: str | None = None, max_crashes: int = 3) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 for a pool, got {num_workers}")
        self.num_workers = num_workers
        self.mp_context = mp_context
        self.max_crashes = max_crashes

    def _pool(self, source: DatasetSource, encoder: ChunkEncoder) -> ProcessPoolExecutor:
        global _INHERITED
        methods = mp.get_all_start_methods()
        method = self.mp_context
        payload: bytes | None = None
        if method != "fork":
            try:
                payload = pickle.dumps((source, encoder), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                if method is not None or "fork" not in methods:
                    raise BuildError(
                        f"the dataset cannot be pickled to send it to worker processes ({exc}); "
                        "build with num_workers=0, or make the dataset picklable"
                    ) from exc
                warnings.warn(
                    f"the dataset cannot be pickled ({exc}); starting workers with fork instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
                method = "fork"
        if method is None:
            method = "forkserver" if "forkserver" in methods else "spawn"
        if method == "fork":
            _INHERITED = (source, encoder)
        return ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=mp.get_context(method),
            initializer=_init_worker,
            initargs=(payload,),
        )

    def run(
        self,
        source: DatasetSource,
        encoder: ChunkEncoder,
        tasks: Sequence[ChunkTask],
        on_result: Callable[[ChunkResult], None],
    ) -> None:
        pending = deque(tasks)
        inflight: dict[Future, ChunkTask] = {}
        crashes: Counter[int] = Counter()
        window = 2 * self.num_workers
        pool = self._pool(source, encoder)
        try:
            while pending or inflight:
                lost: list[ChunkTask] = []
                while pending and len(inflight) < window:
                    task = pending.popleft()
                    try:
                        inflight[pool.submit(_run_task, task)] = task
                    except BrokenProcessPool:  # a worker died before we noticed
                        lost.append(task)
                        break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED) if inflight else (set(), set())
                for future in done:
                    task = inflight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        lost.append(task)
                        continue
                    on_result(result)
                if lost:  # a worker died: every chunk in flight is lost with the pool
                    lost.extend(inflight.values())
                    inflight.clear()
                    for task in lost:
                        crashes[task.chunk_id] += 1
                    chunk, worst = crashes.most_common(1)[0]
                    if worst >= self.max_crashes:
                        raise BuildError(
                            f"a worker process died {worst} times while chunk {chunk} was being "
                            "computed (segfault, out of memory, or killed?); committed chunks are "
                            "kept, run again to resume"
                        )
                    pending.extendleft(sorted(lost, key=lambda t: -t.chunk_id))
                    _terminate(pool)
                    pool = self._pool(source, encoder)
        except BaseException:
            _terminate(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: cancel queued work and kill its processes."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    for process in processes:
        try:
            process.join(timeout=5)
        except (AssertionError, ValueError):
            pass
