"""Issue 16 hardening of the safe codec: deep nesting (item 9) and values that cannot be
stored, named with index and key path (item 15)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading

import msgpack
import numpy as np
import pytest

from edcache import CachedDataset, DatasetMixin
from edcache.errors import CodecError, CorruptCacheError
from edcache.format.shards import codec
from edcache.format.shards.codec import EXT_TUPLE, MAX_TUPLE_DEPTH, Decoder
import itertools

from edcache.format.columnar import ColumnarReader
from helpers import assert_same

import edcache

SRC = os.path.dirname(os.path.dirname(os.path.abspath(edcache.__file__)))  # the edcache under test


def nested_tuple(depth, leaf=1):
    return functools.reduce(lambda x, _: (x,), range(depth), leaf)


class Make(DatasetMixin):
    def __init__(self, root, make, name="make", n=8):
        self.root, self.name, self.n, self.make = str(root), name, n, make

    def __len__(self):
        return self.n

    def get_example(self, i):
        return self.make(i)


def build(ds, workers=0, **kw):
    return CachedDataset(ds, chunk_size=2, num_workers=workers, progress=False, **kw)


_names = itertools.count()


class _Listed:
    def __init__(self, root, exs):
        self.root, self.name, self.exs = str(root), f"rt{next(_names)}", exs

    def __len__(self):
        return len(self.exs)

    def __getitem__(self, i):
        return self.exs[i]


def roundtrip(exs, tmp_path):
    """Cache ``exs`` (format v2) and read them back with verify=True."""
    ds = CachedDataset(_Listed(tmp_path, exs), chunk_size=2, num_workers=0, progress=False)
    reader = ColumnarReader(ds.path, verify=True)
    return [reader.read(r) for r in range(len(exs))]


def run_python(code, timeout=120):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


# -- item 9: deep nesting ------------------------------------------------------------------
def _deep_at_5(i):
    return {"i": i, "meta": {"t": nested_tuple(200) if i == 5 else (i,)}}


@pytest.mark.parametrize("workers", [0, 2])
def test_tuples_nested_too_deep_are_refused_with_index_and_key(tmp_path, workers):
    with pytest.raises(CodecError) as err:
        build(Make(tmp_path, _deep_at_5), workers=workers)
    msg = str(err.value)
    assert msg.startswith("example 5, key 'meta/t/0/0/0")
    assert f"tuples nested more than {MAX_TUPLE_DEPTH} deep" in msg


def test_lists_nested_too_deep_are_refused_with_index_and_key(tmp_path):
    deep = functools.reduce(lambda x, _: [x], range(2000), 1)
    with pytest.raises(CodecError, match=r"^example 3, key 'x/0/0/0.*nested more than 500 deep"):
        build(Make(tmp_path, lambda i: {"x": deep if i == 3 else [i]}))


def test_self_referential_list_is_a_codec_error(tmp_path):
    def make(i):
        loop = [1]
        if i == 4:
            loop.append(loop)
        return {"a": {"loop": loop}}

    with pytest.raises(CodecError, match=r"^example 4, key 'a/loop/1': cannot store a list that contains itself"):
        build(Make(tmp_path, make))


@pytest.mark.parametrize("depth", [1, 8, 9, 30, MAX_TUPLE_DEPTH])
def test_deep_tuples_within_the_limit_round_trip(tmp_path, depth):
    ex = {
        "t": nested_tuple(depth, leaf=np.arange(3)),
        "mix": [{"k": nested_tuple(depth, leaf="x")}, (1, [nested_tuple(depth - 1)])],
        "plain": (1, 2),
    }
    (got,) = roundtrip([ex], tmp_path)
    assert_same(got, ex)


def test_deep_tuples_decode_on_a_small_thread_stack(tmp_path):
    """Deep tuples are decoded in a loop, not on the C stack: 512 KiB threads suffice.
    (In a subprocess: a regression would be a segfault.)"""
    proc = run_python(f"""
        import sys, threading
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_harden_codec import nested_tuple, MAX_TUPLE_DEPTH
        from helpers import assert_same
        from test_harden_codec import roundtrip
        from edcache.format.columnar import ColumnarReader
        import pathlib
        ex = {{"t": nested_tuple(MAX_TUPLE_DEPTH), "u": [nested_tuple(50, leaf=i) for i in range(3)]}}
        roundtrip([ex], pathlib.Path({str(tmp_path)!r}))  # builds a cache under tmp_path
        import glob
        reader = ColumnarReader(glob.glob({str(tmp_path)!r} + "/cached/rt*")[0])
        out = []
        threading.stack_size(512 * 1024)
        t = threading.Thread(target=lambda: out.append(reader.read(0)))
        t.start()
        t.join()
        assert_same(out[0], ex)
        print("ok")
        """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def crafted_record(depth):
    """A record ``{"a": (((...1...)))}`` with tuples nested ``depth`` deep, built without
    recursion (what a hostile file can hold)."""
    payload = msgpack.packb([1])
    for _ in range(depth - 1):
        payload = msgpack.packb([msgpack.ExtType(EXT_TUPLE, payload)])
    return msgpack.packb({"a": msgpack.ExtType(EXT_TUPLE, payload)})


@pytest.mark.parametrize("depth", [MAX_TUPLE_DEPTH + 1, 300, 20000])
def test_crafted_deep_record_is_corrupt_not_a_crash(depth):
    proc = run_python(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_harden_codec import crafted_record
        from edcache.format.shards.codec import Decoder
        from edcache.errors import CorruptCacheError
        try:
            Decoder(b"", []).decode(crafted_record({depth}), 0)
        except CorruptCacheError as exc:
            print("corrupt:", exc)
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "corrupt:" in proc.stdout and "nested more than" in proc.stdout


def test_cache_written_with_deep_tuples_reads_and_verifies_without_crashing(tmp_path):
    """The scenario of the issue: a cache whose records hold tuples 200 deep (written here
    by lifting the writer's limit). Reads and ``edcache verify --deep`` report damage;
    before, they segfaulted."""
    root = str(tmp_path)
    proc = run_python(f"""
        import sys, functools
        sys.setrecursionlimit(20000)
        from edcache import CachedDataset, DatasetMixin
        from edcache.format.shards import codec
        codec.MAX_TUPLE_DEPTH = 10**6
        class D(DatasetMixin):
            root, name = {root!r}, "deep"
            def __len__(self): return 4
            def get_example(self, i):
                return {{"t": functools.reduce(lambda x, _: (x,), range(200), i)}}
        CachedDataset(D(), num_workers=0, progress=False)
        print("built")
        """)
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-2000:]
    proc = run_python(f"""
        from edcache import CachedDataset
        from edcache.errors import CorruptCacheError
        ds = CachedDataset.from_cache({root!r}, "deep")
        for read in (lambda: ds[0], lambda: ds.get_batch([1, 2]), lambda: ds[0:2]):
            try:
                read()
            except CorruptCacheError as exc:
                print("corrupt:", exc)
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("corrupt:") == 3
    cli = subprocess.run([sys.executable, "-m", "edcache.cli.main", "verify", "--deep",
                          os.path.join(root, "cached", "deep")], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=SRC))
    assert cli.returncode == 1, (cli.returncode, cli.stdout, cli.stderr[-2000:])


# -- item 15: values that cannot be stored -----------------------------------------------------
def test_lone_surrogate_names_index_and_key(tmp_path):
    bad = os.fsdecode(b"img_\xff.jpg")

    def make(i):
        return {"path": {"name": bad if i == 2 else f"img_{i}.jpg"}}

    with pytest.raises(CodecError) as err:
        build(Make(tmp_path, make))
    msg = str(err.value)
    assert msg.startswith("example 2, key 'path/name': cannot store a str that is not valid UTF-8")
    assert "os.fsencode" in msg


def test_lone_surrogate_in_a_dict_key_names_it(tmp_path):
    bad = os.fsdecode(b"\xfe")
    with pytest.raises(CodecError, match=r"^example 0, key 'm/.*not valid UTF-8"):
        build(Make(tmp_path, lambda i: {"m": {bad: 1}}))


def test_unstorable_value_message_unchanged(tmp_path):
    with pytest.raises(CodecError, match=r"^example 1, key 'x/1': cannot store value of type builtins.object"):
        build(Make(tmp_path, lambda i: {"x": [0, object() if i == 1 else 1]}))


def test_deep_value_error_reaches_the_coordinator_with_tblib_installed(tmp_path):
    """With tblib's exception pickling (installed by importing distributed), the chained
    error of a deep value could not be pickled and the pool worker died instead of
    reporting the CodecError (found by the full suite)."""
    tblib = pytest.importorskip("tblib.pickling_support")
    tblib.install()
    with pytest.raises(CodecError, match=r"^example 5, key 'meta/t/0"):
        build(Make(tmp_path, _deep_at_5), workers=2)
