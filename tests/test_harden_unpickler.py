"""Issue 16 item 10: nothing the restricted unpickler admits may allocate or loop beyond
what the pickle's size justifies. Each hostile payload runs in a subprocess with a
timeout, so a regression fails instead of hanging the suite (Ctrl-C did not stop it)."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import edcache
from edcache.errors import CorruptCacheError
from edcache.format.legacy import safe_loads

SRC = os.path.dirname(os.path.dirname(os.path.abspath(edcache.__file__)))  # the edcache under test
TESTS = os.path.dirname(os.path.abspath(__file__))


class Reduce:
    """Pickles as ``func(*args)``: how a hostile file calls admitted globals."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def payloads() -> dict[str, bytes]:
    big = 10**15
    return {
        "deque_range": pickle.dumps(Reduce(collections.deque, (range(big), 0)), protocol=2),
        "bytearray_n": pickle.dumps(Reduce(bytearray, (10**13,)), protocol=2),
        "bytes_n": pickle.dumps({"x": Reduce(bytes, (10**12,))}, protocol=4),
        "list_range": pickle.dumps(Reduce(list, (range(big),)), protocol=3),
        "set_range": pickle.dumps(Reduce(frozenset, (range(10**10),)), protocol=4),
        "counter_range": pickle.dumps(Reduce(collections.Counter, (range(10**10),)), protocol=4),
        "void_n": pickle.dumps(Reduce(np.void, (10**12,)), protocol=4),
        "ndarray_huge": pickle.dumps(Reduce(np.ndarray, ((10**7, 10**7), np.uint8)), protocol=4),
        "float64_range": pickle.dumps(Reduce(np.float64, (range(10**10),)), protocol=4),
    }


def _amplified() -> bytes:
    """A list of 20000 items copied by ``tuple(...)`` 20000 times: 4e8 element copies
    from a pickle of ~80 KB (quadratic work through the memo)."""
    items = list(range(20000))  # pickled once, then referenced through the memo
    return pickle.dumps([Reduce(tuple, (items,)) for _ in range(20000)], protocol=4)


def run(name: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = f"""
        import sys, time
        sys.path.insert(0, {TESTS!r})
        from test_harden_unpickler import payloads, _amplified
        from edcache.format.legacy import safe_loads
        from edcache.errors import CorruptCacheError, UnsafePickleError
        data = _amplified() if {name!r} == "amplified" else payloads()[{name!r}]
        try:
            safe_loads(data, member="m:example_0.p")
        except (CorruptCacheError, UnsafePickleError) as exc:
            print(type(exc).__name__, len(data), exc)
        else:
            print("loaded")
        """
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_87_byte_payload_of_the_issue_is_small():
    assert len(payloads()["deque_range"]) < 100


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", sorted(payloads()) + ["amplified"])
def test_hostile_payload_is_refused_promptly(name):
    try:
        proc = run(name)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the unpickler hung")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CorruptCacheError"), proc.stdout + proc.stderr[-2000:]
    assert "m:example_0.p" in proc.stdout


@pytest.mark.timeout(200)
def test_hostile_member_in_a_zip_read_and_convert(tmp_path):
    src = tmp_path / "cached" / "evil.zip"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("example_0.p", payloads()["deque_range"])
        zf.writestr("labels.p", pickle.dumps({}))
    code = f"""
        from edcache import CachedDataset
        from edcache.convert import convert
        from edcache.errors import CorruptCacheError
        ds = CachedDataset.from_cache({str(tmp_path)!r}, "evil")
        for f in (lambda: ds[0], lambda: convert({str(src)!r}, {str(tmp_path / 'out')!r}, progress=False)):
            try:
                f()
            except CorruptCacheError as exc:
                print("corrupt")
        """
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=90, env=dict(os.environ, PYTHONPATH=SRC))
    except subprocess.TimeoutExpired:
        pytest.fail("reading or converting the hostile zip hung")
    assert proc.stdout.split() == ["corrupt", "corrupt"], proc.stderr[-2000:]


def test_legitimate_values_still_load():
    value = {
        "dd": collections.defaultdict(list, {"k": [1]}),
        "types": [np.float32, int, list],
        "r": range(2, 9, 3),
        "ba": bytearray(b"abc"),
        "arr": np.arange(1000, dtype=np.float64).reshape(10, 100),
        "s": {1, 2}, "fs": frozenset({b"x"}), "dq": collections.deque([1, 2], 5),
        "c": collections.Counter("abca"), "od": collections.OrderedDict(a=1),
    }
    for protocol in (2, 3, 4, 5):
        got = safe_loads(pickle.dumps(value, protocol=protocol), member="m")
        assert got["types"] == [np.float32, int, list]
        assert got["dd"].default_factory is list and got["dd"]["k"] == [1]
        assert got["r"] == range(2, 9, 3) and got["ba"] == bytearray(b"abc")
        np.testing.assert_array_equal(got["arr"], value["arr"])
        assert got["dq"] == value["dq"] and got["dq"].maxlen == 5
        assert got["c"] == value["c"] and got["od"] == value["od"]
        assert got["s"] == {1, 2} and got["fs"] == frozenset({b"x"})


def test_an_array_larger_than_its_pickle_is_refused():
    data = bytearray(pickle.dumps(np.zeros(4, np.uint8), protocol=2))
    # the same pickle claiming 10**12 elements: _reconstruct would allocate before the
    # size check of __setstate__
    forged = pickle.dumps(Reduce(np.ndarray, ((10**12,), np.uint8)), protocol=2)
    with pytest.raises(CorruptCacheError, match="far more memory"):
        safe_loads(forged, member="m")
    assert safe_loads(bytes(data), member="m").shape == (4,)
