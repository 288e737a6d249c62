"""The manifest, the commit log and the shard table of a format-v1 cache (read-only).

``manifest.json`` is small and describes the cache (format version, length, chunk
size, label schema, flags); reading it is all that opening a complete cache costs.
While a build runs, ``commits.log`` records each committed chunk on a line of its own
(the commit point). When the last chunk is committed, the
chunks are either packed into one column-wise file, ``packed.shard`` (when every chunk
has the same all-column schema; the chunk shards are then deleted), or their sizes and
checksums are written to ``shards.idx``. Either way the result is sorted by chunk, so the
finished cache does not depend on the order chunks arrived; then the manifest is
replaced with ``complete: true`` and the log is removed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from ...errors import CorruptCacheError
from ..base import ChunkTask
from .shard import checksum

FORMAT = "edcache"
VERSION = 1
MANIFEST = "manifest.json"
COMMITS = "commits.log"
SHARD_TABLE = "shards.idx"
SHARDS_DIR = "shards"
PACKED = "packed.shard"
LABELS_DIR = "labels"

#: A manifest larger than this is not one edcache wrote.
MAX_MANIFEST_BYTES = 1 << 24

SHARD_TABLE_DTYPE = np.dtype([("nbytes", "<u8"), ("xxh3", "<u8")])


@dataclass
class Manifest:
    """What ``manifest.json`` holds. See ``docs/format.md`` for every field."""

    length: int
    chunk_size: int
    dataset: str = ""
    in_memory_keys: list[str] = field(default_factory=list)
    allow_pickle: bool = False
    complete: bool = False
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    shard_table: dict[str, Any] | None = None
    parameters: str | None = None
    packed: dict[str, Any] | None = None
    #: the dataset's configuration (:func:`edcache.fingerprint.dataset_fingerprint`);
    #: None (and absent from the file) when not recorded
    fingerprint: str | None = None
    #: format v1 records no identity of the dataset's class (format v2 does)
    identity: ClassVar[str | None] = None

    @property
    def num_chunks(self) -> int:
        return -(-self.length // self.chunk_size) if self.length else 0

    def chunk(self, chunk_id: int) -> ChunkTask:
        start = chunk_id * self.chunk_size
        return ChunkTask(chunk_id, start, min(start + self.chunk_size, self.length))

    def chunks(self) -> list[ChunkTask]:
        return [self.chunk(c) for c in range(self.num_chunks)]

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        if doc["fingerprint"] is None:  # manifests without one stay byte-identical
            del doc["fingerprint"]
        doc["xxh3"] = checksum(_canonical(doc))  # of the text without this key
        return _canonical(doc)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest's text; ``CorruptCacheError`` (naming ``where``) if
        it is not one edcache wrote."""
        doc = _checked_doc(data, where)
        try:
            m = cls(
                length=doc["length"],
                chunk_size=doc["chunk_size"],
                dataset=doc.get("dataset", ""),
                in_memory_keys=list(doc.get("in_memory_keys", [])),
                allow_pickle=bool(doc.get("allow_pickle", False)),
                complete=bool(doc.get("complete", False)),
                labels=dict(doc.get("labels", {})),
                shard_table=doc.get("shard_table"),
                parameters=doc.get("parameters"),
                packed=doc.get("packed"),
                fingerprint=doc.get("fingerprint"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCacheError(f"{where}: manifest field missing or wrong ({exc})") from exc
        m._check_values(where)
        return m

    def _check_values(self, where: str) -> None:
        if not (
            isinstance(self.length, int) and self.length >= 0
            and isinstance(self.chunk_size, int) and self.chunk_size > 0
            and all(isinstance(k, str) for k in self.in_memory_keys)
            and all(isinstance(v, dict) for v in self.labels.values())
            and (self.fingerprint is None or isinstance(self.fingerprint, str))
        ):
            raise CorruptCacheError(f"{where}: manifest values out of range")
        if self.packed is not None and not _valid_packed(self.packed):
            raise CorruptCacheError(f"{where}: manifest entry 'packed' is malformed")
        if self.complete and (
            set(self.labels) != set(self.in_memory_keys)
            or (self.packed is not None) == isinstance(self.shard_table, dict)
        ):
            raise CorruptCacheError(
                f"{where}: complete manifest lacks labels, or has not exactly one of a shard "
                "table and a packed file"
            )


def _checked_doc(data: bytes, where: str) -> dict[str, Any]:
    """The JSON document of a manifest whose format, version and checksum are right."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCacheError(f"{where}: not an edcache manifest")
    if doc.get("version") != VERSION:
        raise CorruptCacheError(
            f"{where}: format version {doc.get('version')!r}; this edcache reads {VERSION}"
        )
    digest = doc.pop("xxh3", None)
    if digest != checksum(_canonical(doc)):
        raise CorruptCacheError(
            f"{where}: fails its checksum: the file is damaged or was edited by hand"
        )
    return doc


def _canonical(doc: dict) -> bytes:
    """The manifest text edcache writes for ``doc`` (keys sorted, one-space indent)."""
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(cache_dir: str) -> Manifest:
    """Read ``manifest.json`` of ``cache_dir`` (``FileNotFoundError`` if absent)."""
    path = os.path.join(cache_dir, MANIFEST)
    with open(path, "rb") as f:
        # read what is there, not a fixed 16 MiB buffer (f.read(n) allocates n bytes first)
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCacheError(f"{path}: {size} bytes is too large for a manifest")
        data = f.read(size + 1)
    return Manifest.from_bytes(data, path)


def shard_path(cache_dir: str, chunk_id: int) -> str:
    return os.path.join(cache_dir, SHARDS_DIR, f"{chunk_id:08d}.shard")


# -- commit log ----------------------------------------------------------------------
def read_commits(cache_dir: str, num_chunks: int) -> dict[int, tuple[int, str]]:
    """Committed chunks recorded in ``commits.log``: ``{chunk: (nbytes, checksum)}``.

    A torn last line (a crash during the append) or a damaged line is ignored: that
    chunk simply counts as not committed and is computed again.
    """
    return read_log(cache_dir, num_chunks)[0]


#: How a packing record line starts (``json.dumps(..., sort_keys=True)``).
PACKED_START = b'{"labels": '
_HEX16 = re.compile(rb"[0-9a-f]{16}")


@dataclass(frozen=True)
class CommitRecord:
    """One line of ``commits.log``: chunk ``chunk`` is committed, its shard file has
    ``nbytes`` bytes and the xxh3-64 checksum ``xxh3`` (16 hex digits)."""

    chunk: int
    nbytes: int
    xxh3: str

    def to_line(self) -> bytes:
        """The line as edcache wrote it (without the newline)."""
        return json.dumps({"c": self.chunk, "n": self.nbytes, "h": self.xxh3}).encode()

    @classmethod
    def parse(cls, line: bytes, num_chunks: int, *, strict: bool = False) -> CommitRecord | None:
        """The record on ``line``, or None if it is not one for a chunk below
        ``num_chunks``. ``strict``: also None unless the line is byte for byte what
        edcache writes (``edcache verify``); readers accept any valid JSON record."""
        try:
            rec = json.loads(line)
            chunk, nbytes, digest = rec["c"], rec["n"], rec["h"]
        except (ValueError, KeyError, TypeError):
            return None
        if not (isinstance(chunk, int) and 0 <= chunk < num_chunks and isinstance(nbytes, int)):
            return None
        record = cls(chunk, nbytes, str(digest))
        if strict and not (type(chunk) is type(nbytes) is int and isinstance(digest, str)
                           and _HEX16.fullmatch(digest.encode()) and record.to_line() == line):
            return None
        return record


def read_log(cache_dir: str, num_chunks: int) -> tuple[dict[int, tuple[int, str]], dict | None]:
    """The chunk commits of ``commits.log`` and its packing record, if any.

    The packing record (:func:`packed_record`) is the last line a build writes: the
    chunks are packed into ``packed.shard``, whose size and checksum it holds, with the
    label entries of the manifest to be.
    """
    try:
        with open(os.path.join(cache_dir, COMMITS), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return {}, None
    commits: dict[int, tuple[int, str]] = {}
    packed = None
    for line in lines[:-1]:  # the part after the last newline is torn or empty
        if line.startswith(PACKED_START):
            rec = parse_packed_record(line)
            packed = rec if rec is not None else packed
            continue
        record = CommitRecord.parse(line, num_chunks)
        if record is not None:
            commits[record.chunk] = (record.nbytes, record.xxh3)
    return commits, packed


def parse_packed_record(line: bytes) -> dict[str, Any] | None:
    """The packing record on ``line`` (``{"p": {nbytes, xxh3}, "labels": {...}}``), or None."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if isinstance(rec, dict) and _valid_packed(rec.get("p")) and isinstance(rec.get("labels"), dict):
        return rec
    return None


def _valid_packed(info: Any) -> bool:
    return isinstance(info, dict) and isinstance(info.get("nbytes"), int) and isinstance(info.get("xxh3"), str)


# -- shard table ---------------------------------------------------------------------
def packed_record(packed: dict[str, Any], labels: dict[str, dict]) -> bytes:
    """The log line that committed the packing of all chunks into ``packed.shard``
    (``edcache verify`` checks v1 logs against it)."""
    return json.dumps({"p": packed, "labels": labels}, sort_keys=True).encode() + b"\n"


def load_shard_table(cache_dir: str, manifest: Manifest, verify: bool) -> np.ndarray:
    """The ``(nbytes, xxh3)`` row of every shard, memory-mapped."""
    path = os.path.join(cache_dir, SHARD_TABLE)
    info = manifest.shard_table or {}
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as exc:
        raise CorruptCacheError(f"{path} is missing") from exc
    if size != info.get("nbytes"):
        raise CorruptCacheError(f"{path} has {size} bytes, the manifest says {info.get('nbytes')}")
    if verify:
        with open(path, "rb") as f:
            if checksum(f.read()) != info.get("xxh3"):
                raise CorruptCacheError(f"{path} fails its checksum")
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise CorruptCacheError(f"{path} is not a valid shard table ({exc})") from exc
    if table.dtype != SHARD_TABLE_DTYPE or table.shape != (manifest.num_chunks,):
        raise CorruptCacheError(f"{path} does not match the manifest")
    return table
