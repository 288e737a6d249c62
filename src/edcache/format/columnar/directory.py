"""Getting a cache directory ready for a build: start over, or resume what the commit
log committed (files truncated to their committed ends), after checking that the
committed work is of the same dataset, length and parameters."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ...errors import CacheMismatchError, CorruptCacheError
from ..fsutil import fsync_dir, is_temp
from .files import check_no_links, open_fd, remove_strays, unlink_if_present
from .log import CommitLog, LogState, read_log
from .manifest import COLUMNS_DIR, COMMITS, LABELS_DIR, Manifest, Schema, peek_version, read_manifest, write_manifest
from .writer import ColumnarSink


def dataset_identity(dataset: Any) -> str:
    """What the manifest records as the dataset's identity: its class."""
    cls = type(dataset)
    return f"{cls.__module__}.{cls.__qualname__}"


def prepare_cache_dir(
    cache_dir: str,
    *,
    length: int,
    chunk_size: int,
    dataset: str,
    in_memory_keys: list[Any],
    allow_pickle: bool,
    keep_existing: bool,
    parameters: str | None = None,
    fingerprint: str | None = None,
    identity: str | None = None,
    codecs: list[list[Any]] | None = None,
) -> ColumnarSink:
    """Get ``cache_dir`` ready for a (resumed) build and return its sink.

    With ``keep_existing`` the committed chunks of an earlier run are kept (files are
    truncated to what the log committed); otherwise the cache is started over. The
    caller must hold the cache's build lock.
    """
    os.makedirs(cache_dir, exist_ok=True)
    check_no_links(cache_dir)
    fresh = Manifest(length=length, chunk_size=chunk_size, dataset=dataset, fingerprint=fingerprint,
                     identity=identity, in_memory_keys=list(in_memory_keys), allow_pickle=allow_pickle,
                     parameters=parameters, codecs=codecs)
    if not keep_existing or peek_version(cache_dir) == 1:
        return _start_over(cache_dir, fresh)
    try:
        old: Manifest | None = read_manifest(cache_dir)
    except FileNotFoundError:
        old = None
    except CorruptCacheError as exc:
        state = read_log(cache_dir)
        if state is None:
            if not _has_data(cache_dir):
                return _start_over(cache_dir, fresh)
            raise CorruptCacheError(
                f"{exc}. The cache's columns are kept untouched; run `edcache verify {cache_dir}` "
                "to see what is damaged, then rebuild with force_cache=True, keep_existing=False "
                "(CLI: --force --no-keep-existing), which deletes it."
            ) from exc
        old = Manifest.from_doc(state.params, os.path.join(cache_dir, COMMITS))
        check_resumable(cache_dir, old, fresh)
        write_manifest(cache_dir, old)  # recovered from the log's header: resume
    if old is None:
        return _start_over(cache_dir, fresh)
    state = None if old.complete else read_log(cache_dir)
    if not old.complete and (state is None or state.committed == 0):
        return _start_over(cache_dir, fresh)  # nothing committed: no work to protect
    check_resumable(cache_dir, old, fresh)
    if old.complete:
        unlink_if_present(os.path.join(cache_dir, COMMITS))  # a stale log of a kill right after completion
        remove_strays(cache_dir, old.schema, old.labels)
        return ColumnarSink(cache_dir, old, None, complete=True)
    assert state is not None
    ends = state.ends()
    for f, end in ends.items():
        path = os.path.join(cache_dir, f)
        try:
            fd = open_fd(path, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        size = os.fstat(fd).st_size if fd >= 0 else -1
        if size < end:  # committed data lost (a power loss before the group fsync): start over
            if fd >= 0:
                os.close(fd)
            return _start_over(cache_dir, fresh)
        os.ftruncate(fd, end)
        os.close(fd)
    remove_strays(cache_dir, state.schema)
    return ColumnarSink(cache_dir, old, state)


def _has_data(cache_dir: str) -> bool:
    path = os.path.join(cache_dir, COLUMNS_DIR)
    return os.path.isdir(path) and any(not is_temp(n) for n in os.listdir(path))


def _start_over(cache_dir: str, manifest: Manifest) -> ColumnarSink:
    """A new, empty build. The order keeps a valid cache at every instant: the new log,
    then the incomplete manifest (from here on the old files are strays), then the
    old files are deleted (unlinked, never truncated: readers of the old build keep
    reading it)."""
    build = CommitLog.create(cache_dir, manifest)
    write_manifest(cache_dir, manifest)
    os.makedirs(os.path.join(cache_dir, COLUMNS_DIR), exist_ok=True)
    remove_strays(cache_dir, Schema())
    for folder in (LABELS_DIR,):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(cache_dir, folder))
    fsync_dir(cache_dir)
    state = LogState(build, manifest.build_params())
    return ColumnarSink(cache_dir, manifest, state)


def _check_codecs(cache_dir: str, old: Manifest, new: Manifest, hint: str) -> None:
    """A build in progress resumes with the codecs it started with (a complete cache is
    opened as built, whatever ``codecs`` asks)."""
    if old.codecs != new.codecs and not old.complete:
        raise CacheMismatchError(
            f"the cache at {cache_dir} is being built with codecs {old.codecs}, not {new.codecs}: "
            f"resuming would store its columns differently. {hint}"
        )


def check_resumable(cache_dir: str, old: Manifest, new: Manifest) -> None:
    """Refuse to mix committed work of another dataset, length or parameters."""
    hint = "Rebuild it with force_cache=True, keep_existing=False (CLI: --force --no-keep-existing)."
    if old.length != new.length or (old.dataset and old.dataset != new.dataset):
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built from {old.dataset or 'a dataset'} of length "
            f"{old.length}; this dataset is {new.dataset} of length {new.length}. {hint}"
        )
    if list(old.in_memory_keys) != list(new.in_memory_keys):
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built with in_memory_keys {old.in_memory_keys}; "
            f"this dataset has {list(new.in_memory_keys)}. {hint}"
        )
    if new.parameters is not None and old.parameters is not None and old.parameters != new.parameters:
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built for the arguments {old.parameters}, not "
            f"{new.parameters}. Use another path per set of arguments, or delete it."
        )
    if new.fingerprint is not None and old.fingerprint is not None and old.fingerprint != new.fingerprint:
        from ...fingerprint import fingerprint_differences

        diffs = "; ".join(fingerprint_differences(old.fingerprint, new.fingerprint))
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built from {new.dataset.rpartition('.')[2] or 'a dataset'} "
            f"configured differently ({diffs}), so its examples may not be what this dataset "
            f"computes. {hint[:-1]}, or give this configuration its own name."
        )
    from ...fingerprint import identity_problems

    error, warning = identity_problems(old.identity, new.identity)
    if error:
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built by another version of "
            f"{new.dataset.rpartition('.')[2] or 'the dataset'} ({error}): resuming would mix "
            f"examples of both. {hint}"
        )
    if warning:
        import warnings

        warnings.warn(
            f"resuming the cache at {cache_dir}: {warning}; the examples committed so far may "
            "differ from what the dataset computes now. Set cache_version (or fingerprint=) to "
            "say whether they do, or rebuild with force_cache=True, keep_existing=False.",
            UserWarning, stacklevel=2,
        )
    _check_codecs(cache_dir, old, new, hint)
    if old.allow_pickle != new.allow_pickle:
        raise CacheMismatchError(f"the cache at {cache_dir} was built with allow_pickle={old.allow_pickle}. {hint}")
    if old.chunk_size != new.chunk_size and not old.complete:
        new.chunk_size = old.chunk_size  # resume with the layout already on disk
