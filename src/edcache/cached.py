"""The public dataset classes: ``CachedDataset``, ``PathCachedDataset`` and ``cachable``.

What is cached, where and when
------------------------------
``CachedDataset(dataset)`` stores ``dataset[i]`` for every ``i`` in
``<dataset.root>/cached/<dataset.name>/`` (the format of ``docs/format.md``). The
first construction computes the examples on all local cores and commits them chunk
by chunk; a later construction (in any process) finds the complete cache and opens
it without touching the dataset's examples. An interrupted build resumes from its
committed chunks. Only the cache directory, a lock file beside it
(``.<name>.lock``) and temporary files inside it are ever written.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .dataset import NUMPY_INTS, CachedExamples, check_cachable, checked_length, int_array, int_list, normalize_indices
from .errors import (
    CacheMismatchError,
    CacheNotFoundError,
    CorruptCacheError,
    DatasetInterfaceError,
    EdcacheError,
    IncompleteCacheError,
)
from .format import cache_paths, find_cache, open_reader

if TYPE_CHECKING:
    from .subset import CachedSubset
from .format.base import CacheReader

# Incremented in every child right after a fork: a reader opened before the fork is
# re-opened in the child (a cheaper check per read than os.getpid()).
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# torch's default collate calls torch.as_tensor on each example's arrays, which warns
# that our read-only memory-mapped arrays are not writable, once in every DataLoader
# worker of every epoch. It is safe to silence there only: the collate stacks those
# tensors into a new batch tensor (a copy), so no tensor it returns aliases the map.
# The filter matches that message raised from that module and nothing else.
_COLLATE_WARNING = dict(
    message="The given NumPy array is not writable", category=UserWarning,
    module=r"torch\.utils\.data\._utils\.collate",
)


def _quiet_collate_warning() -> None:
    """Install the filter above unless this process has it (called when a reader opens)."""
    for action, message, category, module, _lineno in warnings.filters:
        if (action == "ignore" and category is UserWarning and message is not None
                and message.pattern == _COLLATE_WARNING["message"]
                and module is not None and module.pattern == _COLLATE_WARNING["module"]):
            return
    warnings.filterwarnings("ignore", **_COLLATE_WARNING)


class CachedDataset(CachedExamples):
    """A dataset whose examples are computed once and read back from an on-disk cache.

    Parameters
    ----------
    dataset : object
        Provides ``root`` (folder; the cache goes to ``<root>/cached/<name>``), ``name``
        (unique name), ``__len__``, ``__getitem__`` (or ``get_example``) and optionally
        ``in_memory_keys`` (keys whose values are kept as label columns, see ``labels``).
    force_cache : bool
        Run caching even if a complete cache exists. With ``keep_existing=True`` this
        only fills what is missing and rewrites the labels; with ``keep_existing=False``
        every example is computed again.
    keep_existing : bool
        Keep chunks that are already cached (resume an interrupted build).
    _legacy : bool or None
        ``None`` (default): open whatever cache exists (new format or an edflow zip),
        build new ones in the new format. ``True``: read and write edflow's zip layout
        (``<root>/cached/<name>.zip``). ``False``: the new format only.
    chunk_size : int
        Consecutive examples per chunk: the unit of work and of one shard file.
    num_workers : int or None
        Worker processes for building; ``None`` = all cores, ``0`` = in this process.
    allow_pickle : bool
        Store values the safe codec cannot hold as pickles. Recorded in the cache and
        required again to read it.
    verify : bool
        Check each shard's and label column's checksum the first time it is used in a
        process.
    scheduler : str or None
        Address of an ``edcache --server`` / Dask scheduler (``tls://host:port``) to
        build on a cluster instead of local processes.
    mp_context : str or None
        Start method of the local worker processes (default ``fork`` where available).
    progress : bool
        Show a progress bar while building.
    executor : Executor, callable or None
        Where to compute chunks instead of the local pool or ``scheduler``: an
        :class:`~edcache.building.executors.Executor`, or a function returning one (called
        only if a build is needed).
    path : str or None
        The cache directory. Given, the dataset needs no ``root`` or ``name``; None
        (default): ``<dataset.root>/cached/<dataset.name>``.
    transform : callable or None
        Applied to every example after it is read (``ds[i]``, ``ds[[i, j]]``,
        ``__getitems__``; not ``get_batch``), in the process that reads it (a DataLoader
        worker). It pickles with the dataset: with ``spawn`` workers it must be
        picklable (a module-level function or class, not a lambda).
    pil : str
        ``"image"`` (default): PIL images come back as images; ``"array"``: as their
        uint8 (mode-dependent) pixel arrays, read-only views of the cache.
    fingerprint : str, int or None
        An explicit version of what the dataset computes (default: the dataset's
        ``cache_version`` attribute, if any). Recorded in the cache; opening it with
        another version raises :class:`~edcache.errors.CacheMismatchError`.

    Notes
    -----
    Arrays of examples read from the new format are read-only, zero-copy views of a
    memory map; copy them (``np.array(x)``) before changing them in place.
    """

    # Options of a build, as __init__ sets them: the defaults of a CachedDataset made by
    # another constructor (from_cache, PathCachedDataset(None, path)).
    base_dataset: Any = None
    force_cache = False
    keep_existing = True
    chunk_size = 64
    num_workers: int | None = None
    allow_pickle = False
    verify = False
    scheduler: str | None = None
    security: Any = None
    mp_context: str | None = None
    progress = True
    executor: Any = None
    transform: Callable[[Any], Any] | None = None
    pil = "image"
    _parameters: str | None = None
    _fingerprint: str | None = None
    _identity: str | None = None

    def __init__(
        self,
        dataset: Any,
        force_cache: bool = False,
        keep_existing: bool = True,
        _legacy: bool | None = None,
        chunk_size: int = 64,
        *,
        num_workers: int | None = None,
        allow_pickle: bool = False,
        verify: bool = False,
        scheduler: str | None = None,
        security: Any = None,
        mp_context: str | None = None,
        progress: bool = True,
        executor: Any = None,
        path: str | os.PathLike | None = None,
        transform: Callable[[Any], Any] | None = None,
        pil: str = "image",
        fingerprint: str | int | None = None,
        _path: str | None = None,
        _parameters: str | None = None,
    ) -> None:
        if _path is None and path is not None:
            _path = os.fspath(path)
        check_cachable(dataset, needs_location=_path is None)
        _check_read_options(transform, pil)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise DatasetInterfaceError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.base_dataset = dataset
        if _path is None:
            self._root = os.fspath(dataset.root)
            self.name = dataset.name
        else:  # the path says where the cache goes; root and name are optional
            _path = os.fspath(_path)
            root = getattr(dataset, "root", None)
            self._root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(_path))
            self.name = getattr(dataset, "name", None) or _name_of(_path)
        self.in_memory_keys = list(getattr(dataset, "in_memory_keys", []))
        twice = sorted({k for k in self.in_memory_keys if self.in_memory_keys.count(k) > 1})
        if twice:
            raise DatasetInterfaceError(
                f"{type(dataset).__name__}.in_memory_keys lists {', '.join(map(repr, twice))} more "
                f"than once ({self.in_memory_keys}); list each key once"
            )
        self.force_cache = force_cache
        self.keep_existing = keep_existing
        self.chunk_size = chunk_size
        self.num_workers = num_workers
        self.allow_pickle = allow_pickle
        self.verify = verify
        self.scheduler = scheduler
        self.security = security
        self.mp_context = mp_context
        self.progress = progress
        self.executor = executor
        self.transform = transform
        self.pil = pil
        self._parameters = _parameters
        from .fingerprint import dataset_fingerprint, dataset_identity_record

        self._fingerprint = dataset_fingerprint(dataset)
        self._identity = dataset_identity_record(dataset, fingerprint)
        self._length = checked_length(dataset)
        self._path = _path or self._choose_path(_legacy)
        self._legacy = self._path.endswith(".zip")
        self._reader: CacheReader | None = None
        self._generation = -1
        if force_cache or not self._open_complete():
            self.cache_dataset()

    # -- where the cache lives -------------------------------------------------------
    def _choose_path(self, legacy: bool | None) -> str:
        directory, zip_path = cache_paths(self._root, self.name)
        if legacy is True:
            return zip_path
        if legacy is None and find_cache(self._root, self.name) == zip_path:
            return zip_path
        return directory

    @property
    def path(self) -> str:
        """The cache directory (or zip file for edflow's layout)."""
        return self._path

    def _lock_path(self) -> str:
        head, tail = os.path.split(self._path.rstrip(os.sep))
        return os.path.join(head, f".{tail}.lock")

    # -- opening -------------------------------------------------------------------------
    def _open_complete(self, locked: bool = False) -> bool:
        """Open the cache if it is complete and matches the dataset; False if it must be built.

        ``locked``: the caller holds the build lock (leftovers of an interrupted edflow
        zip build are then removed without asking for it).
        """
        try:
            reader = open_reader(self._path, verify=self.verify, allow_pickle=self.allow_pickle, pil=self.pil)
        except CacheNotFoundError:
            return False
        except CorruptCacheError:
            # a killed edflow writer: the legacy sink salvages it on resume; a damaged
            # directory cache: building decides (recovers from its commit log, or
            # refuses with an error that names the repair, deleting nothing)
            return False
        if (not reader.complete or (self._legacy and len(reader) < self._length)
                or (self._legacy and _rebuild_pending(self._path))):
            reader.close()
            return False
        self._check_matches(reader)
        self._reader, self._generation = reader, _fork_generation
        _quiet_collate_warning()
        if self._legacy:
            self._remove_legacy_leftovers(locked)
        return True

    def _remove_legacy_leftovers(self, locked: bool) -> None:
        """Delete what an interrupted build of a now complete edflow zip left beside it
        (``.partial``, staged chunks), if no build is running (its lock is free)."""
        from filelock import FileLock, Timeout

        from .format.legacy.zip_writer import build_leftovers, remove_build_leftovers

        if not build_leftovers(self._path):
            return
        if locked:
            remove_build_leftovers(self._path)
            return
        lock = FileLock(self._lock_path())
        try:
            lock.acquire(timeout=0)
        except (Timeout, RuntimeError):  # RuntimeError: held by this very thread
            return  # a build is running: the leftovers are its files
        try:
            remove_build_leftovers(self._path)
        finally:
            lock.release()

    def _check_matches(self, reader: CacheReader) -> None:
        manifest = getattr(reader, "manifest", None)
        hint = "Rebuild it with force_cache=True, keep_existing=False (CLI: --force --no-keep-existing)."
        if len(reader) != self._length:
            raise CacheMismatchError(
                f"the cache at {self._path} holds {len(reader)} examples, the dataset has "
                f"{self._length}: the dataset changed since the cache was built. {hint}"
            )
        if manifest is not None:
            from .format.columnar import dataset_identity

            ident = dataset_identity(self.base_dataset)
            if self.base_dataset is not None and manifest.dataset and manifest.dataset != ident:
                raise CacheMismatchError(
                    f"the cache at {self._path} was built from {manifest.dataset}, not {ident}. {hint}"
                )
            self._check_fingerprint(manifest)
            self._check_identity(manifest)
            if self._parameters is not None and manifest.parameters != self._parameters:
                raise CacheMismatchError(
                    f"the cache at {self._path} was built for the arguments {manifest.parameters}, "
                    f"not {self._parameters}. Use another path per set of arguments, or delete it."
                )

    def _check_fingerprint(self, manifest: Any) -> None:
        """Refuse a cache recorded with another configuration of the dataset (issue 16
        item 21); caches without a recorded fingerprint are not checked."""
        recorded = getattr(manifest, "fingerprint", None)
        if recorded is None or self.base_dataset is None:
            return
        from .fingerprint import fingerprint_differences

        diffs = fingerprint_differences(recorded, getattr(self, "_fingerprint", None))
        if diffs:
            raise CacheMismatchError(
                f"the cache at {self._path} was built from {type(self.base_dataset).__name__} "
                f"configured differently ({'; '.join(diffs)}), so its examples may not be what this "
                "dataset computes. Rebuild it with force_cache=True, keep_existing=False (CLI: "
                "--force --no-keep-existing), or give this configuration its own name."
            )

    def _check_identity(self, manifest: Any) -> None:
        """Refuse a cache of another explicit version; warn (never silently reuse, never
        rebuild) when the dataset class's source changed and no version says otherwise."""
        from .fingerprint import identity_problems

        if self.base_dataset is None:
            return
        error, warning = identity_problems(getattr(manifest, "identity", None), self._identity)
        name = type(self.base_dataset).__name__
        if error:
            raise CacheMismatchError(
                f"the cache at {self._path} was built by another version of {name} ({error}). "
                "Rebuild it with force_cache=True, keep_existing=False (CLI: --force "
                "--no-keep-existing), or give this version its own path."
            )
        if warning:
            warnings.warn(
                f"the cache at {self._path} may be stale: {warning}. If the examples are still "
                f"what {name} computes, set {name}.cache_version (or pass fingerprint=) to record "
                "that; otherwise rebuild with force_cache=True, keep_existing=False.",
                UserWarning, stacklevel=4,
            )

    @classmethod
    def from_cache(
        cls,
        root: str | None = None,
        name: str | None = None,
        _legacy: bool | None = None,
        *,
        path: str | os.PathLike | None = None,
        verify: bool = False,
        allow_pickle: bool = False,
        transform: Callable[[Any], Any] | None = None,
        pil: str = "image",
    ) -> "CachedDataset":
        """Open the cache ``<root>/cached/<name>`` (or the one at ``path``) without the
        original dataset.

        ``_legacy=None`` opens whatever exists (new format first, then the edflow zip
        ``<name>.zip``); ``True`` prefers the zip; ``False`` opens a directory (the new
        format or an edflow examples folder). ``transform`` and ``pil`` are as for
        :class:`CachedDataset`.
        """
        _check_read_options(transform, pil)
        if path is not None:
            path = os.fspath(path)
            return cls._from_path(path, root=os.path.dirname(os.path.abspath(path)), verify=verify,
                                  allow_pickle=allow_pickle, transform=transform, pil=pil)
        if root is None or name is None:
            raise TypeError("from_cache needs root and name, or path")
        path = find_cache(os.fspath(root), name, _legacy)
        if path is None:
            directory, zip_path = cache_paths(os.fspath(root), name)
            raise CacheNotFoundError(f"no cache named {name!r} under {root} ({directory} or {zip_path})")
        return cls._from_path(path, root=os.fspath(root), verify=verify, allow_pickle=allow_pickle,
                              transform=transform, pil=pil)

    @classmethod
    def _from_path(cls, path: str, *, root: str, verify: bool, allow_pickle: bool,
                   transform: Callable[[Any], Any] | None = None, pil: str = "image") -> "CachedDataset":
        self = cls.__new__(cls)
        self.transform = transform
        self.pil = pil
        self.base_dataset = None
        self._root = root
        self._path = path
        self.name = _name_of(path)
        self._legacy = path.endswith(".zip")
        self.verify = verify
        self.allow_pickle = allow_pickle
        if self._legacy and _rebuild_pending(path):
            raise IncompleteCacheError(
                f"a rebuild of the cache at {path} (force_cache=True, keep_existing=False) has not "
                "finished: the zip there is the old cache. Construct CachedDataset(dataset) "
                "(or call the @cachable function) to finish the rebuild"
            )
        self._reader = open_reader(path, verify=verify, allow_pickle=allow_pickle, pil=pil)
        self._generation = _fork_generation
        _quiet_collate_warning()
        self._length = len(self._reader)
        self.in_memory_keys = list(getattr(getattr(self._reader, "manifest", None), "in_memory_keys", []))
        return self

    # -- building ------------------------------------------------------------------------
    def cache_dataset(self) -> None:
        """Compute and store every example not yet cached, then write the labels.

        Several processes may call this at once: one builds while the others wait for
        the lock, then find the cache complete and open it.
        """
        from filelock import FileLock, Timeout

        from .building.executors.local import check_not_bootstrapping

        check_not_bootstrapping()  # a spawned worker re-running an unguarded script: fail, not wait
        os.makedirs(os.path.dirname(self._path.rstrip(os.sep)) or ".", exist_ok=True)
        lock = FileLock(self._lock_path())
        try:
            lock.acquire(timeout=0.5)
        except Timeout:
            if self.progress:
                print(f"edcache: waiting for another process building {self._path}", file=sys.stderr)
            lock.acquire()
        try:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if not self.force_cache and self._open_complete(locked=True):
                return  # another process finished it while we waited
            if self.base_dataset is None:
                raise DatasetInterfaceError(
                    f"the cache at {self._path} is not complete and this CachedDataset was opened "
                    "without its dataset (from_cache): construct CachedDataset(dataset) to build it"
                )
            if self._legacy:  # edflow's completion marker must not outlive what it vouches for
                from .format.legacy.cachable import remove_length_marker

                remove_length_marker(self._path)
            created = not os.path.lexists(self._path)
            try:
                self._build()
            except OSError as exc:  # disk full or failing: say so, and that work is kept
                from .building.coordinator import storage_error

                self._remove_if_unused(created)
                new = storage_error(exc, self._path)
                if new is exc:
                    raise
                raise new from exc
            except BaseException:
                self._remove_if_unused(created)
                raise
            if not self._open_complete(locked=True):
                raise CacheNotFoundError(f"the cache at {self._path} is not complete after building")
        finally:
            lock.release()

    def _remove_if_unused(self, created: bool) -> None:
        """After a failed build that created the cache directory: remove it again if
        nothing was committed (a later run starts afresh, no empty cache is left)."""
        if created and not self._legacy:
            from .format import remove_unused_cache_dir

            remove_unused_cache_dir(self._path)

    def _build(self) -> None:
        from .building.coordinator import default_num_workers, run_build
        from .building.compute import DatasetSource

        if self._legacy:
            from .format.legacy import LegacyZipSink

            sink: Any = LegacyZipSink(
                self._path, self._length, self.in_memory_keys,
                keep_existing=self.keep_existing, chunk_size=self.chunk_size,
                allow_pickle=self.allow_pickle,
            )
        else:
            from .format.columnar import dataset_identity, prepare_cache_dir

            # (a build that committed nothing starts afresh, whatever it was built from; one
            # that committed work of another configuration is refused, naming what differs)
            sink = prepare_cache_dir(
                self._path,
                length=self._length,
                chunk_size=self.chunk_size,
                dataset=dataset_identity(self.base_dataset),
                in_memory_keys=self.in_memory_keys,
                allow_pickle=self.allow_pickle,
                keep_existing=self.keep_existing,
                parameters=self._parameters,
                fingerprint=self._fingerprint,
                identity=self._identity,
            )
        num_workers = default_num_workers() if self.num_workers is None else self.num_workers
        executor = self._executor(num_workers)
        chunk_size = getattr(sink, "chunk_size", None) or sink.manifest.chunk_size
        run_build(
            sink,
            DatasetSource(dataset=self.base_dataset),
            executor,
            length=self._length,
            chunk_size=chunk_size,
            progress=self.progress,
            desc=f"caching {self.name}",
        )

    def _executor(self, num_workers: int) -> Any:
        if self.executor is not None:
            return self.executor() if callable(self.executor) else self.executor
        if self.scheduler is not None:
            from .distributed.executor import DaskExecutor

            return DaskExecutor(self.scheduler, security=self.security)
        from .building.executors import InlineExecutor, LocalPoolExecutor

        if num_workers == 0:
            return InlineExecutor()
        return LocalPoolExecutor(num_workers, mp_context=self.mp_context)

    # -- reading -------------------------------------------------------------------------
    @property
    def store(self) -> CacheReader:
        """The reader of the cache for this process (re-opened after a fork or unpickling)."""
        if self._reader is None or self._generation != _fork_generation:
            self._reader = open_reader(self._path, verify=self.verify, allow_pickle=self.allow_pickle,
                                       pil=self.pil)
            self._generation = _fork_generation
            _quiet_collate_warning()
        return self._reader

    @property
    def fork_safe_zip(self) -> Any:
        """The per-process handle of the store, as in edflow.

        For an edflow zip this is a ``zipfile.ZipFile`` opened in this process (for an
        examples folder, an :class:`ExamplesFolder`): ``read("example_3.p")`` returns a
        member's bytes. For the new format it is the shard reader (:attr:`store`).
        """
        return getattr(self.store, "zipfile", self.store)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: Any) -> Any:
        # fast path for the common case: one int index (the DataLoader's per-example call),
        # a Python int or a numpy integer (an element of an index array)
        if type(i) is not int:
            if type(i) not in NUMPY_INTS:
                return super().__getitem__(i)
            i = int(i)
        j = i + self._length if i < 0 else i
        if 0 <= j < self._length:
            reader = self._reader
            if reader is None or self._generation != _fork_generation:
                reader = self.store
            if not (self._append_labels or self._expand):
                # sets index_ in dict examples (as _finish would); tuples come back as stored
                if self.transform is None:
                    return reader.row_indexed(j)
                return self.transform(reader.row_indexed(j))
            return self._finish(reader.read(j), j)
        return super().__getitem__(i)

    def get_example(self, i: int) -> dict:
        """Example ``i`` as stored in the cache (without the transform)."""
        return self.store.read(i)

    def _get_many(self, indices: list[int]) -> list[dict]:
        examples = self.store.read_many(indices)
        return [self._finish(ex, j) for ex, j in zip(examples, indices)]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Batched fetch (what PyTorch's DataLoader calls): the examples of ``indices``.

        A packed cache is read example by example through the int fast path (there is
        nothing to group); chunk shards are visited once each, in shard order.
        """
        ints = int_list(indices)
        if ints is not None:
            get = self.__getitem__
            return [get(i) for i in ints]
        return self[list(indices)]

    def subset(self, selection: Any, transform: Any = "inherit") -> "CachedSubset":
        """A view of some examples: ``selection`` is indices (negatives count from the
        end) or a boolean mask over the whole cache, e.g.
        ``ds.subset(ds.labels["split"] == "train")``.

        The view's ``labels`` are this cache's columns at those indices, its ``index_``
        is the position in the view (``view.indices`` maps back); it is picklable and
        reads through this dataset's per-process reader. ``transform``: applied to the
        view's examples instead of this dataset's transform (None: no transform; by
        default the view uses this dataset's). See :class:`CachedSubset`.
        """
        from .subset import CachedSubset, _as_indices

        return CachedSubset(self, _as_indices(selection, self._length), transform=transform)

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """A collated batch of ``indices``: a dict of arrays and lists.

        Fixed-shape arrays and numbers are stacked (gathered column-wise, one fancy
        index per shard, where the cache stores them as columns); other fields are
        lists. ``index_`` holds the indices.
        """
        length = self._length
        indices = int_array(indices)  # one conversion, checked vectorized
        idx = normalize_indices(indices, length)
        reader = self.store
        fast = getattr(reader, "read_batch", None)
        columns = reader.read_columns(idx)
        if columns is not None and columns[0] != "dict":  # tuple/list examples: by position
            return tuple(columns[1].values())
        batch = fast(idx) if fast is not None else None
        if batch is None:
            examples = reader.read_many(idx.tolist())
            if examples and all(type(ex) in (tuple, list) for ex in examples):
                return _collate_positions(examples)
            batch = _collate(examples)
        batch["index_"] = idx
        return batch

    @property
    def labels(self) -> dict:
        """The ``in_memory_keys`` columns, read from the cache (numpy arrays, memory-mapped
        where the dtype allows; a list where values do not form an array)."""
        return self.store.labels

    @labels.setter
    def labels(self, value: dict) -> None:
        raise AttributeError("labels of a CachedDataset come from the cache and cannot be set")

    @property
    def root(self) -> str:
        """The root folder of the base dataset (the cache lives in ``<root>/cached``)."""
        return self._root

    @property
    def complete(self) -> bool:
        """Whether the cache holds every example."""
        return self.store.complete

    # -- pickling: no open handles travel; each process opens lazily ----------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_generation"] = -1
        state["base_dataset"] = None
        state["executor"] = None  # building state: not needed to read, maybe not picklable
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r}, {self._length} examples)"


def _check_read_options(transform: Any, pil: Any) -> None:
    from .format.wrap import PIL_OPTIONS

    if transform is not None and not callable(transform):
        raise DatasetInterfaceError(f"transform must be callable or None, not {transform!r}")
    if pil not in PIL_OPTIONS:
        raise DatasetInterfaceError(f"pil must be one of {', '.join(map(repr, PIL_OPTIONS))}, not {pil!r}")


def cache(dataset: Any, path: str | os.PathLike | None = None, **options: Any) -> CachedDataset:
    """Cache any map-style dataset (``__len__`` + ``__getitem__``) at directory ``path``
    and return the :class:`CachedDataset` that reads it::

        train = edcache.cache(MyTorchDataset(...), "/data/cache/train", transform=augment)

    Without ``path`` the dataset must have ``root`` and ``name`` (edflow's layout).
    ``options`` are those of :class:`CachedDataset` (``num_workers``, ``transform``,
    ``pil``, ``fingerprint``, ``in_memory_keys`` comes from the dataset, ...).
    """
    return CachedDataset(dataset, path=path, **options)


def _name_of(path: str) -> str:
    """The cache name a path implies: its last component without ``.zip``."""
    name = os.path.basename(os.fspath(path).rstrip(os.sep))
    return name[:-4] if name.endswith(".zip") else name


def _rebuild_pending(path: str) -> bool:
    from .format.legacy.zip_writer import rebuild_pending

    return rebuild_pending(path)


def _collate_positions(examples: list) -> tuple:
    """Tuple (or list) examples collated position by position, as :func:`_collate` does
    per key; examples of different lengths keep only the common positions."""
    width = min(len(ex) for ex in examples)
    columns = _collate([{n: ex[n] for n in range(width)} for ex in examples])
    return tuple(columns[n] for n in range(width))


def _collate(examples: list[dict]) -> dict[str, Any]:
    """Stack what stacks (arrays of one shape and dtype, numbers); lists otherwise."""
    batch: dict[str, Any] = {}
    for key in examples[0] if examples else ():
        values = [ex.get(key) for ex in examples]
        if all(isinstance(v, np.ndarray) for v in values) and len({(v.dtype, v.shape) for v in values}) == 1:
            batch[key] = np.stack(values)
        elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
            batch[key] = np.asarray(values)
        elif all(type(v) is bool for v in values):  # as a bool column gathers
            batch[key] = np.asarray(values, dtype=bool)
        else:
            batch[key] = values
    return batch


class PathCachedDataset(CachedDataset):
    """A :class:`CachedDataset` stored at an explicit ``path`` (used by :func:`cachable`).

    ``path`` is a directory for the new format, or a file ending in ``.zip`` for edflow's
    layout. With ``dataset=None`` an existing cache at ``path`` is opened. The dataset
    needs no ``root`` or ``name``: the path says where the cache goes. For a zip, the
    length is written to ``path + ".p"`` once the cache is complete, as edflow's
    ``PathCachedDataset`` does (edflow's sign that the zip is complete).
    """

    def __init__(self, dataset: Any, path: str, **kwargs: Any) -> None:
        path = os.fspath(path)
        if dataset is None:
            allow_pickle = kwargs.get("allow_pickle", False)
            fresh = CachedDataset._from_path(
                path, root=os.path.dirname(path), verify=kwargs.get("verify", False),
                allow_pickle=allow_pickle, transform=kwargs.get("transform"), pil=kwargs.get("pil", "image"),
            )
            self.__dict__.update(fresh.__dict__)
            if self._legacy:  # edflow's cachable recorded the length in path + ".p"
                from .format.legacy import read_cachable_length

                recorded = read_cachable_length(path, allow_pickle=allow_pickle)
                if recorded is not None:
                    self._length = recorded
            return
        super().__init__(dataset, _path=path, **kwargs)
        if self._legacy:
            from .format.legacy.cachable import read_cachable_length, write_length_marker

            try:
                recorded = read_cachable_length(path, allow_pickle=self.allow_pickle)
            except EdcacheError:
                recorded = None
            if recorded != len(self):
                write_length_marker(path, len(self))


def _canonical(value: Any) -> Any:
    """A JSON-able, address-free description of an argument (for cache keys)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    return repr(value)


def parameters_fingerprint(args: tuple, kwargs: dict) -> str:
    """The string ``cachable`` records for the arguments a cache was built from."""
    import json

    return json.dumps({"args": _canonical(list(args)), "kwargs": _canonical(kwargs)}, sort_keys=True)


def _build_running(cache_path: str) -> bool:
    """Whether another process holds the build lock of the cache at ``cache_path``."""
    from filelock import FileLock, Timeout

    head, tail = os.path.split(os.path.abspath(cache_path))
    if not os.path.isdir(head):
        return False
    lock = FileLock(os.path.join(head, f".{tail}.lock"))
    try:
        lock.acquire(timeout=0)
    except (Timeout, RuntimeError):  # RuntimeError: held by this very thread
        return True
    lock.release()
    return False


def _cachable_zip(
    fn: Callable[..., Any], path: str, args: tuple, kwargs: dict, params: str, options: dict
) -> Any:
    """``cachable`` on an edflow zip: edflow's side files ``path.p`` and ``pathparameters.p``.

    The arguments are recorded before the first chunk is computed. While another process
    builds the zip (its lock is held) and ``path.p`` does not exist yet, the call is
    edflow's worker mode: it returns ``fn(*recorded args)``, uncached. Otherwise an
    interrupted build resumes if the arguments are the recorded ones.
    """
    from .format.legacy import read_cachable_length, read_cachable_parameters
    from .format.legacy.cachable import write_parameters
    from .format.legacy.zip_writer import PARTIAL_SUFFIX

    allow_pickle = options.get("allow_pickle", False)
    force = options.get("force_cache", False)
    fresh = force and not options.get("keep_existing", True)
    hint = ("Call it with those arguments to use (or resume) that cache, use another path per "
            "set of arguments, or rebuild with @cachable(path, force_cache=True, keep_existing=False).")
    if not force and read_cachable_length(path, allow_pickle=allow_pickle) is not None:
        recorded = read_cachable_parameters(path, allow_pickle=allow_pickle)
        if recorded is not None and parameters_fingerprint(*recorded) != params:
            raise CacheMismatchError(
                f"the cache at {path} was built by {fn.__qualname__} with the arguments "
                f"{parameters_fingerprint(*recorded)}, not {params}. {hint}"
            )
        return PathCachedDataset(None, path, **{k: v for k, v in options.items()
                                                if k in ("verify", "allow_pickle", "transform", "pil")})
    recorded = None if fresh else read_cachable_parameters(path, allow_pickle=allow_pickle)
    if recorded is not None:
        if _build_running(path):  # edflow's worker mode: the dataset itself, uncached
            return fn(*recorded[0], **recorded[1])
        started = os.path.exists(path) or os.path.exists(path + PARTIAL_SUFFIX)
        if started and parameters_fingerprint(*recorded) != params:
            raise CacheMismatchError(
                f"the interrupted build at {path} was started by {fn.__qualname__} with the "
                f"arguments {parameters_fingerprint(*recorded)}, not {params}: resuming it would "
                f"mix examples of both. {hint}"
            )
    dataset = fn(*args, **kwargs)
    write_parameters(path, tuple(args), dict(kwargs))  # before the first chunk
    return PathCachedDataset(dataset, path, **options)  # writes path.p when complete


def cachable(path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., CachedDataset]]:
    """Decorator: cache the dataset a function returns at ``path``.

    The first call runs the function and caches its dataset; later calls with the same
    arguments open the cache without calling the function. The arguments are recorded
    in the cache: calling with other arguments raises :class:`CacheMismatchError`
    instead of silently returning the old data. An interrupted build resumes.
    Keyword ``options`` go to :class:`PathCachedDataset` (``num_workers``, ...).
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., CachedDataset]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> CachedDataset:
            params = parameters_fingerprint(args, kwargs)
            if path.endswith(".zip"):
                return _cachable_zip(fn, path, args, kwargs, params, options)
            try:
                reader = open_reader(path)
            except CacheNotFoundError:
                reader = None
            if reader is not None:
                manifest = getattr(reader, "manifest", None)
                recorded = getattr(manifest, "parameters", None)
                if manifest is not None and recorded is not None and recorded != params:
                    raise CacheMismatchError(
                        f"the cache at {path} was built by {fn.__qualname__} with the arguments "
                        f"{recorded}, not {params}. Use another path per set of arguments, or delete it."
                    )
                if reader.complete:
                    reader.close()
                    return PathCachedDataset(None, path, **{k: v for k, v in options.items()
                                                            if k in ("verify", "allow_pickle", "transform", "pil")})
                reader.close()
            return PathCachedDataset(fn(*args, **kwargs), path, _parameters=params, **options)

        return wrapper

    return decorator
