"""``edcache convert SRC DST``: move a cache between edflow's layouts and the new format.

* an edflow zip (also one without central directory, whose complete members are
  salvaged) or an edflow examples folder -> the new format (DST a directory) or a clean
  edflow zip (DST ending in ``.zip``);
* the new format -> an edflow zip (DST ending in ``.zip``).

DST is the cache's own path: ``<root>/cached/<name>`` then opens with
``CachedDataset.from_cache(root, name)``, ``<root>/cached/<name>.zip`` with
``from_cache(root, name, _legacy=True)``; a cache at any other path opens with
``PathCachedDataset(None, path)``. Every example is read back from DST and compared
with SRC (types, dtypes, values); labels are compared too.

A conversion that is interrupted (killed, Ctrl-C, full disk) at any point is resumed by
running the same command again: a marker ``.<name>.converting`` beside DST says that
DST is not verified yet, and the rerun completes (or re-checks) it instead of refusing
an existing DST. A finished conversion leaves only DST: no marker, no lock file, no
temporary copy. The converted cache records no dataset class (it was built from
another cache), so any dataset with the same length and labels may open it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import (
    BuildError,
    CacheNotFoundError,
    CorruptCacheError,
    EdcacheError,
    ExampleError,
    IncompleteCacheError,
)
from .format import open_reader
from .format.base import CacheReader
from .format.legacy import (
    ExamplesFolder,
    is_legacy_folder,
    iter_salvaged_members,
    safe_loads,
    write_members_zip,
)
from .format.legacy.labels import labels_to_columns
from .format.legacy.zip_reader import LABELS_MEMBER, example_index, example_member

__all__ = ["convert"]


class _LegacySource:
    """The members of an edflow zip or folder, by example index (names as edflow gives them)."""

    def __init__(self, path: str, allow_pickle: bool, progress: bool) -> None:
        self.path = path
        self.allow_pickle = allow_pickle
        self._read: Callable[[str], bytes]
        names: list[str]
        if os.path.isdir(path):
            folder = ExamplesFolder(path)
            self._read, names = folder.read, os.listdir(path)
        else:
            try:
                zf = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                # No central directory (writer killed): keep every complete member.
                salvaged = dict(iter_salvaged_members(path))
                if not salvaged:
                    raise CorruptCacheError(f"{path}: no complete zip member could be salvaged") from None
                if progress:
                    print(f"edcache: {path} has no central directory; salvaged {len(salvaged)} "
                          "complete members", file=sys.stderr)
                self._read, names = salvaged.__getitem__, list(salvaged)
            else:
                self._read, names = zf.read, zf.namelist()
        self.indices = sorted({i for i in map(example_index, names) if i is not None})
        self.has_labels = LABELS_MEMBER in names

    def raw_member(self, name: str) -> bytes:
        return self._read(name)

    def raw(self, index: int) -> bytes:
        return self._read(example_member(index))

    def example(self, index: int) -> Any:
        member = f"{self.path}:{example_member(index)}"
        return safe_loads(self.raw(index), member=member, allow_pickle=self.allow_pickle)

    def raw_labels(self) -> dict:
        member = f"{self.path}:{LABELS_MEMBER}"
        labels = safe_loads(self._read(LABELS_MEMBER), member=member, allow_pickle=self.allow_pickle)
        labels_to_columns(labels, member)  # checks it is a dict
        return labels


class _ReaderDataset:
    """A dataset over already computed examples, to build a cache from another one."""

    def __init__(self, dst: str, length: int, keys: list[str], read: Callable[[int], Any]) -> None:
        self.root = os.path.dirname(os.path.dirname(os.path.abspath(dst)))
        base = os.path.basename(dst.rstrip(os.sep))
        self.name = base[:-4] if base.endswith(".zip") else base
        self.in_memory_keys = keys
        self._length = length
        self._read = read

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        return self._read(int(index))


def _same(a: Any, b: Any, where: str) -> None:
    """Strict deep equality (types, dtypes, shapes, key order); BuildError naming the path."""
    if type(a) is not type(b):
        raise BuildError(f"{where}: {type(a).__name__} became {type(b).__name__}")
    if isinstance(a, dict):
        if list(a) != list(b):
            raise BuildError(f"{where}: keys {list(a)} became {list(b)}")
        for key in a:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise BuildError(f"{where}: length {len(a)} became {len(b)}")
        for k, (x, y) in enumerate(zip(a, b, strict=False)):
            _same(x, y, f"{where}[{k}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        if a.dtype != b.dtype or np.shape(a) != np.shape(b) or not _equal(a, b):
            raise BuildError(f"{where}: array {a.dtype}{np.shape(a)} differs after conversion")
    elif not _equal(a, b):
        raise BuildError(f"{where}: {a!r:.60} became {b!r:.60}")


def _equal(a: Any, b: Any) -> bool:
    """Value equality, NaN equal to NaN, numbers compared across Python/numpy types."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=False))
    numeric = (np.ndarray, np.generic, int, float, complex)
    if isinstance(a, numeric) and isinstance(b, numeric):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
        except TypeError:  # equal_nan on non-numeric dtypes
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def _check_labels(expected: dict, got: dict, dst: str) -> None:
    if list(expected) != list(got):
        raise BuildError(f"{dst}: label keys {list(expected)} became {list(got)}")
    for key, values in expected.items():
        column = got[key]
        if len(column) != len(values) or not all(_equal(v, column[i]) for i, v in enumerate(values)):
            raise BuildError(f"{dst}: the values of label {key!r} differ after conversion")


def _verify(length: int, src: Callable[[int], Any], dst: CacheReader, desc: str, progress: bool) -> None:
    for i in tqdm(range(length), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True):
        _same(src(i), dst.read(i), f"example {i}")


def _check_dst_free(dst: str) -> None:
    """Refuse to overwrite a complete cache; an interrupted conversion is resumed."""
    if not os.path.exists(dst) or (os.path.isdir(dst) and not os.listdir(dst)):
        return
    if dst.endswith(".zip"):
        raise FileExistsError(f"{dst} already exists; delete it first")
    try:
        reader = open_reader(dst)
    except (CacheNotFoundError, CorruptCacheError):
        raise FileExistsError(f"{dst} exists and is not an edcache cache; choose another DST") from None
    complete = reader.complete
    reader.close()
    if complete:
        raise FileExistsError(f"{dst} already holds a complete cache; delete it first")


def _build(make: Callable[[], Any]) -> Any:
    """Run a build; an error reading the source surfaces as itself, not as a dataset error."""
    try:
        return make()
    except ExampleError as exc:
        if isinstance(exc.__cause__, EdcacheError):
            raise exc.__cause__ from None
        raise


def _legacy_to_zip(source: _LegacySource, dst: str, progress: bool) -> None:
    def members() -> Iterator[tuple[str, bytes]]:
        for i in tqdm(source.indices, desc=f"converting {os.path.basename(dst)}", unit="ex",
                      disable=not progress, dynamic_ncols=True):
            source.example(i)  # verified: it unpickles (safely, unless allow_pickle)
            yield example_member(i), source.raw(i)
        if source.has_labels:
            source.raw_labels()  # verified too
            yield LABELS_MEMBER, source.raw_member(LABELS_MEMBER)

    write_members_zip(dst, members())


def _legacy_to_shards(source: _LegacySource, dst: str, progress: bool) -> None:
    from .decorator import PathCachedDataset

    length = len(source.indices)
    if source.indices != list(range(length)):
        missing = sorted(set(range(source.indices[-1] + 1)) - set(source.indices))
        raise IncompleteCacheError(
            f"{source.path} lacks example {missing[0]} ({len(missing)} missing in all), and the new "
            f"format has no holes. Convert it to a zip instead (`edcache convert {source.path} "
            "DST.zip`), complete that with CachedDataset(dataset, _legacy=True), then convert it."
        )
    labels = source.raw_labels() if source.has_labels else {}
    if not source.has_labels and progress:
        print(f"edcache: {source.path} has no labels.p (an unfinished run); converting without labels",
              file=sys.stderr)
    dataset = _ReaderDataset(dst, length, list(labels), source.example)
    built = _build(lambda: PathCachedDataset(dataset, dst, num_workers=0, progress=progress))
    _forget_reader_identity(dst)
    reader = built.store
    _verify(length, source.example, reader, "verifying", progress)
    _check_labels(labels, reader.labels, dst)


def _reader_to(src: str, dst: str, progress: bool) -> None:
    """Rewrite an edcache cache (v1 or v2) as ``dst`` (an edflow zip, or format v2)."""
    from .decorator import PathCachedDataset

    source = open_reader(src)
    if not source.complete:
        raise IncompleteCacheError(f"{src} is not complete; finish building it before converting")
    keys = list(source.labels)
    dataset = _ReaderDataset(dst, len(source), keys, source.read)
    built = _build(lambda: PathCachedDataset(dataset, dst, num_workers=0, progress=progress))
    if not dst.endswith(".zip"):
        _forget_reader_identity(dst, src)
    reader = built.store
    _verify(len(source), source.read, reader, "verifying", progress)
    expected = source.labels
    _check_labels({k: [expected[k][i] for i in range(len(source))] for k in keys}, reader.labels, dst)


def _beside(dst: str, suffix: str) -> str:
    """``<dir of dst>/.<name of dst><suffix>`` (where the build lock and marker live)."""
    head, tail = os.path.split(os.path.abspath(dst).rstrip(os.sep))
    return os.path.join(head, f".{tail}{suffix}")


def _read_marker(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _remove_leftovers(dst: str) -> None:
    """Temporary copies a killed zip conversion left beside ``dst`` (``.tmp-<name>-<hex>``)."""
    head, tail = os.path.split(os.path.abspath(dst).rstrip(os.sep))
    pattern = re.compile(rf"\.tmp-{re.escape(tail)}-[0-9a-f]{{32}}")
    try:
        names = os.listdir(head)
    except OSError:
        return
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(head, name))


def _forget_reader_identity(dst: str, src: str | None = None) -> None:
    """A new-format DST records the source cache's dataset class (or none): it was built
    from a cache, and ``_ReaderDataset`` would make every real dataset a mismatch."""
    from .format.columnar.manifest import read_manifest, write_manifest

    manifest = read_manifest(dst)
    if manifest.dataset == f"{_ReaderDataset.__module__}.{_ReaderDataset.__qualname__}":
        manifest.dataset = getattr(getattr(open_reader(src), "manifest", None), "dataset", "") if src else ""
        write_manifest(dst, manifest)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def convert(src: str, dst: str, *, allow_pickle: bool = False, progress: bool = True) -> None:
    """Convert the cache at ``src`` into a cache at ``dst``.

    Parameters
    ----------
    src : str
        An edflow zip (``<root>/cached/<name>.zip``, also one whose writer was killed:
        its complete members are salvaged), an edflow examples folder, or a cache
        directory in the new format.
    dst : str
        Where to write: a path ending in ``.zip`` gets edflow's zip layout, any other
        path the new format. An existing complete cache there is never overwritten; an
        interrupted conversion into the new format resumes.
    allow_pickle : bool
        Trust the pickles in an edflow ``src`` (see
        :func:`edcache.format.legacy.safe_loads`). The new-format ``dst`` is always
        written with the safe codec.
    progress : bool
        Show progress bars.

    Raises
    ------
    UnsafePickleError
        An edflow member needs a global outside the safe list (and not ``allow_pickle``).
    IncompleteCacheError
        ``src`` has holes (missing example indices) and ``dst`` is the new format, or a
        new-format ``src`` is unfinished.
    CodecError
        An example holds a value the new format's codec cannot store.
    BuildError
        An example or label read back from ``dst`` differs from ``src``.
    FileExistsError
        ``dst`` already holds something.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"convert needs two different paths, got {src} twice")
    to_zip = dst.endswith(".zip")
    legacy_src = os.path.isfile(src) or is_legacy_folder(src)
    if not legacy_src:
        if not os.path.exists(src):
            raise CacheNotFoundError(f"no cache at {src}")
        from .format.columnar.manifest import peek_version

        if not to_zip and peek_version(src) != 1:
            raise ValueError(f"{src} is already in format v2; give a DST ending in .zip to get an edflow zip")
    marker = _beside(dst, ".converting")
    if _read_marker(marker) != os.path.abspath(src):  # not the rerun of an interrupted conversion
        _check_dst_free(dst)
    _remove_leftovers(dst)
    from .format.fsutil import atomic_write

    os.makedirs(os.path.dirname(marker), exist_ok=True)
    atomic_write(marker, os.path.abspath(src).encode())
    try:
        if legacy_src:
            source = _LegacySource(src, allow_pickle, progress)
            if to_zip:
                _legacy_to_zip(source, dst, progress)
            else:
                _legacy_to_shards(source, dst, progress)
        else:
            _reader_to(src, dst, progress)  # v2 -> zip, or v1 -> zip or v2
    except BaseException:
        if not os.path.lexists(dst):  # nothing to resume: leave no trace
            _unlink(marker)
            _unlink(_beside(dst, ".lock"))
        raise
    _unlink(marker)  # verified: DST is complete and equal to SRC
    _unlink(_beside(dst, ".lock"))  # the build lock of the conversion
    _remove_leftovers(dst)
