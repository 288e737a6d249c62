"""The two small interfaces every on-disk format implements.

A *reader* is a per-process, read-only view of one cache. A *sink* is what the build
coordinator commits finished chunks into; its *encoder* is the part that runs inside
the worker processes and turns a chunk of examples into bytes (or a staged file).
Formats: :mod:`edcache.format.shards` (the default) and :mod:`edcache.format.legacy`
(edflow's zip and folder layouts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UnsafePickleError

if TYPE_CHECKING:
    import numpy as np

Labels = dict[str, "np.ndarray | list"]


class CacheReader(ABC):
    """Read-only access to one cache on disk, opened lazily in each process."""

    #: Where the cache lives (directory or zip file).
    path: str

    #: The cache's manifest, for formats that have one (a directory cache); None for
    #: edflow's layouts. Checked against the dataset before a cache is reused.
    manifest: Any = None

    @abstractmethod
    def __len__(self) -> int:
        """Number of examples the cache holds (or will hold once complete)."""

    @abstractmethod
    def read(self, index: int) -> dict:
        """Return example ``index`` as stored; raises ``IncompleteCacheError`` if absent."""

    def read_indexed(self, index: int) -> Any:
        """Example ``index`` with its ``index_`` set to ``index`` (what a dataset
        returns for ``ds[index]``); a stored ``index_`` keeps its position."""
        example = self.read(index)
        if type(example) is dict:
            example["index_"] = index
        return example

    def row_indexed(self, index: int) -> Any:
        """:meth:`read_indexed` for an index the caller has checked (``0 <= index <
        len(self)``); formats may skip their own checks."""
        return self.read_indexed(index)

    def read_columns(self, indices: Any) -> tuple[str, dict[Any, Any]] | None:
        """``(container, {key or position: values})`` of ``indices`` read column-wise, or
        None where the format cannot (the caller then reads example by example)."""
        return None

    def read_many(self, indices: Sequence[int]) -> list[dict]:
        """Return several examples; formats may reorder reads internally."""
        return [self.read(int(i)) for i in indices]

    def columns(self) -> list[dict[str, Any]] | None:
        """One description per stored column (key, kind, dtype, shape, bytes, wrap), for
        formats that store columns; None for the others."""
        return None

    def fork_safe_handle(self) -> Any:
        """What edflow's ``fork_safe_zip`` returns for this cache: the per-process
        ``ZipFile`` (or examples folder) of edflow's layouts, the reader itself otherwise."""
        return self

    def read_batch(self, indices: Any) -> dict[Any, Any] | None:
        """The collated batch of ``indices`` (checked, non-negative) gathered column-wise,
        or None where the format cannot (the caller collates examples itself)."""
        return None

    @property
    @abstractmethod
    def labels(self) -> Labels:
        """The ``in_memory_keys`` columns."""

    @property
    def complete(self) -> bool:
        """Whether every example has been committed."""
        return True

    def close(self) -> None:  # noqa: B027 - optional: readers without handles have nothing to release
        """Release file handles and maps (the reader may be reopened lazily)."""

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_pickle_allowed(path: str, built_with_pickles: bool, allow_pickle: bool) -> None:
    """Refuse to open a cache built with ``allow_pickle=True`` unless the caller allows it."""
    if built_with_pickles and not allow_pickle:
        raise UnsafePickleError(
            f"the cache at {path} was built with allow_pickle=True and may hold pickled "
            "values; pass allow_pickle=True to open it if you trust its files "
            "(unpickling can run arbitrary code)."
        )


@dataclass(frozen=True)
class ChunkTask:
    """One unit of build work: the consecutive indices ``start .. stop-1``."""

    chunk_id: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class ChunkResult:
    """What a worker sends back to the coordinator for one finished chunk.

    Formats set what they need: ``payload`` (the encoded chunk as an object, which
    travels back pickled), ``data`` (encoded bytes) or ``staged_path`` (the worker
    wrote them next to the cache, under a name unique to this attempt).
    """

    chunk_id: int
    start: int
    stop: int
    checksum: str
    nbytes: int
    data: bytes | None = None
    staged_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    payload: Any = None


class ChunkEncoder(ABC):
    """Runs in worker processes: turns the examples of one chunk into a ChunkResult.

    Must be picklable and cheap to send (it is sent to each worker once).
    """

    @abstractmethod
    def encode(self, task: ChunkTask, examples: Iterable[Any]) -> ChunkResult:
        """Encode ``examples`` (the k-th is index ``task.start + k``).

        ``examples`` is an iterable that computes each example on demand: take each
        apart (copy or encode it) before asking for the next, since a dataset may
        reuse its output buffers."""


class ChunkSink(ABC):
    """Runs in the coordinator only: the one writer of a cache being built."""

    #: Consecutive examples per chunk (a resumed build keeps the size on disk).
    chunk_size: int

    @property
    def location(self) -> str:
        """Where the cache is being written (named in error messages)."""
        return str(getattr(self, "cache_dir", ""))

    def plan(self) -> list[ChunkTask] | None:
        """The tasks still to compute, for a sink that plans finer than whole chunks;
        None (default): the coordinator plans the chunks not yet :meth:`committed`."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: most sinks hold nothing open between commits
        """Release what the sink holds open (called after every build, failed or not)."""

    @abstractmethod
    def committed(self) -> set[int]:
        """Chunk ids already durably committed (they are never recomputed)."""

    @abstractmethod
    def encoder(self, *, staged: bool) -> ChunkEncoder:
        """The encoder workers use; ``staged`` asks them to write files themselves."""

    @abstractmethod
    def commit(self, result: ChunkResult) -> bool:
        """Durably commit one chunk. Idempotent: returns False for a duplicate."""

    @abstractmethod
    def finalize(self) -> None:
        """Called once every chunk is committed: write labels and mark complete."""

    def discard(self, result: ChunkResult) -> None:  # noqa: B027 - optional: only staged results leave files
        """Throw away a result that will not be committed (remove its staged file)."""
