"""Reading back the rows a build has committed, before the cache is complete: the
coordinator needs them to rewrite a promoted column and to write label files."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import CorruptCacheError
from .manifest import Schema
from .rows import map_columns


def open_views(cache_dir: str, schema: Schema, ends: dict[str, int], rows: int, allow_pickle: bool,
               only: list[int | None] | None = None) -> dict[int, Any]:
    """Column views of rows ``0 .. rows-1`` of each (or only some) column (files
    mapped up to ``ends``)."""
    wanted = [g for g in (only if only is not None else range(len(schema.columns))) if g is not None]
    return map_columns(cache_dir, schema, ends, rows, allow_pickle, wanted)[0]


def present_rows(schema: Schema, gid: int | None, views: dict, rows: range) -> list[int]:
    """The rows of ``rows`` whose layout includes column ``gid``."""
    if gid is None:
        return []
    has = [gid in lay.columns for lay in schema.layouts]
    if schema.layout_column is None:
        return list(rows) if has and has[0] else []
    lc = views[schema.layout_column].array
    ids = np.asarray(lc[rows.start:rows.stop])
    ok = np.asarray(has, dtype=bool)
    if ids.size and int(ids.max()) >= len(has):
        raise CorruptCacheError("layout column names a layout that does not exist")
    return (np.flatnonzero(ok[ids]) + rows.start).tolist()
