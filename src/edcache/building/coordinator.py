"""The build loop: plan the missing chunks, run them on an executor, commit as they arrive.

The coordinator is the only writer of a cache. Executors may compute a chunk more
than once; the sink's commit is idempotent, so each chunk is committed exactly once.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from tqdm.auto import tqdm

from ..format.base import ChunkResult, ChunkSink
from .compute import DatasetSource
from .executors.base import Executor
from .plan import plan_chunks

#: errno values of a failing disk (full, quota, I/O error, read-only, file too large).
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def storage_error(exc: OSError, where: str) -> OSError:
    """For a disk error (full, I/O error, ...) while writing the cache at ``where``: the
    same error type and errno, with a message that names the cache and says that
    committed work is kept. Other errors come back unchanged."""
    if exc.errno not in _STORAGE_ERRORS or "while writing the cache at" in str(exc.strerror):
        return exc
    return OSError(
        exc.errno,
        f"{exc.strerror} while writing the cache at {where}. The chunks committed so far "
        "are kept: free space (or fix the device) and run again to resume",
        exc.filename,
    )


def default_num_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_build(
    sink: ChunkSink,
    source: DatasetSource,
    executor: Executor,
    *,
    length: int,
    chunk_size: int,
    progress: bool = True,
    desc: str = "caching",
    bar_extra: dict[str, Any] | None = None,
) -> None:
    """Compute every chunk not yet committed to ``sink``, then finalize it.

    On any exception (including ``KeyboardInterrupt``) the committed chunks stay on disk
    and a later run resumes from them.
    """
    tasks = sink.plan()  # a sink may plan finer than whole chunks
    if tasks is None:
        tasks = plan_chunks(length, chunk_size, sink.committed())
    done = length - sum(task.size for task in tasks)
    bar = tqdm(
        total=length, initial=done, unit="ex", desc=desc, disable=not progress,
        dynamic_ncols=True, smoothing=0.05,
    )
    if bar_extra:
        bar.set_postfix(bar_extra, refresh=False)

    def on_result(result: ChunkResult) -> None:
        if sink.commit(result):
            bar.update(result.stop - result.start)

    try:
        executor.progress_bar = bar
        if tasks:
            executor.run(source, sink.encoder(staged=executor.staged), tasks, on_result)
        sink.finalize()
    except OSError as exc:
        new = storage_error(exc, sink.location)
        if new is exc:
            raise
        raise new from exc
    finally:
        bar.close()
        sink.close()
