"""Writing edflow 0.4 zip caches, crash-safely.

Layout (what edflow 0.4's ``from_cache`` reads): one ``ZIP_DEFLATED`` member
``example_{i}.p`` per example, written with ``ZipFile.writestr`` in commit order, holding
``pickle.dumps(example)`` (protocol 4, numpy globals under their numpy 1.x names, see
:func:`~edcache.format.legacy.pickler.legacy_dumps`); then ``labels.p``, a pickled dict
mapping each ``in_memory_key`` to the list of its values in index order (``{}`` without
keys). No directories, no comment.

Crash safety. The zip at ``path`` is only ever replaced whole, by ``os.replace``, with a
finished zip. While building, members are appended to ``path + ".partial"``: each
committed chunk is flushed and fsynced before ``commit`` returns, so a SIGKILL leaves a
file whose complete members :func:`~edcache.format.legacy.salvage.iter_salvaged_members`
recovers (the central directory is only written at the end). A resumed build first
rewrites every kept member (from ``.partial`` and the existing zip) into a fresh
temporary file, atomically renamed to ``.partial``, then computes only the examples
still missing (the kept ones keep their pickles and their labels). ``finalize``
appends ``labels.p``, writes the central directory, fsyncs and renames ``.partial`` to
``path``. A build with ``keep_existing=False`` first deletes ``.partial`` and creates
the empty file ``path + ".rebuild"``, removed only after the new zip replaced the old
one: while it exists the old zip stays on disk untouched (edflow still reads it) but
edcache treats the cache as incomplete and a resumed build keeps only ``.partial``,
so an interrupted rebuild is never mistaken for the old cache nor mixed with it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from ...errors import BuildError, CorruptCacheError, LabelError
from ..base import ChunkEncoder, ChunkResult, ChunkSink, ChunkTask
from .pickler import PROTOCOL, legacy_dumps
from .salvage import iter_salvaged_members
from .unpickler import safe_loads
from .zip_reader import LABELS_MEMBER, example_index, example_member

__all__ = [
    "PARTIAL_SUFFIX",
    "REBUILD_SUFFIX",
    "LegacyZipEncoder",
    "LegacyZipSink",
    "build_leftovers",
    "rebuild_pending",
    "remove_build_leftovers",
    "write_members_zip",
]

#: Suffix of the file a legacy zip is built in.
PARTIAL_SUFFIX = ".partial"
#: Suffix of the sentinel of a rebuild (``keep_existing=False``) not yet finished.
REBUILD_SUFFIX = ".rebuild"


def rebuild_pending(path: str) -> bool:
    """Whether a rebuild of the zip at ``path`` started and has not finished: the zip
    there (if any) is the old cache, not the one being built."""
    return os.path.exists(path + REBUILD_SUFFIX)


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final: str, tag: str) -> str:
    head, tail = os.path.split(final)
    return os.path.join(head, f".tmp-{tail}{tag}-{uuid.uuid4().hex}")


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def build_leftovers(path: str) -> list[str]:
    """Files a build of the zip at ``path`` leaves beside it while it runs (or when it is
    killed): ``.partial``, its temporary copies and staged chunks."""
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    try:
        names = os.listdir(head)
    except FileNotFoundError:
        return []
    partial = os.path.basename(path + PARTIAL_SUFFIX)
    return [
        os.path.join(head, name) for name in names
        if name == partial or name.startswith((f".tmp-{tail}{PARTIAL_SUFFIX}-", f".tmp-{tail}.chunk"))
    ]


def remove_build_leftovers(path: str) -> None:
    """Delete :func:`build_leftovers` of ``path``. The caller holds the build lock."""
    for leftover in build_leftovers(path):
        _remove(leftover)


def _zip_members(path: str) -> Iterator[tuple[str, bytes]]:
    """Members of a zip; through local headers if it has no central directory."""
    try:
        zf = zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile:
        yield from iter_salvaged_members(path)
        return
    with zf:
        for info in zf.infolist():
            try:
                yield info.filename, zf.read(info)
            except (zipfile.BadZipFile, OSError) as exc:
                raise CorruptCacheError(f"{path}:{info.filename} is damaged ({exc})") from exc


_IMMUTABLE = frozenset({int, float, str, bytes, bool, type(None)})


@dataclass(frozen=True)
class LegacyZipEncoder(ChunkEncoder):
    """Pickles a chunk's examples in the worker (protocol 4, numpy 1.x names).

    The :class:`ChunkResult` carries the pickles concatenated in ``data`` (or in the
    file ``staged_path``), ``extra["sizes"]`` (the length of each pickle, in index
    order) and ``extra["labels"]`` (each ``in_memory_key`` to its values in the chunk).
    """

    in_memory_keys: tuple[str, ...]
    stage_path: str | None = None  # the cache path staged files are named after
    protocol: int = PROTOCOL

    def encode(self, task: ChunkTask, examples: Iterable[dict]) -> ChunkResult:
        labels: dict[str, list] = {k: [] for k in self.in_memory_keys}
        blobs = []
        # one pass, each example pickled as soon as it is computed (as edflow did): a
        # dataset that reuses its output buffer is cached correctly
        for offset, example in enumerate(examples):
            for key in self.in_memory_keys:
                try:
                    value = example[key]
                except (KeyError, TypeError, IndexError):
                    raise LabelError(
                        f"example {task.start + offset} has no key {key!r}, which is in in_memory_keys"
                    ) from None
                labels[key].append(value if type(value) in _IMMUTABLE else copy.deepcopy(value))
            blobs.append(legacy_dumps(example, self.protocol))
        data = b"".join(blobs)
        result = ChunkResult(
            chunk_id=task.chunk_id, start=task.start, stop=task.stop,
            checksum=xxhash.xxh3_64_hexdigest(data), nbytes=len(data),
            extra={"sizes": [len(b) for b in blobs], "labels": labels},
        )
        if self.stage_path is None:
            result.data = data
        else:
            staged = _temp_name(self.stage_path, f".chunk{task.chunk_id}")
            with open(staged, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            result.staged_path = staged
        return result



def _sync(zf: zipfile.ZipFile) -> None:
    """Flush what ``zf`` wrote so far to its file, and that to the disk."""
    fp = zf.fp
    assert fp is not None, "the zip is open"
    fp.flush()
    os.fsync(fp.fileno())


class LegacyZipSink(ChunkSink):
    """Builds an edflow 0.4 zip cache at ``path`` (see the module docstring for layout).

    Chunk ``c`` covers indices ``c * chunk_size`` up to ``min((c + 1) * chunk_size,
    length)``. Members are written in commit order, like edflow's arrival order.

    Parameters
    ----------
    path : str
        The zip to write (``<root>/cached/<name>.zip``).
    length : int
        Number of examples.
    in_memory_keys : list[str]
        Keys collected into ``labels.p``.
    keep_existing : bool
        Keep the examples already in ``path`` (even a zip without central directory,
        e.g. from a killed edflow run) and in an interrupted build's ``.partial``.
        Example members with an index outside ``range(length)`` and old ``labels.p``
        are dropped. Labels of kept examples are read back from their pickles.
    chunk_size : int
        Examples per chunk.
    allow_pickle : bool
        Trust kept pickles when reading their labels back.
    """

    def __init__(self, path: str, length: int, in_memory_keys: list[str], *, keep_existing: bool,
                 chunk_size: int, allow_pickle: bool = False) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        self.path = os.path.abspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.length = int(length)
        self.in_memory_keys = list(in_memory_keys)
        self.keep_existing = keep_existing
        self.chunk_size = int(chunk_size)
        self.allow_pickle = allow_pickle
        self._zip: zipfile.ZipFile | None = None
        self._present: set[int] = set()
        self._labels: dict[int, tuple] = {}

    # -- preparing the partial file ---------------------------------------------------
    def _keep(self, zf: zipfile.ZipFile, source: str) -> None:
        for name, data in _zip_members(source):
            index = example_index(name)
            if index is None or index >= self.length or index in self._present:
                continue
            if self.in_memory_keys:
                example = safe_loads(data, member=f"{source}:{name}", allow_pickle=self.allow_pickle)
                try:
                    self._labels[index] = tuple(example[k] for k in self.in_memory_keys)
                except (KeyError, TypeError) as exc:
                    raise LabelError(
                        f"{source}:{name} (example {index}) has no key {exc}, which is in in_memory_keys"
                    ) from None
            zf.writestr(name, data)
            self._present.add(index)

    def _remove_leftovers(self) -> None:
        """Delete temporary and staged files a crashed build left (we hold the build lock)."""
        head, tail = os.path.split(self.path)
        for name in os.listdir(head):
            if name.startswith((f".tmp-{tail}{PARTIAL_SUFFIX}-", f".tmp-{tail}.chunk")):
                _remove(os.path.join(head, name))

    def _prepare(self) -> zipfile.ZipFile:
        if self._zip is not None:
            return self._zip
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._remove_leftovers()
        if not self.keep_existing:
            # The sentinel first: killed from here on, the next construction does not take
            # the old zip for the cache and keeps only the new members in .partial.
            with open(self.path + REBUILD_SUFFIX, "wb") as f:
                os.fsync(f.fileno())
            _remove(self.partial_path)
            _fsync_dir(os.path.dirname(self.path))
        rebuilding = rebuild_pending(self.path)
        self._present.clear()
        self._labels.clear()
        tmp = _temp_name(self.partial_path, "")  # .tmp-<name>.zip.partial-<uuid>
        zf = None
        try:
            zf = zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED)
            if self.keep_existing:
                sources = (self.partial_path,) if rebuilding else (self.partial_path, self.path)
                for source in sources:
                    if os.path.isfile(source):
                        self._keep(zf, source)
            _sync(zf)
            os.replace(tmp, self.partial_path)  # zf keeps appending to the renamed file
        except BaseException:
            if zf is not None:
                zf.close()
            _remove(tmp)
            self._present.clear()
            self._labels.clear()
            raise
        _fsync_dir(os.path.dirname(self.path))
        self._zip = zf
        return zf

    # -- ChunkSink --------------------------------------------------------------------
    def _chunk_range(self, chunk_id: int) -> range:
        start = chunk_id * self.chunk_size
        return range(start, min(start + self.chunk_size, self.length))

    @property
    def location(self) -> str:
        return self.path

    def plan(self) -> list[ChunkTask]:
        """The work still to do: runs of missing consecutive examples, each within one
        chunk (so a resumed build computes only the examples not yet in the zip)."""
        self._prepare()
        tasks: list[ChunkTask] = []
        n_chunks = -(-self.length // self.chunk_size)
        for chunk in range(n_chunks):
            start = None
            for i in [*self._chunk_range(chunk), None]:
                if i is not None and i not in self._present:
                    start = i if start is None else start
                elif start is not None:
                    stop = i if i is not None else self._chunk_range(chunk).stop
                    tasks.append(ChunkTask(len(tasks), start, stop))
                    start = None
        return tasks

    def committed(self) -> set[int]:
        """Chunks whose every ``example_{i}.p`` is in the partial zip (kept or new)."""
        self._prepare()
        n_chunks = -(-self.length // self.chunk_size)
        return {c for c in range(n_chunks) if all(i in self._present for i in self._chunk_range(c))}

    def encoder(self, *, staged: bool) -> LegacyZipEncoder:
        """The worker-side encoder; with ``staged`` it writes each chunk to a file next to ``path``."""
        return LegacyZipEncoder(tuple(self.in_memory_keys), self.path if staged else None)

    def commit(self, result: ChunkResult) -> bool:
        """Append the chunk's members, fsync; False (and the result discarded) if all present."""
        zf = self._prepare()
        indices = range(result.start, result.stop)
        if all(i in self._present for i in indices):
            self.discard(result)
            return False
        if result.data is not None:
            data = result.data
        elif result.staged_path is not None:
            with open(result.staged_path, "rb") as f:
                data = f.read()
        else:
            raise BuildError(f"chunk {result.chunk_id} arrived without data")
        sizes = result.extra["sizes"]
        if (xxhash.xxh3_64_hexdigest(data) != result.checksum or len(sizes) != len(indices)
                or sum(sizes) != len(data)):
            raise BuildError(f"chunk {result.chunk_id} (examples {result.start}..{result.stop - 1}) "
                             "arrived damaged: checksum or sizes do not match")
        offset = 0
        for index, size in zip(indices, sizes, strict=False):
            if index not in self._present:
                zf.writestr(example_member(index), data[offset : offset + size])
            offset += size
        _sync(zf)
        labels = result.extra.get("labels", {})
        columns = [labels[k] for k in self.in_memory_keys]
        for k, index in enumerate(indices):
            if index not in self._present:  # a kept example keeps the labels of its pickle
                self._labels[index] = tuple(column[k] for column in columns)
        self._present.update(indices)
        self.discard(result)
        return True

    def finalize(self) -> None:
        """Append ``labels.p``, write the central directory and rename the zip into place."""
        zf = self._prepare()
        missing = [i for i in range(self.length) if i not in self._present]
        if missing:
            raise BuildError(f"cannot finalize {self.path}: {len(missing)} examples are missing "
                             f"(first: {missing[0]})")
        labels = {key: [self._labels[i][k] for i in range(self.length)]
                  for k, key in enumerate(self.in_memory_keys)}
        zf.writestr(LABELS_MEMBER, legacy_dumps(labels))
        zf.close()  # writes the central directory
        with open(self.partial_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.partial_path, self.path)
        _fsync_dir(os.path.dirname(self.path))
        _remove(self.path + REBUILD_SUFFIX)  # after the rename: the new zip is the cache now
        self._zip = None
        self._present.clear()
        self._labels.clear()

    def discard(self, result: ChunkResult) -> None:
        """Remove the result's staged file, if any."""
        if result.staged_path is not None:
            _remove(result.staged_path)

    def close(self) -> None:
        """Stop without finalizing: committed chunks stay in ``.partial`` for a resume."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self) -> Any:
        raise TypeError("LegacyZipSink lives in the build coordinator; send its encoder() to workers")


def write_members_zip(path: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Write ``members`` as an edflow zip at ``path``, atomically (temp file, fsync, rename).

    Each member is ``ZIP_DEFLATED`` via ``writestr``, in the order given. Used to copy
    or salvage a legacy cache into a clean zip.

    Parameters
    ----------
    path : str
        The zip to (re)place.
    members : iterable of (str, bytes)
        Member names and contents.

    Returns
    -------
    int
        The number of members written.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path, "")
    count = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
                count += 1
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))
    return count
