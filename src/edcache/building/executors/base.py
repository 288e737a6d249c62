"""The interface between the build coordinator and whatever computes chunks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from ...format.base import ChunkEncoder, ChunkResult, ChunkTask
from ..compute import DatasetSource


class Executor(ABC):
    """Computes chunk tasks and hands each finished result to the coordinator.

    ``staged`` tells the coordinator whether workers can write into the cache
    directory themselves (same machine or shared file system) and send only metadata.
    """

    staged: bool = True

    #: The build's progress bar (a ``tqdm``), set by the coordinator before :meth:`run`;
    #: executors may show cluster state on it (``set_postfix``).
    progress_bar: Any = None

    @abstractmethod
    def run(
        self,
        source: DatasetSource,
        encoder: ChunkEncoder,
        tasks: Sequence[ChunkTask],
        on_result: Callable[[ChunkResult], None],
    ) -> None:
        """Compute every task, calling ``on_result`` in this thread as each arrives.

        A task may be computed more than once (crashed workers); ``on_result`` is
        idempotent. The first error raised by the dataset or encoder stops the run and
        is re-raised here; so is ``KeyboardInterrupt``, after the workers are stopped.
        """
