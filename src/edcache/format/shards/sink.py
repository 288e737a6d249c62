"""Writing a cache directory: encoding chunks in workers, committing them in one place."""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

import time

from ...errors import CacheMismatchError, CodecError, CorruptCacheError, LabelError

from ..base import ChunkEncoder, ChunkResult, ChunkSink, ChunkTask
from ..fsutil import atomic_write, fsync_dir, fsync_file, is_temp, sync_filesystem, temp_name, write_file
from .codec import codec_error, find_unsupported
from .labels import write_labels
from .manifest import (
    COMMITS,
    LABELS_DIR,
    MANIFEST,
    PACKED,
    SHARD_TABLE,
    SHARDS_DIR,
    CommitLog,
    Manifest,
    encode_shard_table,
    load_shard_table,
    packed_record,
    read_log,
    read_manifest,
    shard_path,
    write_manifest,
)
from .pack import pack_chunks
from .shard import checksum, encode_shard, read_chunk_labels


def extract_labels(task: ChunkTask, examples: list[Any], keys: list[str]) -> dict[str, list]:
    """Collect the ``in_memory_keys`` values of one chunk, naming any missing key."""
    values: dict[str, list] = {key: [] for key in keys}
    for k, example in enumerate(examples):
        for key in keys:
            try:
                values[key].append(example[key])
            except (KeyError, TypeError, IndexError):
                keys_seen = list(example) if isinstance(example, dict) else type(example).__name__
                raise LabelError(
                    f"example {task.start + k} has no in_memory_key {key!r} (it has {keys_seen})"
                ) from None
    return values


class ShardEncoder(ChunkEncoder):
    """Encodes a chunk into shard bytes, in the worker.

    Parameters
    ----------
    cache_dir : str or None
        If given, the worker writes the shard under a temporary name in the cache's
        ``shards/`` folder itself and sends only metadata ("staged" mode).
    """

    def __init__(self, cache_dir: str | None, in_memory_keys: list[str], allow_pickle: bool) -> None:
        self.cache_dir = cache_dir
        self.in_memory_keys = list(in_memory_keys)
        self.allow_pickle = allow_pickle

    def encode(self, task: ChunkTask, examples: list[Any]) -> ChunkResult:
        for k, example in enumerate(examples):
            if not isinstance(example, dict):
                raise CodecError(
                    f"example {task.start + k} is a {type(example).__name__}, not a dict; "
                    "datasets must return a dict per example"
                )
        labels = extract_labels(task, examples, self.in_memory_keys) if self.in_memory_keys else None
        try:
            data = encode_shard(examples, task.start, labels, self.allow_pickle)
        except (TypeError, ValueError, OverflowError) as exc:
            for k, example in enumerate(examples):
                if find_unsupported(example, self.allow_pickle) is not None:
                    raise codec_error(task.start + k, example, self.allow_pickle, exc) from None
            raise CodecError(
                f"examples {task.start}..{task.stop - 1}: cannot be encoded ({exc})"
            ) from None
        result = ChunkResult(task.chunk_id, task.start, task.stop, checksum(data), len(data))
        if self.cache_dir is None:
            result.data = data
        else:
            staged = temp_name(shard_path(self.cache_dir, task.chunk_id))
            write_file(staged, data, fsync=False)  # the coordinator fsyncs in batches
            result.staged_path = staged
        return result


class ShardSink(ChunkSink):
    """The coordinator's side: validates, renames and records each finished chunk.

    Use :func:`prepare_cache_dir` to create one; it holds the manifest of the build.

    A commit is a rename plus one appended log line, visible to every process at once
    and safe against the builder being killed at any instant. Making commits survive a
    power loss needs fsync, which costs milliseconds per call; the sink therefore
    fsyncs in groups: the new shard files, the folder and the log at most every
    ``sync_interval`` seconds, and always before the cache is marked complete. After a
    power loss, at most the last ``sync_interval`` seconds of chunks are computed again
    (a shard whose data did not reach the disk fails the size check on resume).
    """

    def __init__(
        self,
        cache_dir: str,
        manifest: Manifest,
        commits: dict[int, tuple[int, str]],
        sync_interval: float = 1.0,
        *,
        packed: dict[str, Any] | None = None,
        complete: bool = False,
    ) -> None:
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.sync_interval = sync_interval
        #: show a progress bar while packing (set by the coordinator)
        self.progress = False
        self._commits = dict(commits)
        # the packing record of an interrupted finalize: every chunk is in packed.shard
        self._packed = packed
        # the cache was complete already and is kept as it is (force_cache, keep_existing)
        self._complete = complete
        self._log = CommitLog(cache_dir) if not complete else None
        self._unsynced: list[str] = []
        self._last_sync = time.monotonic()

    def committed(self) -> set[int]:
        if self._packed is not None or self._complete:
            return set(range(self.manifest.num_chunks))
        return set(self._commits)

    def encoder(self, *, staged: bool) -> ShardEncoder:
        return ShardEncoder(
            self.cache_dir if staged else None, self.manifest.in_memory_keys, self.manifest.allow_pickle
        )

    def commit(self, result: ChunkResult) -> bool:
        if result.chunk_id in self._commits:
            self.discard(result)
            return False
        task = self.manifest.chunk(result.chunk_id)
        if (result.start, result.stop) != (task.start, task.stop):
            self.discard(result)
            raise CorruptCacheError(f"result for chunk {result.chunk_id} covers the wrong indices")
        final = shard_path(self.cache_dir, result.chunk_id)
        if result.staged_path is not None:
            size = os.path.getsize(result.staged_path)
            if size != result.nbytes:
                self.discard(result)
                raise CorruptCacheError(
                    f"staged shard {result.staged_path} has {size} bytes, the worker reported {result.nbytes}"
                )
            os.replace(result.staged_path, final)
        else:
            assert result.data is not None
            if checksum(result.data) != result.checksum:
                raise CorruptCacheError(f"chunk {result.chunk_id} arrived damaged (checksum mismatch)")
            tmp = temp_name(final)
            write_file(tmp, result.data, fsync=False)
            os.replace(tmp, final)
        self._log.append(result.chunk_id, result.nbytes, result.checksum)
        self._commits[result.chunk_id] = (result.nbytes, result.checksum)
        self._unsynced.append(final)
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()
        return True

    def sync(self) -> None:
        """Make every commit so far durable: shard data, then the folder, then the log.

        One ``syncfs`` of the cache's file system where available (a per-file fsync
        costs ~1 ms here, per chunk), else an fsync per new shard file.
        """
        if self._unsynced and not sync_filesystem(self.cache_dir):
            for path in self._unsynced:
                fsync_file(path)
            fsync_dir(os.path.join(self.cache_dir, SHARDS_DIR))
        if self._log is not None:
            self._log.sync()
        self._unsynced = []
        self._last_sync = time.monotonic()

    def discard(self, result: ChunkResult) -> None:
        if result.staged_path is not None:
            try:
                os.unlink(result.staged_path)
            except OSError:
                pass

    def finalize(self) -> None:
        """Complete the cache: labels, then the packed file or the shard table, then the
        manifest.

        Packing is committed by its own log record (after ``packed.shard`` is durable)
        before the chunk shards are deleted, so a kill at any point resumes either
        before packing (chunk shards intact) or after it (nothing left to compute).
        """
        if self._complete:
            return
        m = self.manifest
        if self._packed is not None:  # an earlier finalize packed and was killed
            m.labels, m.packed = self._packed["labels"], self._packed["p"]
            _remove_chunk_shards(self.cache_dir)
            self._mark_complete()
            return
        self.sync()
        missing = set(range(m.num_chunks)) - set(self._commits)
        if missing:
            raise CorruptCacheError(f"cannot finalize {self.cache_dir}: chunks {sorted(missing)[:10]} missing")
        m.labels = write_labels(self.cache_dir, m.in_memory_keys, self._label_values())
        packed = self._pack()
        if packed is not None:
            assert self._log is not None
            self._log.append_packed(packed, m.labels)
            self._log.sync()
            m.packed = packed
            _remove_chunk_shards(self.cache_dir)
        else:
            table = encode_shard_table(self._commits, m.num_chunks)
            atomic_write(os.path.join(self.cache_dir, SHARD_TABLE), table)
            m.shard_table = {"nbytes": len(table), "xxh3": checksum(table)}
        self._mark_complete()

    def _label_values(self) -> dict[str, list]:
        m = self.manifest
        values: dict[str, list] = {key: [] for key in m.in_memory_keys}
        if m.in_memory_keys:
            for chunk in range(m.num_chunks):
                task = m.chunk(chunk)
                nbytes, _ = self._commits[chunk]
                chunk_labels = read_chunk_labels(shard_path(self.cache_dir, chunk), nbytes, task.start, task.size)
                for key in m.in_memory_keys:
                    values[key].extend(chunk_labels[key])
        return values

    def _pack(self) -> dict[str, Any] | None:
        """Pack the chunks (see :mod:`.pack`), or return None to keep the chunk shards:
        when they differ in schema, or when the disk cannot hold a second copy (packing
        needs the chunks' size again until they are deleted)."""
        need = sum(nbytes for nbytes, _ in self._commits.values())
        if shutil.disk_usage(self.cache_dir).free < need + (64 << 20):
            return None
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.manifest.length, unit="ex", desc="packing", dynamic_ncols=True)
        try:
            return pack_chunks(self.cache_dir, self.manifest, self._commits, bar.update if bar else None)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return None  # the temporary file is gone again; the chunk shards serve
            raise
        finally:
            if bar is not None:
                bar.close()

    def _mark_complete(self) -> None:
        m = self.manifest
        m.complete = True
        write_manifest(self.cache_dir, m)
        # right after the manifest: the window in which a kill leaves a (harmless,
        # ignored) stale log is one system call wide
        os.unlink(os.path.join(self.cache_dir, COMMITS))
        assert self._log is not None
        self._log.close()  # everything in it was synced before
        keep = set() if m.packed is not None else set(self._commits)
        _remove_strays(self.cache_dir, keep)  # e.g. staged files of killed workers
        fsync_dir(self.cache_dir)

    def close(self) -> None:
        if self._log is None:
            return
        if not self._log.closed:
            try:
                self.sync()
            except OSError:
                pass  # closing after a failure: what was written stays valid
        self._log.close()


def dataset_identity(dataset: Any) -> str:
    """What the manifest records as the dataset's identity: its class."""
    cls = type(dataset)
    return f"{cls.__module__}.{cls.__qualname__}"


def wipe_cache_dir(cache_dir: str) -> None:
    """Remove every file edcache owns in ``cache_dir`` (the directory stays)."""
    for name in (MANIFEST, COMMITS, SHARD_TABLE, PACKED):
        try:
            os.unlink(os.path.join(cache_dir, name))
        except FileNotFoundError:
            pass
    for sub in (SHARDS_DIR, LABELS_DIR):
        shutil.rmtree(os.path.join(cache_dir, sub), ignore_errors=True)
    for name in os.listdir(cache_dir):
        if is_temp(name):
            os.unlink(os.path.join(cache_dir, name))


def prepare_cache_dir(
    cache_dir: str,
    *,
    length: int,
    chunk_size: int,
    dataset: str,
    in_memory_keys: list[str],
    allow_pickle: bool,
    keep_existing: bool,
    parameters: str | None = None,
    fingerprint: str | None = None,
) -> ShardSink:
    """Get ``cache_dir`` ready for a (resumed) build and return its sink.

    With ``keep_existing`` the committed chunks of an earlier run are kept (their shard
    files are checked for presence and size); otherwise everything is removed first.
    Leftover temporary files and shards that were never committed are deleted.
    The caller must hold the cache's build lock.
    """
    os.makedirs(cache_dir, exist_ok=True)
    if not keep_existing:
        wipe_cache_dir(cache_dir)
    try:
        old = read_manifest(cache_dir)
    except FileNotFoundError:
        old = None
    except CorruptCacheError:
        wipe_cache_dir(cache_dir)  # a damaged manifest: nothing in the directory can be trusted
        old = None

    packed_path = os.path.join(cache_dir, PACKED)
    commits: dict[int, tuple[int, str]] = {}
    packed = None  # the packing record of a finalize that was killed after packing
    if old is not None:
        _check_resumable(cache_dir, old, length, dataset, in_memory_keys, allow_pickle, parameters)
        chunk_size = old.chunk_size  # resume with the layout already on disk
        if old.complete and old.packed is not None:
            if _size_or_none(packed_path) == old.packed["nbytes"]:
                # nothing to compute: keep the cache exactly as it is
                _remove_chunk_shards(cache_dir)
                _remove_strays(cache_dir, set())
                try:  # left by a kill right after the complete manifest was written
                    os.unlink(os.path.join(cache_dir, COMMITS))
                except FileNotFoundError:
                    pass
                return ShardSink(cache_dir, old, {}, complete=True)
            wipe_cache_dir(cache_dir)  # the packed file is damaged: nothing to keep
        elif old.complete:
            table = load_shard_table(cache_dir, old, verify=False)
            commits = {c: (int(n), f"{int(h):016x}") for c, (n, h) in enumerate(table.tolist())}
        else:
            commits, packed = read_log(cache_dir, old.num_chunks)
            if packed is not None and _size_or_none(packed_path) != packed["p"]["nbytes"]:
                packed = None
    manifest = Manifest(
        length=length,
        chunk_size=chunk_size,
        dataset=dataset,
        in_memory_keys=list(in_memory_keys),
        allow_pickle=allow_pickle,
        parameters=parameters,
        fingerprint=fingerprint,
    )
    if packed is not None:
        _remove_chunk_shards(cache_dir)
        commits = {}
        log_bytes = packed_record(packed["p"], packed["labels"])
    else:
        os.makedirs(os.path.join(cache_dir, SHARDS_DIR), exist_ok=True)
        if os.path.exists(packed_path):
            os.unlink(packed_path)  # packed by a finalize killed before its log record
        commits = {
            c: v for c, v in commits.items()
            if _size_or_none(shard_path(cache_dir, c)) == v[0]
        }
        log_bytes = b"".join(
            f'{{"c": {c}, "n": {n}, "h": "{h}"}}\n'.encode() for c, (n, h) in sorted(commits.items())
        )
    _remove_strays(cache_dir, set(commits))
    # Rewrite the log so it lists exactly the commits we trust, *before* the manifest
    # says "incomplete": a complete manifest ignores the log, and an incomplete one
    # must never be on disk without the log of what is already committed.
    atomic_write(os.path.join(cache_dir, COMMITS), log_bytes)
    write_manifest(cache_dir, manifest)
    try:
        os.unlink(os.path.join(cache_dir, SHARD_TABLE))
    except FileNotFoundError:
        pass
    return ShardSink(cache_dir, manifest, commits, packed=packed)


def _remove_chunk_shards(cache_dir: str) -> None:
    """Delete the chunk shards of a packed cache (a kill midway leaves some; harmless)."""
    shards = os.path.join(cache_dir, SHARDS_DIR)
    if os.path.isdir(shards):
        shutil.rmtree(shards, ignore_errors=True)
        fsync_dir(cache_dir)


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _remove_strays(cache_dir: str, committed: set[int]) -> None:
    shards = os.path.join(cache_dir, SHARDS_DIR)
    keep = {os.path.basename(shard_path(cache_dir, c)) for c in committed}
    for folder in (cache_dir, shards, os.path.join(cache_dir, LABELS_DIR)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if is_temp(name) or (folder == shards and name not in keep):
                os.unlink(os.path.join(folder, name))


def _check_resumable(
    cache_dir: str,
    old: Manifest,
    length: int,
    dataset: str,
    keys: list[str],
    allow_pickle: bool,
    parameters: str | None,
) -> None:
    hint = "Rebuild it with force_cache=True, keep_existing=False (CLI: --force --no-keep-existing)."
    if old.length != length or (old.dataset and old.dataset != dataset):
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built from {old.dataset or 'a dataset'} of length "
            f"{old.length}; this dataset is {dataset} of length {length}. {hint}"
        )
    if list(old.in_memory_keys) != list(keys):
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built with in_memory_keys {old.in_memory_keys}; "
            f"this dataset has {list(keys)}. {hint}"
        )
    if parameters is not None and old.parameters is not None and old.parameters != parameters:
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built for the arguments {old.parameters}, not "
            f"{parameters}. Use another path per set of arguments, or delete it."
        )
    if old.allow_pickle != allow_pickle:
        raise CacheMismatchError(
            f"the cache at {cache_dir} was built with allow_pickle={old.allow_pickle}. {hint}"
        )
