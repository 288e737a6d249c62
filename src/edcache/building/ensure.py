"""The build procedure: make sure a complete cache of a dataset is at a path.

:func:`ensure_cache` is what constructing a :class:`~edcache.CachedDataset` runs before it
reads anything: open the cache if it is complete and was built from this dataset;
otherwise take the build lock (``.<name>.lock`` beside the cache), look again (another
process may have finished it meanwhile), prepare the format's sink, choose an executor
and run the build loop (:func:`~edcache.building.coordinator.run_build`). It returns a
reader of the complete cache, opened under the lock.

Several processes may call it at once: one builds while the others wait for the lock,
then find the cache complete and open it.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import CacheMismatchError, CacheNotFoundError, CorruptCacheError, DatasetInterfaceError
from ..format import open_reader
from ..format.base import CacheReader, ChunkSink

#: What to do when the cache at hand was built from something else.
REBUILD_HINT = "Rebuild it with force_cache=True, keep_existing=False (CLI: --force --no-keep-existing)."


@dataclass
class BuildOptions:
    """How to build (the options of :class:`~edcache.CachedDataset` that concern building)."""

    force_cache: bool = False
    keep_existing: bool = True
    chunk_size: int = 64
    num_workers: int | None = None
    allow_pickle: bool = False
    verify: bool = False
    scheduler: str | None = None
    security: Any = None
    mp_context: str | None = None
    progress: bool = True
    executor: Any = None
    pil: str = "image"
    #: ``codecs=`` as :func:`~edcache.format.columnar.codecs.normalize_codecs` returns it
    codecs: list | None = None


@dataclass
class CacheJob:
    """One dataset and the cache it goes to: what :func:`ensure_cache` builds or opens.

    ``dataset`` is None for a cache opened without its dataset (``from_cache``): it can
    be opened, not built. ``parameters``, ``fingerprint`` and ``identity`` are the
    records the cache must match (see :mod:`edcache.fingerprint` and ``cachable``).
    """

    dataset: Any
    path: str
    name: str
    length: int
    in_memory_keys: list[Any] = field(default_factory=list)
    options: BuildOptions = field(default_factory=BuildOptions)
    parameters: str | None = None
    fingerprint: str | None = None
    identity: str | None = None

    @property
    def legacy(self) -> bool:
        """Whether the cache is an edflow zip."""
        return self.path.endswith(".zip")


def lock_path(path: str) -> str:
    """The build lock of the cache at ``path``: ``.<name>.lock`` beside it."""
    head, tail = os.path.split(path.rstrip(os.sep))
    return os.path.join(head, f".{tail}.lock")


def ensure_cache(job: CacheJob) -> CacheReader:
    """A reader of the complete cache of ``job``, built first if it is not complete
    (or if ``job.options.force_cache``)."""
    if not job.options.force_cache:
        reader = open_complete(job)
        if reader is not None:
            return reader
    return build_cache(job)


# -- opening ---------------------------------------------------------------------------------
def open_complete(job: CacheJob, locked: bool = False) -> CacheReader | None:
    """A reader of the cache if it is complete and matches the dataset; None if it must be built.

    ``locked``: the caller holds the build lock (leftovers of an interrupted edflow
    zip build are then removed without asking for it).
    """
    options = job.options
    try:
        reader = open_reader(job.path, verify=options.verify, allow_pickle=options.allow_pickle, pil=options.pil)
    except (CacheNotFoundError, CorruptCacheError):
        # corrupt: a killed edflow writer (the legacy sink salvages it on resume), or a
        # damaged directory cache: building decides (recovers from its commit log, or
        # refuses with an error that names the repair, deleting nothing)
        return None
    if not reader.complete or (job.legacy and (len(reader) < job.length or rebuild_pending(job.path))):
        reader.close()
        return None
    try:
        check_matches(job, reader)
    except BaseException:
        reader.close()
        raise
    if job.legacy:
        _remove_legacy_leftovers(job.path, locked)
    return reader


def rebuild_pending(path: str) -> bool:
    """Whether a forced rebuild of the edflow zip at ``path`` has not finished."""
    from ..format.legacy.zip_writer import rebuild_pending

    return rebuild_pending(path)


def _remove_legacy_leftovers(path: str, locked: bool) -> None:
    """Delete what an interrupted build of a now complete edflow zip left beside it
    (``.partial``, staged chunks), if no build is running (its lock is free)."""
    from filelock import FileLock, Timeout

    from ..format.legacy.zip_writer import build_leftovers, remove_build_leftovers

    if not build_leftovers(path):
        return
    if locked:
        remove_build_leftovers(path)
        return
    lock = FileLock(lock_path(path))
    try:
        lock.acquire(timeout=0)
    except (Timeout, RuntimeError):  # RuntimeError: held by this very thread
        return  # a build is running: the leftovers are its files
    try:
        remove_build_leftovers(path)
    finally:
        lock.release()


def check_matches(job: CacheJob, reader: CacheReader) -> None:
    """Raise :class:`CacheMismatchError` if the cache was built from something else."""
    if len(reader) != job.length:
        raise CacheMismatchError(
            f"the cache at {job.path} holds {len(reader)} examples, the dataset has "
            f"{job.length}: the dataset changed since the cache was built. {REBUILD_HINT}"
        )
    manifest = reader.manifest
    if manifest is None:
        return
    if job.dataset is not None:
        from ..format.columnar import dataset_identity

        ident = dataset_identity(job.dataset)
        if manifest.dataset and manifest.dataset != ident:
            raise CacheMismatchError(f"the cache at {job.path} was built from {manifest.dataset}, not {ident}. "
                                     f"{REBUILD_HINT}")
        _check_fingerprint(job, manifest)
        _check_identity(job, manifest)
    if job.parameters is not None and manifest.parameters != job.parameters:
        raise CacheMismatchError(
            f"the cache at {job.path} was built for the arguments {manifest.parameters}, "
            f"not {job.parameters}. Use another path per set of arguments, or delete it."
        )


def _check_fingerprint(job: CacheJob, manifest: Any) -> None:
    """Refuse a cache recorded with another configuration of the dataset (issue 16
    item 21); caches without a recorded fingerprint are not checked."""
    recorded = manifest.fingerprint
    if recorded is None:
        return
    from ..fingerprint import fingerprint_differences

    diffs = fingerprint_differences(recorded, job.fingerprint)
    if diffs:
        raise CacheMismatchError(
            f"the cache at {job.path} was built from {type(job.dataset).__name__} "
            f"configured differently ({'; '.join(diffs)}), so its examples may not be what this "
            "dataset computes. Rebuild it with force_cache=True, keep_existing=False (CLI: "
            "--force --no-keep-existing), or give this configuration its own name."
        )


def _check_identity(job: CacheJob, manifest: Any) -> None:
    """Refuse a cache of another explicit version; warn (never silently reuse, never
    rebuild) when the dataset class's source changed and no version says otherwise."""
    from ..fingerprint import identity_problems

    error, warning = identity_problems(manifest.identity, job.identity)
    name = type(job.dataset).__name__
    if error:
        raise CacheMismatchError(
            f"the cache at {job.path} was built by another version of {name} ({error}). "
            "Rebuild it with force_cache=True, keep_existing=False (CLI: --force "
            "--no-keep-existing), or give this version its own path."
        )
    if warning:
        warnings.warn(
            f"the cache at {job.path} may be stale: {warning}. If the examples are still "
            f"what {name} computes, set {name}.cache_version (or pass fingerprint=) to record "
            "that; otherwise rebuild with force_cache=True, keep_existing=False.",
            UserWarning, stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """The ``stacklevel`` that names the first frame outside edcache (the user's call)."""
    frame, level = sys._getframe(2), 2
    package = __name__.split(".", 1)[0]
    while frame is not None and frame.f_globals.get("__name__", "").split(".", 1)[0] == package:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


# -- building --------------------------------------------------------------------------------
def build_cache(job: CacheJob) -> CacheReader:
    """Compute and store every example not yet cached, write the labels, and return a
    reader of the complete cache. Holds the build lock throughout."""
    from filelock import FileLock, Timeout

    from .executors.local import check_not_bootstrapping

    check_not_bootstrapping()  # a spawned worker re-running an unguarded script: fail, not wait
    os.makedirs(os.path.dirname(job.path.rstrip(os.sep)) or ".", exist_ok=True)
    lock = FileLock(lock_path(job.path))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        if job.options.progress:
            print(f"edcache: waiting for another process building {job.path}", file=sys.stderr)
        lock.acquire()
    try:
        if not job.options.force_cache:
            reader = open_complete(job, locked=True)
            if reader is not None:
                return reader  # another process finished it while we waited
        if job.dataset is None:
            raise DatasetInterfaceError(
                f"the cache at {job.path} is not complete and this CachedDataset was opened "
                "without its dataset (from_cache): construct CachedDataset(dataset) to build it"
            )
        if job.legacy:  # edflow's completion marker must not outlive what it vouches for
            from ..format.legacy.cachable import remove_length_marker

            remove_length_marker(job.path)
        _run_locked(job)
        reader = open_complete(job, locked=True)
        if reader is None:
            raise CacheNotFoundError(f"the cache at {job.path} is not complete after building")
        return reader
    finally:
        lock.release()


def _run_locked(job: CacheJob) -> None:
    """Run the build; after a failure remove a cache directory it created if nothing
    was committed (a later run starts afresh, no empty cache is left)."""
    from .coordinator import storage_error

    created = not os.path.lexists(job.path)
    try:
        _run(job)
    except BaseException as exc:
        if created and not job.legacy:
            from ..format import remove_unused_cache_dir

            remove_unused_cache_dir(job.path)
        if isinstance(exc, OSError):  # disk full or failing: say so, and that work is kept
            new = storage_error(exc, job.path)
            if new is not exc:
                raise new from exc
        raise


def make_sink(job: CacheJob) -> ChunkSink:
    """The format's sink for ``job``: edflow's zip, or a directory cache."""
    options = job.options
    if job.legacy:
        from ..format.legacy import LegacyZipSink

        if options.codecs:
            raise DatasetInterfaceError("codecs= needs the edcache format; an edflow zip stores raw values")
        return LegacyZipSink(
            job.path, job.length, job.in_memory_keys,
            keep_existing=options.keep_existing, chunk_size=options.chunk_size,
            allow_pickle=options.allow_pickle,
        )
    from ..format.columnar import dataset_identity, prepare_cache_dir

    # (a build that committed nothing starts afresh, whatever it was built from; one
    # that committed work of another configuration is refused, naming what differs)
    return prepare_cache_dir(
        job.path,
        length=job.length,
        chunk_size=options.chunk_size,
        dataset=dataset_identity(job.dataset),
        in_memory_keys=job.in_memory_keys,
        allow_pickle=options.allow_pickle,
        keep_existing=options.keep_existing,
        parameters=job.parameters,
        fingerprint=job.fingerprint,
        identity=job.identity,
        codecs=options.codecs,
    )


def make_executor(options: BuildOptions) -> Any:
    """The executor ``options`` ask for: the given one (or what its factory returns), a
    Dask cluster (``scheduler``), this process (``num_workers=0``) or a local pool."""
    from .coordinator import default_num_workers

    if options.executor is not None:
        return options.executor() if callable(options.executor) else options.executor
    if options.scheduler is not None:
        from ..distributed.executor import DaskExecutor

        return DaskExecutor(options.scheduler, security=options.security)
    from .executors import InlineExecutor, LocalPoolExecutor

    num_workers = default_num_workers() if options.num_workers is None else options.num_workers
    if num_workers == 0:
        return InlineExecutor()
    return LocalPoolExecutor(num_workers, mp_context=options.mp_context)


def _run(job: CacheJob) -> None:
    from .compute import DatasetSource
    from .coordinator import run_build

    sink = make_sink(job)
    executor = make_executor(job.options)
    run_build(
        sink,
        DatasetSource(dataset=job.dataset),
        executor,
        length=job.length,
        chunk_size=sink.chunk_size,
        progress=job.options.progress,
        desc=f"caching {job.name}",
    )


__all__ = ["BuildOptions", "CacheJob", "build_cache", "check_matches", "ensure_cache", "lock_path",
           "make_executor", "make_sink", "open_complete", "rebuild_pending"]
