"""What runs inside a worker process: compute the examples of a chunk and encode them."""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import DatasetInterfaceError, ExampleError
from ..format.base import ChunkEncoder, ChunkResult, ChunkTask


def import_factory(path: str) -> Callable[[], Any]:
    """Import ``pkg.module.factory`` (or ``pkg.module:factory``) and return it."""
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module_name or not attr:
        raise DatasetInterfaceError(f"--dataset {path!r}: expected an import path like pkg.module.factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DatasetInterfaceError(f"--dataset {path!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise DatasetInterfaceError(f"--dataset {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise DatasetInterfaceError(f"--dataset {path!r}: {attr!r} is not callable")
    return factory


@dataclass
class DatasetSource:
    """How a worker gets the dataset: the object itself, or a factory to import and call."""

    dataset: Any = None
    factory: str | None = None

    def load(self) -> Any:
        if self.dataset is not None:
            return self.dataset
        if self.factory is None:
            raise DatasetInterfaceError("DatasetSource needs a dataset or a factory path")
        return import_factory(self.factory)()


def limit_torch_threads() -> bool:
    """In a build worker process: one intra-op thread for PyTorch, if it is imported.

    What torch's DataLoader does in its workers, for the same two reasons: a process
    forked after the parent used torch's thread pool hangs in the first parallel torch
    op unless the pool is reset to one thread, and N workers with a thread per core
    each oversubscribe the machine (3-4x slower). Returns whether torch was loaded.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    except Exception:  # a half-imported or stub torch: nothing to limit
        pass
    return True


def fetch_example(dataset: Any, index: int) -> Any:
    """``dataset[index]``; exceptions become :class:`ExampleError` naming the index."""
    try:
        return dataset[index]
    except Exception as exc:  # the user's code: any exception
        raise ExampleError(
            index,
            f"the dataset raised {type(exc).__name__} for index {index}: {exc}",
            traceback.format_exc(),
        ) from exc


def compute_chunk(
    dataset: Any, encoder: ChunkEncoder, task: ChunkTask, on_index: Callable[[int], None] | None = None
) -> ChunkResult:
    """Compute ``dataset[i]`` for every index of ``task`` and encode the chunk.

    The encoder pulls the examples one at a time and takes each apart before the next
    is computed: a dataset that reuses its output buffer is still cached correctly.
    ``on_index(i)`` is called before example ``i`` is computed, and with ``-1`` once
    the last one was (the local pool uses it to name the example a worker process
    died on).
    """

    def examples() -> Iterator[Any]:
        for i in range(task.start, task.stop):
            if on_index is not None:
                on_index(i)
            yield fetch_example(dataset, i)
        if on_index is not None:
            on_index(-1)

    return encoder.encode(task, examples())


