"""The read view of a cache: ``CachedDataset`` and ``PathCachedDataset``.

What is cached, where and when
------------------------------
``CachedDataset(dataset)`` stores ``dataset[i]`` for every ``i`` in
``<dataset.root>/cached/<dataset.name>/`` (the format of ``docs/format.md``). The
first construction computes the examples on all local cores and commits them chunk
by chunk; a later construction (in any process) finds the complete cache and opens
it without touching the dataset's examples. An interrupted build resumes from its
committed chunks. Only the cache directory, a lock file beside it
(``.<name>.lock``) and temporary files inside it are ever written.

Building is the procedure :func:`edcache.building.ensure.ensure_cache`; this module
holds what reads: the per-process reader (re-opened after a fork or unpickling),
indexing, batches, labels and pickling. ``cachable`` is :mod:`edcache.decorator`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .building.ensure import BuildOptions, CacheJob, build_cache, ensure_cache, rebuild_pending
from .collate import collate, collate_positions, quiet_collate_warning
from .dataset import NUMPY_INTS, CachedExamples, check_cachable, checked_length, int_array, int_list, normalize_indices
from .errors import CacheNotFoundError, DatasetInterfaceError, IncompleteCacheError
from .format import cache_name, cache_paths, find_cache, open_reader
from .format.base import CacheReader

if TYPE_CHECKING:
    from .subset import CachedSubset

# Incremented in every child right after a fork: a reader opened before the fork is
# re-opened in the child (a cheaper check per read than os.getpid()).
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    codecs : str, dict or None
        How array columns are stored when the cache is built: ``{"image": "jpeg:90",
        "mask": "png", "feat": "zstd:3"}`` per field (dict keys, or tuple positions), or
        one codec for every array column where it saves at least 10% (``"zstd"``,
        ``"lz4"``, ``"auto"``). ``None`` (default): raw. Each row is compressed on its
        own, so a read decodes one example. Lossy codecs (``jpeg``, lossy ``webp``) must
        be named per field. Needs ``pip install 'edcache[codecs]'``. See
        ``docs/format.md``.

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
    codecs: list | None = None

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
        codecs: str | dict | None = None,
        _path: str | None = None,
        _parameters: str | None = None,
        _root: str | None = None,
        _existing: bool = False,
    ) -> None:
        if _path is None and path is not None:
            _path = os.fspath(path)
        _check_read_options(transform, pil)
        self.transform = transform
        self.pil = pil
        self.verify = verify
        self.allow_pickle = allow_pickle
        self._reader: CacheReader | None = None
        self._generation = -1
        if _existing:  # from_cache, PathCachedDataset(None, path): open what is there
            if _path is None:
                raise TypeError("opening an existing cache needs its path")
            self._open_existing(_path, _root)
            return
        check_cachable(dataset, needs_location=_path is None)
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
            self.name = getattr(dataset, "name", None) or cache_name(_path)
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
        self.scheduler = scheduler
        self.security = security
        self.mp_context = mp_context
        self.progress = progress
        self.executor = executor
        self.codecs = _codecs_option(codecs)
        self._parameters = _parameters
        from .fingerprint import dataset_fingerprint, dataset_identity_record

        self._fingerprint = dataset_fingerprint(dataset)
        self._identity = dataset_identity_record(dataset, fingerprint)
        self._length = checked_length(dataset)
        self._path = _path or self._choose_path(_legacy)
        self._legacy = self._path.endswith(".zip")
        self._use(ensure_cache(self._job()))

    def _open_existing(self, path: str, root: str | None) -> None:
        """Open the cache at ``path`` without its dataset (it must exist and, for an
        edflow zip, not be half rebuilt)."""
        self.base_dataset = None
        self._root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self._path = path
        self.name = cache_name(path)
        self._legacy = path.endswith(".zip")
        if self._legacy and rebuild_pending(path):
            raise IncompleteCacheError(
                f"a rebuild of the cache at {path} (force_cache=True, keep_existing=False) has not "
                "finished: the zip there is the old cache. Construct CachedDataset(dataset) "
                "(or call the @cachable function) to finish the rebuild"
            )
        reader = self.reader
        self._length = len(reader)
        self.in_memory_keys = list(getattr(reader.manifest, "in_memory_keys", []))

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

    # -- building (the procedure is edcache.building.ensure) --------------------------------
    def _job(self) -> CacheJob:
        """This dataset's build, as the build procedure takes it."""
        options = BuildOptions(
            force_cache=self.force_cache, keep_existing=self.keep_existing, chunk_size=self.chunk_size,
            num_workers=self.num_workers, allow_pickle=self.allow_pickle, verify=self.verify,
            scheduler=self.scheduler, security=self.security, mp_context=self.mp_context,
            progress=self.progress, executor=self.executor, pil=self.pil, codecs=self.codecs,
        )
        return CacheJob(
            dataset=self.base_dataset, path=self._path, name=self.name, length=self._length,
            in_memory_keys=self.in_memory_keys, options=options, parameters=self._parameters,
            fingerprint=self._fingerprint, identity=self._identity,
        )

    def _use(self, reader: CacheReader) -> None:
        """Read through ``reader`` in this process from now on."""
        self._reader, self._generation = reader, _fork_generation
        quiet_collate_warning()

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
    ) -> CachedDataset:
        """Open the cache ``<root>/cached/<name>`` (or the one at ``path``) without the
        original dataset.

        ``_legacy=None`` opens whatever exists (new format first, then the edflow zip
        ``<name>.zip``); ``True`` prefers the zip; ``False`` opens a directory (the new
        format or an edflow examples folder). ``transform`` and ``pil`` are as for
        :class:`CachedDataset`.
        """
        _check_read_options(transform, pil)
        if path is None:
            if root is None or name is None:
                raise TypeError("from_cache needs root and name, or path")
            path = find_cache(os.fspath(root), name, _legacy)
            if path is None:
                directory, zip_path = cache_paths(os.fspath(root), name)
                raise CacheNotFoundError(f"no cache named {name!r} under {root} ({directory} or {zip_path})")
            root = os.fspath(root)
        else:
            path = os.fspath(path)
            root = os.path.dirname(os.path.abspath(path))
        return cls(None, path=path, _root=root, _existing=True, verify=verify, allow_pickle=allow_pickle,
                   transform=transform, pil=pil)

    def cache_dataset(self) -> None:
        """Compute and store every example not yet cached, then write the labels.

        Several processes may call this at once: one builds while the others wait for
        the lock, then find the cache complete and open it.
        """
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._use(build_cache(self._job()))

    # -- reading -------------------------------------------------------------------------
    @property
    def reader(self) -> CacheReader:
        """The reader of the cache for this process (re-opened after a fork or unpickling)."""
        if self._reader is None or self._generation != _fork_generation:
            self._use(open_reader(self._path, verify=self.verify, allow_pickle=self.allow_pickle, pil=self.pil))
        return self._reader  # type: ignore[return-value]

    @property
    def store(self) -> CacheReader:
        """The reader of the cache for this process: :attr:`reader` (edflow's name)."""
        return self.reader

    @property
    def fork_safe_zip(self) -> Any:
        """The per-process handle of the store, as in edflow.

        For an edflow zip this is a ``zipfile.ZipFile`` opened in this process (for an
        examples folder, an :class:`ExamplesFolder`): ``read("example_3.p")`` returns a
        member's bytes. For the new format it is the shard reader (:attr:`store`).
        """
        return self.reader.fork_safe_handle()

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
                reader = self.reader
            if not (self._append_labels or self._expand):
                # sets index_ in dict examples (as _finish would); tuples come back as stored
                if self.transform is None:
                    return reader.row_indexed(j)
                return self.transform(reader.row_indexed(j))
            return self._finish(reader.read(j), j)
        return super().__getitem__(i)

    def get_example(self, i: int) -> dict:
        """Example ``i`` as stored in the cache (without the transform)."""
        return self.reader.read(i)

    def _get_many(self, indices: list[int]) -> list[dict]:
        examples = self.reader.read_many(indices)
        return [self._finish(ex, j) for ex, j in zip(examples, indices, strict=False)]

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

    def subset(self, selection: Any, transform: Any = "inherit") -> CachedSubset:
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

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any] | tuple[Any, ...]:
        """A collated batch of ``indices``: a dict of arrays and lists.

        Fixed-shape arrays and numbers are stacked (gathered column-wise, one fancy
        index per shard, where the cache stores them as columns); other fields are
        lists. ``index_`` holds the indices.
        """
        length = self._length
        indices = int_array(indices)  # one conversion, checked vectorized
        idx = normalize_indices(indices, length)
        reader = self.reader
        columns = reader.read_columns(idx)
        if columns is not None and columns[0] != "dict":  # tuple/list examples: by position
            return tuple(columns[1].values())
        batch = reader.read_batch(idx)
        if batch is None:
            examples = reader.read_many(idx.tolist())
            if examples and all(type(ex) in (tuple, list) for ex in examples):
                return collate_positions(examples)
            batch = collate(examples)
        batch["index_"] = idx
        return batch

    @property
    def labels(self) -> dict:
        """The ``in_memory_keys`` columns, read from the cache (numpy arrays, memory-mapped
        where the dtype allows; a list where values do not form an array)."""
        return self.reader.labels

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
        return self.reader.complete

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
    ``pil``, ``fingerprint``, ``codecs={"image": "jpeg:90"}``, ``in_memory_keys`` comes
    from the dataset, ...).
    """
    return CachedDataset(dataset, path=path, **options)


def _codecs_option(codecs: Any) -> list | None:
    """The ``codecs=`` argument, checked now (a bad codec name fails before any work)."""
    if codecs is None:
        return None
    from .format.columnar.codec_names import normalize_codecs

    return normalize_codecs(codecs)
