"""Assertions shared by the core tests."""

from __future__ import annotations

import os

import numpy as np


def assert_same(a, b, path="example"):
    """Deep equality that also requires equal types (tuple vs list, np.int64 vs int ...)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{n}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and (a == b or (np.isnan(a) and np.isnan(b))), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def tree_bytes(path):
    """{relative path: bytes} of every file under ``path``."""
    out = {}
    for folder, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(folder, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out
