"""``manifest.json`` of a format-v2 cache: the one place it is encoded and parsed.

A complete manifest describes everything a reader needs (columns, layouts, file
sizes, labels); an incomplete one only the build's parameters (the schema of a build
in progress is in ``commits.log``, see :mod:`.log`). See ``docs/format.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

import xxhash

from ...errors import CorruptCacheError
from ..base import ChunkTask
from ..fsutil import atomic_write, open_regular
from .schema import ColumnSpec, Layout


def valid_codecs_doc(doc: Any) -> bool:
    from .codec_names import valid_codecs_doc as valid

    return valid(doc)

FORMAT = "edcache"
VERSION = 2
MANIFEST = "manifest.json"
COMMITS = "commits.log"
TABLE = "checksums.npy"
COLUMNS_DIR = "columns"
LABELS_DIR = "labels"
#: A manifest larger than this is not one edcache wrote.
MAX_MANIFEST_BYTES = 1 << 26


def checksum(data: Any) -> str:
    """xxh3-64 of ``data`` as 16 hex digits (what the manifest records)."""
    return xxhash.xxh3_64_hexdigest(data)


_T = TypeVar("_T")


def _parsed(parse: Callable[[Any, str], _T], doc: Any, where: str, what: str) -> _T:
    """``parse(doc, where)``, with any exception a structure of the wrong shape raises
    (valid JSON, wrong types) turned into a ``CorruptCacheError``."""
    try:
        return parse(doc, where)
    except CorruptCacheError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, IndexError) as exc:
        raise CorruptCacheError(f"{where}: malformed {what} ({type(exc).__name__}: {exc})") from exc


@dataclass
class Schema:
    """The columns and layouts of a cache (fixed once complete)."""

    columns: list[ColumnSpec] = field(default_factory=list)
    layouts: list[Layout] = field(default_factory=list)
    #: column holding each row's layout number (u32), or None: every row has layout 0
    layout_column: int | None = None

    def files(self) -> list[str]:
        """Every column file, in the order of checksum tables and commit records."""
        return [f for c in self.columns for f in c.files()]

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [c.to_json() for c in self.columns],
            "layouts": [lay.to_json() for lay in self.layouts],
            "layout_column": self.layout_column,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Schema:
        """Parse and validate; any malformed structure is a ``CorruptCacheError``."""
        return _parsed(cls._from_json, doc, where, "schema")

    @classmethod
    def _from_json(cls, doc: Any, where: str) -> Schema:
        if not isinstance(doc, dict) or not isinstance(doc.get("columns"), list) or not isinstance(
            doc.get("layouts"), list
        ):
            raise CorruptCacheError(f"{where}: malformed schema")
        columns = [ColumnSpec.from_json(c, where) for c in doc["columns"]]
        layouts = [Layout.from_json(lay, len(columns), where) for lay in doc["layouts"]]
        lc = doc.get("layout_column")
        if lc is not None and not (type(lc) is int and 0 <= lc < len(columns)
                                   and columns[lc].kind == "fixed" and columns[lc].dtype == "<u4"):
            raise CorruptCacheError(f"{where}: malformed layout column {lc!r}")
        stems = [c.stem for c in columns if c.files()]
        if len(set(stems)) != len(stems):
            raise CorruptCacheError(f"{where}: two columns share files")
        return cls(columns, layouts, lc)


@dataclass
class Manifest:
    """What ``manifest.json`` holds. See ``docs/format.md`` for every field."""

    length: int
    chunk_size: int
    dataset: str = ""
    fingerprint: str | None = None
    #: JSON text {"class", "source", "version"} (see edcache.fingerprint.dataset_identity_record)
    identity: str | None = None
    in_memory_keys: list[Any] = field(default_factory=list)
    allow_pickle: bool = False
    parameters: str | None = None
    complete: bool = False
    schema: Schema = field(default_factory=Schema)
    #: (relative path, size in bytes) of every column file, in schema order
    files: list[tuple[str, int]] = field(default_factory=list)
    #: {"nbytes", "xxh3"} of ``checksums.npy``
    table: dict[str, Any] | None = None
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the ``codecs=`` the build was asked for (see :func:`.codecs.normalize_codecs`), or None
    codecs: list[list[Any]] | None = None

    version = VERSION

    @property
    def num_chunks(self) -> int:
        return -(-self.length // self.chunk_size) if self.length else 0

    def chunk(self, chunk_id: int) -> ChunkTask:
        start = chunk_id * self.chunk_size
        return ChunkTask(chunk_id, start, min(start + self.chunk_size, self.length))

    def build_params(self) -> dict[str, Any]:
        """The fields that identify a build (also the commit log's header)."""
        params = {
            "length": self.length, "chunk_size": self.chunk_size, "dataset": self.dataset,
            "fingerprint": self.fingerprint, "identity": self.identity, "in_memory_keys": list(self.in_memory_keys),
            "allow_pickle": self.allow_pickle, "parameters": self.parameters,
        }
        if self.codecs is not None:  # (absent: a cache without codecs reads as before)
            params["codecs"] = self.codecs
        return params

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, **self.build_params(),
                               "complete": self.complete}
        if self.complete:
            doc.update(schema=self.schema.to_json(), files=[list(f) for f in self.files],
                       table=self.table, labels=self.labels)
        doc["xxh3"] = checksum(_canonical(doc))  # of the text without this key
        return _canonical(doc)

    @classmethod
    def from_doc(cls, doc: dict, where: str) -> Manifest:
        """Build from the parameters of ``doc`` (a manifest or a log header)."""
        try:
            m = cls(
                length=doc["length"], chunk_size=doc["chunk_size"], dataset=doc.get("dataset") or "",
                fingerprint=doc.get("fingerprint"), identity=doc.get("identity"),
                in_memory_keys=list(doc.get("in_memory_keys") or []),
                allow_pickle=doc.get("allow_pickle", False), parameters=doc.get("parameters"),
                codecs=doc.get("codecs"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCacheError(f"{where}: manifest field missing or wrong ({exc})") from exc
        if not (
            type(m.length) is int and 0 <= m.length < 2**48
            and type(m.chunk_size) is int and 0 < m.chunk_size < 2**32
            and isinstance(m.dataset, str)
            and (m.fingerprint is None or isinstance(m.fingerprint, str))
            and (m.identity is None or isinstance(m.identity, str))
            and (m.parameters is None or isinstance(m.parameters, str))
            and type(m.allow_pickle) is bool
            and all(type(k) in (str, int) for k in m.in_memory_keys)
            and valid_codecs_doc(m.codecs)
        ):
            raise CorruptCacheError(f"{where}: manifest values out of range")
        return m

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate; any malformed structure is a ``CorruptCacheError``."""
        return _parsed(cls._from_bytes, data, where, "manifest")

    @classmethod
    def _from_bytes(cls, data: bytes, where: str) -> Manifest:
        doc = _checked_doc(data, where)
        m = cls.from_doc(doc, where)
        m.complete = doc.get("complete") is True
        if m.complete:
            m._read_complete(doc, where)
        return m

    def _read_complete(self, doc: dict, where: str) -> None:
        """Set the schema, files, table and labels of a complete manifest from ``doc``."""
        self.schema = Schema.from_json(doc.get("schema"), where)
        files, table, labels = doc.get("files"), doc.get("table"), doc.get("labels")
        if not (
            _valid_files(files, self.schema.files())
            and _valid_table(table)
            and _valid_labels(labels, self.in_memory_keys)
        ):
            raise CorruptCacheError(f"{where}: complete manifest is malformed (files, table or labels)")
        self.files = [(f[0], f[1]) for f in files]
        self.table, self.labels = table, labels


def _checked_doc(data: bytes, where: str) -> dict:
    """The JSON of a manifest of this format and version whose checksum matches
    (the checksum key removed)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCacheError(f"{where}: not an edcache manifest")
    if doc.get("version") != VERSION:
        raise CorruptCacheError(f"{where}: format version {doc.get('version')!r}; expected {VERSION}")
    digest = doc.pop("xxh3", None)
    if digest != checksum(_canonical(doc)):
        raise CorruptCacheError(f"{where}: fails its checksum: the file is damaged or was edited by hand")
    return doc


def _valid_files(files: Any, expected: list[str]) -> TypeGuard[list[list[Any]]]:
    """Whether ``files`` is a list of [path, size] pairs, one per ``expected`` path in order."""
    return (
        isinstance(files, list)
        and [f[0] if isinstance(f, list) and len(f) == 2 else None for f in files] == expected
        and all(type(f[1]) is int and 0 <= f[1] < 2**48 for f in files)
    )


def _valid_table(table: Any) -> TypeGuard[dict[str, Any]]:
    """Whether ``table`` is a ``{"nbytes", "xxh3"}`` map with values in range."""
    return (
        isinstance(table, dict) and type(table.get("nbytes")) is int
        and 0 <= table["nbytes"] < 2**40 and isinstance(table.get("xxh3"), str)
    )


def _valid_labels(labels: Any, keys: list[Any]) -> TypeGuard[dict[str, dict[str, Any]]]:
    """Whether ``labels`` maps exactly the (stringified) ``keys`` to maps."""
    return (
        isinstance(labels, dict)
        and set(labels) == {str(k) for k in keys}
        and all(isinstance(v, dict) for v in labels.values())
    )


def _canonical(doc: dict) -> bytes:
    """The manifest text edcache writes for ``doc`` (keys sorted, one-space indent)."""
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def owned_files(schema: Schema, labels: dict | None = None) -> set[str]:
    """Relative paths of every file a cache of ``schema`` (and ``labels`` entries) uses."""
    keep = set(schema.files()) | {MANIFEST, COMMITS, TABLE}
    return keep | {e["file"] for e in (labels or {}).values() if isinstance(e.get("file"), str)}


def peek_version(cache_dir: str) -> int | None:
    """The format version a manifest declares (None if absent or unreadable)."""
    try:
        with open(os.path.join(cache_dir, MANIFEST), "rb") as f:
            # read what is there (f.read(n) would allocate n bytes first)
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                return None
            doc = json.loads(f.read(size))
        version = doc.get("version") if isinstance(doc, dict) else None
        return version if type(version) is int else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def read_manifest(cache_dir: str) -> Manifest:
    """Read ``manifest.json`` of ``cache_dir`` (``FileNotFoundError`` if absent)."""
    path = os.path.join(cache_dir, MANIFEST)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCacheError(f"{path}: {size} bytes is too large for a manifest")
        data = f.read(size + 1)
    return Manifest.from_bytes(data, path)


def write_manifest(cache_dir: str, manifest: Manifest) -> None:
    atomic_write(os.path.join(cache_dir, MANIFEST), manifest.to_bytes())
