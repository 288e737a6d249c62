"""``edcache verify PATH``: check every byte of a cache against its recorded checksums.

:func:`verify_cache` checks a cache directory of the default format completely:

* ``manifest.json`` parses, is valid, and is byte for byte what edcache writes for its
  content (an edited or damaged manifest shows up even where JSON still parses);
* ``shards.idx`` (complete caches) or ``commits.log`` (builds in progress) has the
  recorded size and checksum, the right shape, and canonical lines;
* ``packed.shard`` (complete caches whose chunks were packed into one file) and
  every committed shard exists, has the recorded size and xxh3-64 checksum, and its
  header, footer, offsets index and column table are consistent (``deep=True`` also
  decodes every record);
* every label column has the recorded size and checksum and loads with the recorded
  dtype and length.

Each problem names the damaged file and, for shards, the range of example indices it
holds: those are the examples a rebuild (``force_cache=True``) recomputes. Leftovers that
are not damage (temporary files of an interrupted build, uncommitted shards) are listed as
notes. For an edflow zip (``.zip``) every member's CRC-32 is checked; pickles are never
loaded. Nothing here imports or executes anything named by the files.
"""

from __future__ import annotations

import os
import sys
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import CacheNotFoundError

__all__ = ["Problem", "VerifyReport", "main_verify", "report_text", "verify_cache", "verify_command"]


@dataclass
class Problem:
    """One damaged file: its path relative to the cache, what is wrong, and the
    example indices ``start .. stop-1`` it holds (``None`` where not one range)."""

    file: str
    message: str
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.start is not None and self.stop is not None:
            where += f" (examples {self.start}..{self.stop - 1})"
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found. ``ok`` is True when nothing is damaged."""

    path: str
    format: str = "edcache"
    length: int | None = None
    complete: bool = False
    shards_total: int = 0
    shards_checked: int = 0
    bytes_checked: int = 0
    labels_checked: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_files(self) -> list[str]:
        return sorted({p.file for p in self.problems})

    @property
    def damaged_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every damaged shard, sorted."""
        return sorted({(p.start, p.stop) for p in self.problems if p.start is not None and p.stop is not None})

    def add(self, file: str, message: str, start: int | None = None, stop: int | None = None) -> None:
        self.problems.append(Problem(file, message, start, stop))

    def __str__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE (build in progress or interrupted)"
        lines = [f"edcache verify {self.path}"]
        size = f"{self.length} examples" if self.length is not None else "length unknown"
        lines.append(f"  format: {self.format}, {size}, {state}")
        lines.append(
            f"  checked: {self.shards_checked}/{self.shards_total} {'files' if self.format == 'edcache' else 'shards'} "
            f"({self.bytes_checked / 1e6:.1f} MB), {len(self.labels_checked)} label columns"
        )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.ok:
            lines.append("OK: no damage found")
        else:
            lines.append(f"DAMAGED: {len(self.problems)} problem(s)")
            lines.extend(f"  {p}" for p in self.problems)
            if self.damaged_ranges:
                ranges = ", ".join(f"{a}..{b - 1}" for a, b in self.damaged_ranges)
                lines.append(f"  examples affected: {ranges}")
            if self.format == "edcache":
                lines.append(
                    "  rebuild with CachedDataset(dataset, force_cache=True, keep_existing=False) "
                    "(CLI: --force --no-keep-existing)"
                )
            elif self.format == "edcache v1":
                lines.append(
                    "  rebuild the damaged parts with CachedDataset(dataset, force_cache=True) "
                    "after deleting the damaged files (or force_cache=True, keep_existing=False)"
                )
        return "\n".join(lines)


def verify_cache(path: str, *, deep: bool = False, allow_pickle: bool = False) -> VerifyReport:
    """Check the cache at ``path`` and return what was found (never raises for damage).

    Parameters
    ----------
    path : str
        A cache directory (``<root>/cached/<name>``) or an edflow ``.zip``.
    deep : bool
        Also decode every record of every shard (structure only; the checksum already
        covers every byte).
    allow_pickle : bool
        With ``deep``, decode records holding pickles (only for caches built with
        ``allow_pickle=True`` that you trust); otherwise such records count as fine
        as long as their checksum matches.

    Raises
    ------
    CacheNotFoundError
        If ``path`` holds no cache at all.
    """
    path = os.fspath(path)
    if path.endswith(".zip") and os.path.isfile(path):
        return _verify_zip(path)
    if not os.path.isdir(path):
        raise CacheNotFoundError(f"no cache at {path}")
    names = set(os.listdir(path))
    from .format.columnar.manifest import COLUMNS_DIR, TABLE
    from .format.shards.manifest import COMMITS, MANIFEST, SHARD_TABLE, SHARDS_DIR

    if MANIFEST not in names:
        if names & {COMMITS, SHARD_TABLE, SHARDS_DIR, COLUMNS_DIR, TABLE}:
            report = VerifyReport(path)
            report.add(MANIFEST, "is missing: the directory holds edcache files but no manifest")
            return report
        from .format.legacy import is_legacy_folder

        if is_legacy_folder(path):
            report = VerifyReport(path, format="edflow folder", complete=True)
            report.notes.append("edflow folder caches carry no checksums; nothing to verify")
            return report
        raise CacheNotFoundError(f"no edcache cache at {path} (no manifest.json)")
    from .format.columnar.manifest import peek_version

    if peek_version(path) == 1:
        from .format.shards.check import check_cache as check_v1

        report = VerifyReport(path, format="edcache v1")
        check_v1(path, report, deep, allow_pickle)
        return report
    from .format.columnar.check import check_cache

    report = VerifyReport(path)
    check_cache(path, report, deep, allow_pickle)
    return report


def _verify_zip(path: str) -> VerifyReport:
    """CRC-check every member of an edflow zip without unpickling anything."""
    from .format.legacy.zip_reader import example_index

    report = VerifyReport(path, format="edflow zip", complete=True)
    name = os.path.basename(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        report.add(name, f"is not a readable zip ({exc}); an interrupted edflow build leaves a zip "
                         "without central directory: edcache convert salvages its complete members")
        return report
    indices: set[int] = set()
    with zf:
        infos = zf.infolist()
        report.shards_total = len(infos)
        for info in infos:
            start = example_index(info.filename)
            if start is not None:
                indices.add(start)
            try:
                with zf.open(info) as member:
                    while member.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
                    NotImplementedError) as exc:
                report.add(f"{name}:{info.filename}", f"is damaged ({type(exc).__name__}: {exc})",
                           start, None if start is None else start + 1)
                continue
            report.shards_checked += 1
            report.bytes_checked += info.compress_size
    report.length = len(indices)
    if indices and indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        report.add(name, f"examples missing from the zip: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return report


def report_text(report: VerifyReport, deep: bool) -> str:
    """The report as ``edcache verify`` prints it: with a line on how deep records were checked."""
    lines = str(report).splitlines()
    if report.format == "edcache":
        depth = ("records: every record decoded (--deep)" if deep
                 else "records: checksums only (--deep also decodes every record)")
    elif report.format == "edflow zip":  # nothing is unpickled to verify a zip
        depth = "records: each member's CRC-32 checked" + (" (--deep adds nothing for a zip)" if deep else "")
    else:
        depth = ""
    if depth:
        lines.insert(min(3, len(lines)), f"  {depth}")
    return "\n".join(lines)


def verify_command(path: str, *, deep: bool = False, allow_pickle: bool = False) -> int:
    """``edcache verify``: print the report; the exit status is 0 if the cache is intact,
    1 if it is damaged, 2 if there is no cache at ``path``."""
    from .cli.exits import Exit, fail, hint

    try:
        report = verify_cache(path, deep=deep, allow_pickle=allow_pickle)
    except CacheNotFoundError as exc:
        return fail(f"{exc}{hint(exc)}", Exit.USAGE)
    print(report_text(report, deep))
    return Exit.OK if report.ok else Exit.FAILED


def main_verify(argv: Sequence[str] | None = None) -> int:
    """``edcache verify PATH [--deep] [--allow-pickle]`` on its own (the same parser and
    statuses as the ``edcache`` command)."""
    from .cli.parser import build_parser

    args = build_parser().parse_args(["verify", *(sys.argv[1:] if argv is None else argv)])
    return int(verify_command(args.path, deep=args.deep, allow_pickle=args.allow_pickle))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_verify())
