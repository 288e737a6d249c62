"""The training-loop layer: a batch loader with a deterministic, resumable, elastic order.

``ds.loader(batch_size, ...)`` (:meth:`CachedDataset.loader`) returns a
:class:`CacheLoader`: an iterable of collated batches built on
``torch.utils.data.DataLoader`` (so ``pin_memory``, ``persistent_workers``,
``prefetch_factor``, ``multiprocessing_context`` work as usual).

How a batch is made
-------------------
The main process plans the order; a worker (or the main process with
``num_workers=0``) reads a whole batch at once, one gather per fixed-size column
(:meth:`~edcache.format.columnar.reader.ColumnarReader.read_columns`), and sends it back
as plain numpy arrays in one pickle through the worker's pipe. The main process wraps
them as tensors without copying (``torch.from_numpy``). This avoids what makes a standard
``DataLoader`` slow on small examples: a shared-memory file descriptor passed per tensor
per batch (``bench/NOTES.md``).

Order, epochs and resume
------------------------
The order of an epoch is a permutation of the dataset's positions that depends only on
``seed`` and the epoch (identity without ``shuffle``), never on the world size, the
number of workers or timing. Progress is the number of positions of that permutation
consumed so far by all ranks together; with ``world_size`` ranks, each step consumes
``world_size * batch_size`` positions and rank ``r`` takes the ``r``-th block of
``batch_size`` of them. A state saved at one world size therefore resumes at another:
the remaining positions are shared among the new ranks.

torch is imported only when a loader is iterated or made.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

#: version of :meth:`CacheLoader.state_dict`
STATE_VERSION = 1

_RESERVED = ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "drop_last", "in_order")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The positions of one epoch in the order they are consumed (all ranks together).

    Parameters
    ----------
    n : int
        Number of examples.
    seed, epoch : int
        Non-negative; the permutation is ``np.random.default_rng([seed, epoch])``'s.
    shuffle : bool
        Without it, ``0 .. n-1``.

    Returns
    -------
    numpy.ndarray
        int64 array of length ``n``.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def rank_batches(n: int, progress: int, batch_size: int, rank: int, world_size: int,
                 drop_last: bool) -> list[tuple[int, int, int]]:
    """The batches left to rank ``rank`` of an epoch from ``progress`` on.

    Returns a list of ``(start, stop, progress_after)``: the batch is positions
    ``start .. stop-1`` of the epoch order (``stop`` may exceed ``n`` in the padded last
    step: those positions wrap to the start of the epoch), and ``progress_after`` is the
    global progress once every rank has taken its batch of that step.
    """
    step = world_size * batch_size
    remaining = max(n - progress, 0)
    full = remaining // step
    out = []
    for s in range(full):
        start = progress + s * step + rank * batch_size
        out.append((start, start + batch_size, progress + (s + 1) * step))
    tail = remaining - full * step
    if tail and not drop_last:
        m = math.ceil(tail / world_size)
        start = progress + full * step + rank * m
        out.append((start, start + m, n))
    return out


class _NumpyBatch:
    """A collated batch as numpy arrays and lists (what workers send back): one pickle
    through the pipe instead of a shared-memory tensor per field."""

    __slots__ = ("container", "data")

    def __init__(self, container: str, data: Any) -> None:
        self.container = container
        self.data = data

    def __getstate__(self) -> tuple:
        return self.container, self.data

    def __setstate__(self, state: tuple) -> None:
        self.container, self.data = state

    def to_torch(self, pin: bool = False) -> Any:
        """The batch with numeric arrays as tensors (zero-copy), pinned if ``pin``."""
        conv = _to_tensor_pinned if pin else _to_tensor
        if self.container == "dict":
            return {k: conv(v) for k, v in self.data.items()}
        if self.container == "tuple":
            return tuple(conv(v) for v in self.data)
        if self.container == "list":
            return [conv(v) for v in self.data]
        return conv(self.data)

    def nbytes(self) -> int:
        """Bytes of the batch's numpy arrays."""
        values = self.data.values() if isinstance(self.data, dict) else self.data
        return sum(v.nbytes for v in values if isinstance(v, np.ndarray))

    def pin_memory(self, device: Any = None) -> Any:
        # called by DataLoader's pin-memory thread (torch.utils.data._utils.pin_memory)
        return self.to_torch(pin=True)


def _to_tensor(v: Any) -> Any:
    import torch

    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biufc":
            return v.tolist() if v.dtype.kind in "USO" else v
        if not v.flags.writeable:
            v = v.copy()  # a view of the memory map: torch wants memory it may write
        try:
            return torch.from_numpy(v)
        except TypeError:  # a dtype torch lacks
            return v
    if isinstance(v, list) and any(isinstance(x, (np.ndarray, list)) for x in v):  # ragged arrays
        return [_to_tensor(x) for x in v]
    return v


def _to_tensor_pinned(v: Any) -> Any:
    import torch

    v = _to_tensor(v)
    if isinstance(v, torch.Tensor):
        return v.pin_memory()
    if isinstance(v, list):
        return [x.pin_memory() if isinstance(x, torch.Tensor) else x for x in v]
    return v


def _stack(values: list) -> Any:
    """One field of a batch from per-example values: arrays of one shape and dtype and
    numbers stacked, anything else a list."""
    if values and all(isinstance(v, np.ndarray) for v in values) \
            and len({(v.dtype, v.shape) for v in values}) == 1:
        return np.stack(values)
    if values and all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
                      for v in values):
        return np.asarray(values)
    if values and all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    return list(values)


def collate_examples(examples: list) -> _NumpyBatch:
    """Collate examples read one by one (layouts that are not column-wise)."""
    first = examples[0] if examples else {}
    if isinstance(first, dict) and all(isinstance(e, dict) for e in examples):
        keys = list(first)
        for e in examples[1:]:
            keys.extend(k for k in e if k not in first and k not in keys)
        return _NumpyBatch("dict", {k: _stack([e.get(k) for e in examples]) for k in keys})
    if isinstance(first, (tuple, list)) and all(type(e) is type(first) and len(e) == len(first)
                                                for e in examples):
        cols = [_stack([e[p] for e in examples]) for p in range(len(first))]
        return _NumpyBatch("list" if isinstance(first, list) else "tuple", cols)
    return _NumpyBatch("whole", _stack(list(examples)))


#: Batches larger than this leave a worker as tensors (torch passes their memory as shared
#: memory, a file descriptor per tensor, ~1 ms each); smaller ones as numpy arrays in one
#: pickle through the pipe (no per-tensor cost, but every byte copied twice). Measured on
#: the bench's small (786 KiB batches) and medium (12 MiB) shapes: bench/NOTES.md.
SHARED_MEMORY_BYTES = 4 << 20


def _sent(batch: _NumpyBatch) -> Any:
    """What a worker hands to the DataLoader for ``batch`` (see SHARED_MEMORY_BYTES)."""
    data = sys.modules.get("torch.utils.data")
    if data is not None and data.get_worker_info() is not None and batch.nbytes() > SHARED_MEMORY_BYTES:
        return batch.to_torch()
    return batch


class BatchReader:
    """What the DataLoader's workers hold: ``reader[positions]`` is the batch of those
    positions of ``dataset`` (a :class:`CachedDataset` or :class:`CachedSubset`), as a
    :class:`_NumpyBatch`. Picklable (the dataset pickles without open files)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, positions: np.ndarray) -> _NumpyBatch:
        ds = self.dataset
        parent = getattr(ds, "parent", None)
        base, rows = (parent, ds.indices[positions]) if parent is not None else (ds, positions)
        plain = not (ds._append_labels or ds._expand or base._append_labels or base._expand)
        reader = base.store
        if plain:
            found = reader.read_columns(rows) if len(rows) else None
            if found is not None:
                container, cols = found
                if container == "dict":
                    cols["index_"] = positions.copy()
                    return _sent(_NumpyBatch("dict", cols))
                return _sent(_NumpyBatch(container, [cols[p] for p in sorted(cols)]))
            examples = reader.read_many(rows.tolist())
            for ex, p in zip(examples, positions.tolist(), strict=False):
                if type(ex) is dict:
                    ex["index_"] = p
        else:
            examples = [ds[p] for p in positions.tolist()]
        return collate_examples(examples)


def _identity(batch: Any) -> Any:
    return batch


class _Plan:
    """The DataLoader's sampler: yields the position arrays of the batches the loader
    planned for the current pass (set by :class:`CacheLoader` before each pass)."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class CacheLoader:
    """Batches of a cached dataset for a training loop: deterministic, resumable, DDP.

    Made by :meth:`CachedDataset.loader` (or :meth:`CachedSubset.loader`). Iterating it
    yields the batches of one epoch; the next iteration yields the next epoch. A batch is
    a dict of tensors for dict examples (``index_`` included: positions in the dataset),
    a tuple (or list) for tuple (list) examples; strings, bytes and nested values come
    as lists, arrays whose shapes differ as lists of tensors.

    Parameters
    ----------
    dataset : CachedDataset or CachedSubset
        What to read.
    batch_size : int
        Examples per batch (per rank).
    shuffle : bool
        Shuffle each epoch (a permutation drawn from ``seed`` and the epoch).
    seed : int
        Non-negative seed of the shuffle.
    drop_last : bool
        Drop the last step of an epoch when it is incomplete (fewer than
        ``world_size * batch_size`` examples left). Without it the last step is
        split evenly among the ranks, each rank's last batch holding
        ``ceil(left / world_size)`` examples, padded (as ``DistributedSampler`` does) with
        examples from the start of the epoch's order when ``left`` is not a multiple of
        ``world_size``: those few examples are seen twice in that epoch. With one rank
        there is no padding; the last batch is just smaller.
    num_workers : int or None
        DataLoader worker processes; ``None`` means 0: a batch is a few gathers from the
        memory map, usually cheaper in the training process than in a worker on few
        cores. Use workers to overlap reading (a cold page cache, slow disk) with compute.
    rank, world_size : int or None
        This process's share of each epoch; by default from ``torch.distributed`` when it
        is initialized, else 0 and 1.
    **dataloader_kwargs
        Passed to ``torch.utils.data.DataLoader`` (``pin_memory``, ``persistent_workers``,
        ``prefetch_factor``, ``multiprocessing_context``, ``timeout``, ...). Batching,
        sampling and collation belong to the loader (``batch_size``, ``sampler``,
        ``collate_fn``, ... are refused).

    Notes
    -----
    ``len(loader)`` is the number of batches of a whole epoch on this rank. The order
    depends only on ``seed``, the epoch and ``rank``/``world_size``. :meth:`state_dict`
    records the epoch and how many examples of its order all ranks together have
    consumed (``batches yielded to this rank's user x world_size x batch_size``, so it
    assumes the ranks move in lockstep, as DDP does); batches that workers prefetched
    but the loop has not received do not count. :meth:`load_state_dict` in a fresh loader
    (any world size, any number of workers, even another batch size) continues from
    there: the remaining examples of that epoch, each exactly once across the ranks, then
    the following epochs as an uninterrupted run would.
    """

    def __init__(self, dataset: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, num_workers: int | None = None, rank: int | None = None,
                 world_size: int | None = None, **dataloader_kwargs: Any) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, not {seed!r}")
        bad = sorted(set(dataloader_kwargs) & set(_RESERVED))
        if bad:
            raise TypeError(f"loader() sets {', '.join(bad)} itself; pass batch_size, shuffle and "
                            "drop_last as its own arguments")
        if rank is None or world_size is None:
            d_rank, d_world = _distributed_defaults()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_workers = 0 if num_workers is None else int(num_workers)
        self.rank, self.world_size = rank, world_size
        self._n = len(dataset)
        self._kwargs = dataloader_kwargs
        self._epoch = 0
        self._progress = 0
        self._fresh = True  # the next pass starts at (_epoch, _progress)
        self._pass = 0  # which pass owns the state
        self._order: tuple[int, np.ndarray] | None = None
        self._plan = _Plan()
        self._dataloader: Any = None

    # -- order ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` with the next pass (as ``DistributedSampler.set_epoch``).

        The loader counts epochs itself; calling this is optional. For the epoch in
        progress (e.g. the one a loaded state is in) it keeps the progress, so the usual
        ``set_epoch`` at the top of the epoch loop does not undo a resume.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, not {epoch!r}")
        if int(epoch) != self._epoch:
            self._epoch, self._progress = int(epoch), 0
        self._fresh = True

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self._n, self.seed, epoch, self.shuffle))
        return self._order[1]

    def _batches(self, epoch: int, progress: int) -> tuple[list[np.ndarray], list[int]]:
        spans = rank_batches(self._n, progress, self.batch_size, self.rank, self.world_size, self.drop_last)
        if not spans:
            return [], []
        order = self._epoch_order(epoch)
        n = self._n
        batches = []
        for start, stop, _ in spans:
            if stop <= n:
                batches.append(order[start:stop])
            else:
                batches.append(order[np.arange(start, stop) % n])
        return batches, [after for _, _, after in spans]

    def __len__(self) -> int:
        return len(rank_batches(self._n, 0, self.batch_size, self.rank, self.world_size, self.drop_last))

    # -- iteration -----------------------------------------------------------------------
    def _loader(self) -> Any:
        if self._dataloader is None:
            from torch.utils.data import DataLoader

            self._dataloader = DataLoader(
                BatchReader(self.dataset),  # type: ignore[arg-type]  # map-style: __len__ and __getitem__
                batch_size=None, sampler=self._plan, num_workers=self.num_workers, collate_fn=_identity,
                **self._kwargs,
            )
        return self._dataloader

    def __iter__(self) -> Iterator[Any]:
        self._pass += 1
        return self._run(self._pass)

    def _run(self, pass_id: int) -> Iterator[Any]:
        # runs at the first next(): an iterator made but never used moves nothing
        if self._pass == pass_id:
            if not self._fresh:  # the previous pass was left mid-epoch: a new pass is a new epoch
                self._epoch, self._progress = self._epoch + 1, 0
            self._fresh = False
        epoch, progress = self._epoch, self._progress
        batches, afters = self._batches(epoch, progress)
        if not batches:
            if self._pass == pass_id:
                self._epoch, self._progress, self._fresh = epoch + 1, 0, True
            return
        self._plan.batches = batches
        dl = self._loader()
        last = len(batches) - 1
        for k, batch in enumerate(dl):
            out = batch.to_torch() if isinstance(batch, _NumpyBatch) else batch
            if self._pass == pass_id:  # an older pass the user still holds does not move the state
                if k == last:
                    self._epoch, self._progress, self._fresh = epoch + 1, 0, True
                else:
                    self._progress = afters[k]
            yield out

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the epoch and the examples of its order consumed by all
        ranks together (the torchdata ``StatefulDataLoader`` protocol). After the last batch
        of an epoch, the state is the start of the next epoch."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "examples_consumed": self._progress,
            "num_examples": self._n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, of any rank, world size or
        batch size): the next pass yields this rank's share of what was left of that
        epoch."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a state of this loader (version {STATE_VERSION}): {state!r:.200}")
        for key, mine in (("num_examples", self._n), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"the state was saved with {key}={state.get(key)!r}, this loader has "
                                 f"{mine!r}: the order of the epoch would differ")
        epoch, progress = state.get("epoch"), state.get("examples_consumed")
        if not (type(epoch) is int and epoch >= 0 and type(progress) is int and 0 <= progress <= self._n):
            raise ValueError(f"malformed loader state: epoch={epoch!r}, examples_consumed={progress!r}")
        self._epoch, self._progress, self._fresh = epoch, progress, True
        self._pass += 1  # a pass in progress no longer moves the state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"rank={self.rank}/{self.world_size}, epoch={self._epoch}, "
                f"examples_consumed={self._progress})")


def _distributed_defaults() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialized ``torch.distributed`` group, else (0, 1)."""
    import sys

    dist: Any = sys.modules.get("torch.distributed")
    if dist is None:
        try:
            import torch.distributed as dist
        except ImportError:
            return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_loader(dataset: Any, batch_size: int, **options: Any) -> CacheLoader:
    """:class:`CacheLoader` over ``dataset``; what ``ds.loader(...)`` calls."""
    if getattr(dataset, "transform", None) is not None:
        raise ValueError(
            f"{type(dataset).__name__} has a per-example transform, which ds.loader() (whole "
            "batches read column-wise) would not apply: iterate DataLoader(ds, ...) instead, "
            "which applies it in the workers, or apply it to the loader's batches"
        )
    return CacheLoader(dataset, batch_size, **options)


__all__ = ["BatchReader", "CacheLoader", "epoch_order", "make_loader", "rank_batches"]
