"""``commits.log`` of a format-v2 build: the one place its records are written and parsed.

One JSON object per line, each with ``"x"``: the xxh3 of the line written without it
(a line that fails it is not a record). In this order:

* the **header** (first line): ``{"build": <random hex>, <build parameters>}``; a
  different ``build`` means the cache was started over (readers of the old build stop);
* a **schema** record whenever columns or layouts change:
  ``{"schema": {...}, "segments": {file: [[end, xxh3], ... one per chunk so far]}}``
  (``segments`` lists the files the change created or rewrote);
* a **chunk** record per committed chunk, in index order:
  ``{"c": chunk, "e": [end of each file], "h": [xxh3 of what the chunk appended]}``,
  files in schema order. **This line is the commit.**

A torn last line (no newline) is ignored; a resumed build terminates it, and replays
skip any line that is not a valid record (counted in :attr:`LogState.invalid`; chunk
records after a lost one are counted in :attr:`LogState.orphans`: their work is lost).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ...errors import CorruptCacheError
from ..fsutil import atomic_write, fsync_dir
from .files import open_fd, open_regular
from .manifest import COMMITS, Manifest, Schema

#: (end offset, xxh3 as int) of one chunk's bytes in one file
Segment = tuple[int, int]


@dataclass
class LogState:
    """What a commit log says: the build, its schema and every committed chunk."""

    build: str
    params: dict[str, Any]
    schema: Schema = field(default_factory=Schema)
    #: per file: one (end, xxh3) per committed chunk
    segments: dict[str, list[Segment]] = field(default_factory=dict)
    committed: int = 0
    #: bytes of the log that were parsed (a reader continues from here)
    offset: int = 0
    #: lines that are not valid records (damaged, or torn and terminated by a resume)
    invalid: int = 0
    #: chunk records skipped because an earlier one was invalid (their work is lost)
    orphans: int = 0

    def ends(self) -> dict[str, int]:
        """Committed size of every file of the schema."""
        return {f: (segs[self.committed - 1][0] if self.committed else 0)
                for f, segs in self.segments.items() if f in set(self.schema.files())}


def header_record(build: str, manifest: Manifest) -> bytes:
    return _line({"build": build, **manifest.build_params()})


def schema_record(schema: Schema, segments: dict[str, list[Segment]]) -> bytes:
    return _line({"schema": schema.to_json(),
                  "segments": {f: [[e, f"{h:016x}"] for e, h in segs] for f, segs in segments.items()}})


def chunk_record(chunk: int, ends: list[int], hashes: list[int]) -> bytes:
    return _line({"c": chunk, "e": ends, "h": [f"{h:016x}" for h in hashes]})


def _line(doc: dict) -> bytes:
    """One record: compact JSON with ``"x"``, the xxh3 of the line written without it."""
    body = json.dumps(doc, separators=(",", ":"))
    return json.dumps({**doc, "x": xxhash.xxh3_64_hexdigest(body.encode())}, separators=(",", ":")).encode() + b"\n"


def _parse(line: bytes) -> dict | None:
    """The record of one line, or None if it is not valid JSON or fails its checksum."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    digest = rec.pop("x", None)
    if digest != xxhash.xxh3_64_hexdigest(json.dumps(rec, separators=(",", ":")).encode()):
        return None
    return rec


def read_log(cache_dir: str, state: LogState | None = None) -> LogState | None:
    """Replay ``commits.log`` (None if absent or without a valid header).

    With ``state`` (an earlier replay of the same file), only the bytes appended
    since are parsed; a log of another build returns a fresh state.
    """
    path = os.path.join(cache_dir, COMMITS)
    try:
        fd = open_fd(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if state is not None:
            first = f.readline()
            if not first.endswith(b"\n") or _build_of(first) != state.build:
                state = None
            else:
                f.seek(state.offset)
        data = f.read()
    if state is None:
        first, sep, _ = data.partition(b"\n")
        if not sep:
            return None
        head = _parse(first)
        if head is None or not isinstance(head.get("build"), str):
            return None
        params = {k: v for k, v in head.items() if k != "build"}
        state = LogState(head["build"], params, offset=len(first) + 1)
        data = data[len(first) + 1:]
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:  # a torn (or still being written) last line: not committed
            break
        if not _apply(state, data[pos:nl], path):  # an invalid line (a torn one, terminated) is skipped
            state.invalid += 1
        pos = nl + 1
    state.offset += pos
    return state


def _build_of(line: bytes) -> str | None:
    head = _parse(line)
    return head.get("build") if head is not None else None


def _apply(state: LogState, line: bytes, where: str) -> bool:
    """Apply one record; False if it is not valid."""
    rec = _parse(line)
    if rec is None:
        return False
    if "schema" in rec:
        return _apply_schema(state, rec, where)
    return _apply_chunk(state, rec)


def _apply_schema(state: LogState, rec: dict, where: str) -> bool:
    """A schema record: the new schema, with the segments of the files it creates."""
    try:
        schema = Schema.from_json(rec["schema"], where)
    except CorruptCacheError:
        return False
    segs = rec.get("segments")
    if not isinstance(segs, dict):
        return False
    new: dict[str, list[Segment]] = {}
    for f, lst in segs.items():
        parsed = _segments(lst)
        if parsed is None or len(parsed) != state.committed:
            return False
        new[f] = parsed
    files = schema.files()
    if any(f not in new and f not in state.segments for f in files):
        return False
    state.schema = schema
    state.segments = {f: (new[f] if f in new else state.segments[f]) for f in files}
    return True


def _apply_chunk(state: LogState, rec: dict) -> bool:
    """A chunk record: the commit of chunk ``state.committed`` (ends never go back)."""
    chunk, ends, hashes = rec.get("c"), rec.get("e"), rec.get("h")
    files = state.schema.files()
    if type(chunk) is int and chunk > state.committed:
        state.orphans += 1  # an earlier commit record is damaged: this chunk cannot count
        return True
    if chunk != state.committed or not isinstance(ends, list) or not isinstance(hashes, list) \
            or len(ends) != len(files) or len(hashes) != len(files):
        return False
    parsed = _segments(list(map(list, zip(ends, hashes, strict=True))))
    if parsed is None:
        return False
    pairs = list(zip(files, parsed, strict=True))
    if any(seg[0] < (state.segments[f][-1][0] if state.segments[f] else 0) for f, seg in pairs):
        return False
    for f, seg in pairs:
        state.segments[f].append(seg)
    state.committed += 1
    return True


def _segments(lst: Any) -> list[Segment] | None:
    if not isinstance(lst, list):
        return None
    out = []
    for item in lst:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] >= 0
                and isinstance(item[1], str) and len(item[1]) == 16):
            return None
        try:
            out.append((item[0], int(item[1], 16)))
        except ValueError:
            return None
    return out


class CommitLog:
    """Appends records to ``commits.log`` (one ``write`` each; :meth:`sync` makes them durable)."""

    def __init__(self, cache_dir: str) -> None:
        path = os.path.join(cache_dir, COMMITS)
        self._fd = open_fd(path, os.O_WRONLY | os.O_APPEND)
        size = os.fstat(self._fd).st_size
        if size:
            with open_regular(path) as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")  # terminate a torn last line

    @staticmethod
    def create(cache_dir: str, manifest: Manifest) -> str:
        """Start the log of a new build (atomically); returns the build's id."""
        build = secrets.token_hex(8)
        atomic_write(os.path.join(cache_dir, COMMITS), header_record(build, manifest))
        fsync_dir(cache_dir)
        return build

    def append(self, record: bytes) -> None:
        os.write(self._fd, record)

    def sync(self) -> None:
        os.fsync(self._fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
