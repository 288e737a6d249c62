"""Executors on this machine: in the calling process, or a pool of worker processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ...errors import BuildError
from ...format.base import ChunkEncoder, ChunkResult, ChunkTask
from ..compute import DatasetSource, compute_chunk, limit_torch_threads
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


GUARD_HINT = (
    "with the {method} start method every worker process imports your main script again, "
    "so the code that builds the cache must be inside an `if __name__ == \"__main__\":` "
    "block (or pass mp_context='fork', or num_workers=0)"
)


def check_not_bootstrapping() -> None:
    """Raise :class:`BuildError` in a process that is still being started by
    ``multiprocessing`` (spawn or forkserver) and is re-running the parent's main script.

    Such a script has no ``if __name__ == "__main__":`` guard: building from it in
    the child would wait forever on the build lock that the parent holds.
    """
    process = mp.current_process()
    if getattr(process, "_inheriting", False):  # what multiprocessing checks for itself
        method = mp.get_start_method(allow_none=True) or "spawn"
        raise BuildError(
            f"edcache: {process.name} (pid {os.getpid()}) is a worker process that is re-running "
            "the main script while it starts, and the script builds a cache at import time: "
            + GUARD_HINT.format(method=method if method != "fork" else "spawn")
            + "."
        )


# -- worker-process side -------------------------------------------------------------
_WORKER_STATE: tuple[Any, ChunkEncoder] | None = None
_INHERITED: tuple[DatasetSource, ChunkEncoder] | None = None  # set before a fork start
# What each worker process is doing, in memory shared with the coordinator: per slot
# (pid, chunk, example index), -1 when idle. When a worker dies abruptly the
# coordinator reads here which chunk and example killed it.
_BOARD: Any = None
_SLOT = 0
_FIELDS = 3
_TORCH_LIMITED = False  # torch's threads were limited to one in this worker


def _exit_with_parent(parent: int, interval: float = 0.1) -> None:
    """Exit this worker once the process that started it is gone.

    A coordinator killed alone (``kill -9``, the OOM killer) leaves its pool workers
    waiting on the task queue forever, each holding a copy of the dataset.
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="edcache-exit-with-parent", daemon=True).start()


def _init_worker(payload: bytes | None, board: Any = None, counter: Any = None) -> None:
    global _WORKER_STATE, _BOARD, _SLOT, _TORCH_LIMITED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    # before anything runs torch ops (a forked child inherits a thread pool it cannot use)
    _TORCH_LIMITED = limit_torch_threads()
    _exit_with_parent(os.getppid())
    if board is not None and counter is not None:
        with counter.get_lock():
            _SLOT = counter.value % (len(board) // _FIELDS)
            counter.value += 1
        _BOARD = board
        base = _SLOT * _FIELDS
        board[base], board[base + 1], board[base + 2] = os.getpid(), -1, -1
    source, encoder = pickle.loads(payload) if payload is not None else _INHERITED  # type: ignore[misc]
    _WORKER_STATE = (source.load(), encoder)
    if not _TORCH_LIMITED:  # unpickling or loading the dataset may have imported torch
        _TORCH_LIMITED = limit_torch_threads()


def _run_task(task: ChunkTask) -> ChunkResult:
    try:
        return _compute(task)
    except BaseException as exc:
        # The error travels to the coordinator as a pickle. Plain pickling drops the
        # chained exceptions anyway; with tblib installed (importing distributed does)
        # they are pickled with their tracebacks, and a deep one (a value nested 100
        # levels, a RecursionError) cannot be: the worker would die instead of reporting.
        # The message and the worker's formatted traceback carry what is needed.
        exc.__cause__ = exc.__context__ = None
        raise


def _compute(task: ChunkTask) -> ChunkResult:
    global _TORCH_LIMITED
    assert _WORKER_STATE is not None
    dataset, encoder = _WORKER_STATE
    if not _TORCH_LIMITED:  # torch imported by the dataset later, e.g. in an earlier chunk
        _TORCH_LIMITED = limit_torch_threads()
    board = _BOARD
    if board is None:
        return compute_chunk(dataset, encoder, task)
    base = _SLOT * _FIELDS
    board[base + 1] = task.chunk_id

    def on_index(i: int) -> None:
        board[base + 2] = i

    try:
        return compute_chunk(dataset, encoder, task, on_index)
    finally:
        board[base + 1] = board[base + 2] = -1


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
        Start method. Default: ``fork`` where available (else ``spawn``), which needs
        neither a picklable dataset nor an ``if __name__ == "__main__"`` guard;
        ``forkserver`` or ``spawn`` if the process holds threads that do not survive a
        fork.
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

    def _start_method(self) -> str:
        if self.mp_context is not None:
            return self.mp_context
        # fork, as PyTorch's DataLoader: works in scripts without a __main__ guard and
        # with datasets that cannot be pickled; forkserver/spawn on request
        return "fork" if "fork" in mp.get_all_start_methods() else "spawn"

    def _pool(self, source: DatasetSource, encoder: ChunkEncoder) -> ProcessPoolExecutor:
        global _INHERITED
        method = self._start_method()
        context = mp.get_context(method)
        self._board = context.RawArray("q", [-1] * (_FIELDS * self.num_workers))
        counter = context.Value("i", 0)
        payload: bytes | None = None
        if method == "fork":
            _INHERITED = (source, encoder)  # the children inherit it: nothing is pickled
        else:
            try:
                payload = pickle.dumps((source, encoder), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise BuildError(
                    f"the dataset cannot be pickled to send it to {method} worker processes "
                    f"({exc}); use mp_context='fork', num_workers=0, or make it picklable"
                ) from exc
        self._tracker = _TrackingContext(context)
        tracking: Any = self._tracker  # a context that remembers its processes (duck-typed)
        return ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=tracking,
            initializer=_init_worker,
            initargs=(payload, self._board, counter),
        )

    def _who_died(self, pool: ProcessPoolExecutor) -> list[tuple[int, int, int | None]]:
        """``(chunk, example index or -1, exit code)`` of each worker process of a broken
        ``pool`` that died on its own while computing a chunk.

        The pool terminates (SIGTERM) its other processes once one dies; those are
        not counted. Call before :func:`_terminate`.
        """
        processes = {p.pid: p for p in self._tracker.processes}
        for process in processes.values():
            with contextlib.suppress(AssertionError, ValueError):
                process.join(timeout=2)
        board = self._board
        found = []
        for slot in range(len(board) // _FIELDS):
            pid, chunk, index = board[slot * _FIELDS : slot * _FIELDS + _FIELDS]
            process = processes.get(pid)
            if chunk < 0 or process is None:
                continue
            code = process.exitcode
            if code is None or code == -signal.SIGTERM:
                continue
            found.append((int(chunk), int(index), code))
        return found

    def run(
        self,
        source: DatasetSource,
        encoder: ChunkEncoder,
        tasks: Sequence[ChunkTask],
        on_result: Callable[[ChunkResult], None],
    ) -> None:
        pending = deque(tasks)
        finished = 0
        inflight: dict[Future, ChunkTask] = {}
        crashes = _Crashes(self.max_crashes, self._start_method())
        pool = self._pool(source, encoder)
        try:
            while pending or inflight:
                lost = self._submit(pool, pending, inflight)
                done, _ = wait(inflight, return_when=FIRST_COMPLETED) if inflight else (set(), set())
                for future in done:
                    task = inflight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        lost.append(task)
                        continue
                    finished += 1
                    on_result(result)
                if lost:  # a worker died: every chunk in flight is lost with the pool
                    lost.extend(inflight.values())
                    inflight.clear()
                    self._count_deaths(pool, lost, finished, crashes)
                    pending.extendleft(sorted(lost, key=lambda t: -t.chunk_id))
                    _terminate(pool, self._tracker.processes)
                    pool = self._pool(source, encoder)
        except BaseException:
            _terminate(pool, self._tracker.processes)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pool: ProcessPoolExecutor, pending: deque[ChunkTask],
                inflight: dict[Future, ChunkTask]) -> list[ChunkTask]:
        """Keep ``2 * num_workers`` tasks in flight; the tasks lost to a broken pool."""
        while pending and len(inflight) < 2 * self.num_workers:
            task = pending.popleft()
            try:
                inflight[pool.submit(_run_task, task)] = task
            except BrokenProcessPool:  # a worker died before we noticed
                return [task]
        return []

    def _count_deaths(self, pool: ProcessPoolExecutor, lost: list[ChunkTask], finished: int,
                      crashes: _Crashes) -> None:
        """After a worker died: count it against the chunk it was computing; raise
        :class:`BuildError` if the workers never started or a chunk killed too many."""
        died = self._who_died(pool)
        started = any(self._board[k] >= 0 for k in range(0, len(self._board), _FIELDS))
        if not finished and not started and self._start_method() != "fork":
            raise BuildError(
                "the worker processes died while starting, before running anything "
                "(their traceback is printed above). The usual cause: "
                + GUARD_HINT.format(method=self._start_method())
                + ". Committed chunks are kept."
            )
        crashes.record(died, lost)
        crashes.check(lost, finished)


class _Crashes:
    """Worker deaths per chunk in one run, and what the last death of each chunk was doing."""

    def __init__(self, max_crashes: int, start_method: str) -> None:
        self.max_crashes = max_crashes
        self.start_method = start_method
        self.counts: Counter[int] = Counter()
        self.last_death: dict[int, tuple[int, int | None]] = {}  # chunk -> (index, exit code)

    def record(self, died: list[tuple[int, int, int | None]], lost: list[ChunkTask]) -> None:
        if died:  # count the chunks whose process died, not the bystanders
            for chunk, index, code in died:
                self.counts[chunk] += 1
                self.last_death[chunk] = (index, code)
        else:  # died between chunks, or unknown: every chunk in flight counts
            for task in lost:
                self.counts[task.chunk_id] += 1

    def check(self, lost: list[ChunkTask], finished: int) -> None:
        """Raise :class:`BuildError` if a chunk's workers died ``max_crashes`` times."""
        chunk, worst = self.counts.most_common(1)[0]
        if worst < self.max_crashes:
            return
        hint = ""
        if not finished and self.start_method != "fork":
            hint = (
                f" No chunk finished at all: with the {self.start_method} start "
                "method, worker processes import your main script again, so it needs "
                "an `if __name__ == '__main__':` guard (or use mp_context='fork')."
            )
        index, code = self.last_death.get(chunk, (-1, None))
        task = next((t for t in lost if t.chunk_id == chunk), None)
        if index >= 0:
            what = f"example {index} (chunk {chunk}) was being computed"
        elif chunk in self.last_death:
            what = f"chunk {chunk} was being encoded"
        else:
            what = f"chunk {chunk} was in flight"
        span = f", examples {task.start}..{task.stop - 1}" if task is not None else ""
        raise BuildError(
            f"a worker process died{_exit_reason(code)} {worst} times while {what}"
            f"{span if index < 0 else ''} (segfault, out of memory, os._exit, or "
            "killed?); committed chunks are kept, run again to resume."
            f"{hint}"
        )


class _TrackingContext:
    """A multiprocessing context that remembers the processes started through it.

    ``ProcessPoolExecutor`` creates its workers with ``mp_context.Process``; keeping them
    here lets the executor see which one died (and kill them all) through the public
    ``Process`` API instead of the pool's private state. Everything else is the context's.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self.processes: list[Any] = []

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # the name of the context's method
        process = self._context.Process(*args, **kwargs)
        self.processes.append(process)
        return process

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _exit_reason(code: int | None) -> str:
    """`` (killed by SIGSEGV)`` / `` (exit code 9)`` for a process's exit code."""
    if code is None:
        return ""
    if code < 0:
        try:
            return f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f" (killed by signal {-code})"
    return f" (exit code {code})"


def _terminate(pool: ProcessPoolExecutor, processes: list[Any]) -> None:
    """Stop a pool now: cancel queued work and kill its ``processes``."""
    processes = list(processes)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    for process in processes:
        with contextlib.suppress(AssertionError, ValueError):
            process.join(timeout=5)
