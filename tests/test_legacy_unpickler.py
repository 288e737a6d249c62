"""The restricted unpickler: what it rebuilds, what it refuses, and that refusing means not running."""

from __future__ import annotations

import collections
import os
import pickle
import pickletools
from dataclasses import dataclass

import numpy as np
import pytest

from edcache.errors import CorruptCacheError, UnsafePickleError
from edcache.format.legacy import SAFE_GLOBALS, legacy_dumps, safe_loads
from legacy_writer import assert_same, edflow_dumps, edflow_example


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Point:
    x: int
    y: int


def _globals(data: bytes) -> set[str]:
    """Every global a pickle names (GLOBAL, and STACK_GLOBAL with memoized strings)."""
    names: set[str] = set()
    memo: dict[int, object] = {}
    stack: list[object] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
            stack.append(None)
        elif op.name == "STACK_GLOBAL":
            names.add(f"{stack[-2]}.{stack[-1]}")
            stack.append(None)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1] if stack else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo.get(arg))
        else:
            stack.append(arg if isinstance(arg, str) else None)
    return names


@pytest.mark.parametrize("protocol", [2, 3, 4])
@pytest.mark.parametrize("numpy1", [True, False], ids=["numpy1", "numpy2"])
def test_edflow_examples_round_trip(protocol, numpy1):
    for i in (0, 5):
        data = edflow_dumps(edflow_example(i), protocol, numpy1)
        assert ("numpy.core.multiarray._reconstruct" if numpy1 else
                "numpy._core.multiarray._reconstruct") in _globals(data)
        assert_same(safe_loads(data, member="m"), edflow_example(i))


VALUES = {
    "set": {1, 2, "a"},
    "frozenset": frozenset({b"x"}),
    "complex": 1 + 2j,
    "bytearray": bytearray(b"abc"),
    "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
    "defaultdict": collections.defaultdict(list, {"k": [1]}),
    "deque": collections.deque([1, 2]),
    "counter": collections.Counter("abca"),
    "range": range(2, 9, 3),
    "slice": slice(1, None, 2),
    "zero_d": np.array(3.5),
    "bools": np.array([True, False]),
    "strings": np.array(["ab", "c"]),
    "objects": np.array(["x", 1, None], dtype=object),
    "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
    "datetime": np.datetime64("2020-01-02"),
    "big_endian": np.arange(4, dtype=">u2"),
    "fortran": np.asfortranarray(np.ones((2, 3), np.float32)),
    "scalar_type": np.float32,
    "half": np.float16(1.5),
    "unicode_scalar": np.str_("ü"),
}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_builtin_containers_and_numpy_values_round_trip(protocol):
    data = pickle.dumps(VALUES, protocol=protocol)
    got, expected = safe_loads(data, member="m"), pickle.loads(data)  # what edflow got
    assert list(got) == list(VALUES)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape
            if value.dtype.kind == "O":
                assert got[key].tolist() == value.tolist()
            else:
                assert got[key].tobytes() == value.tobytes()
            assert got[key].flags.f_contiguous == value.flags.f_contiguous
        else:
            assert type(got[key]) is type(value) and got[key] == value, key


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_legacy_dumps_names_only_numpy1_globals(protocol):
    example = edflow_example(3)
    data = legacy_dumps(example, protocol)
    assert data[:2] == bytes([0x80, protocol])
    names = _globals(data)
    assert not any("_core" in n for n in names), names
    assert "numpy.core.multiarray._reconstruct" in names
    assert "numpy.core.multiarray.scalar" in names
    assert names <= SAFE_GLOBALS | {"numpy.float32", "__builtin__.bytes"}
    assert_same(safe_loads(data, member="m"), example)
    assert_same(pickle.loads(data), example)  # numpy 2 resolves the 1.x names too


def test_legacy_dumps_refuses_protocol_5():
    with pytest.raises(ValueError, match="protocol"):
        legacy_dumps({}, 5)


def test_malicious_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"image": np.zeros(2), "x": Payload(str(marker))}, protocol=4)
    with pytest.raises(UnsafePickleError) as info:
        safe_loads(data, member="faces.zip:example_7.p")
    message = str(info.value)
    system = f"{os.system.__module__}.system"  # posix.system on Linux
    assert "faces.zip:example_7.p" in message
    assert f"'{system}'" in message
    assert "allow_pickle=True" in message
    assert info.value.member == "faces.zip:example_7.p"
    assert info.value.global_name == system
    assert not marker.exists()
    # The payload is real: plain pickle would have run it.
    pickle.loads(data)
    assert marker.exists()


DANGEROUS = [
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("builtins", "open"), ("builtins", "type"), ("builtins", "object"), ("os", "system"),
    ("subprocess", "Popen"), ("copyreg", "_reconstructor"), ("numpy", "load"),
    ("numpy", "frombuffer"), ("numpy.core.multiarray", "frombuffer"), ("numpy.testing", "assert_equal"),
    ("collections", "namedtuple"), ("_codecs", "decode"), ("pickle", "loads"),
]


@pytest.mark.parametrize("module,name", DANGEROUS)
@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST"])
def test_every_other_global_is_refused(module, name, opcode):
    if opcode == "GLOBAL":
        data = f"c{module}\n{name}\n(S'x'\ntR.".encode()
    elif opcode == "INST":
        data = f"(S'x'\ni{module}\n{name}\n.".encode()
    else:
        data = pickle.PROTO + b"\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
        data += pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL + b"."
    with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
        safe_loads(data, member="m.p")


def test_allow_pickle_trusts_the_file():
    data = pickle.dumps({"p": Point(1, 2), "a": np.arange(2)})
    with pytest.raises(UnsafePickleError, match="Point"):
        safe_loads(data, member="m.p")
    got = safe_loads(data, member="m.p", allow_pickle=True)
    assert got["p"] == Point(1, 2) and got["a"].tolist() == [0, 1]


def test_allow_pickle_still_maps_numpy1_names():
    data = edflow_dumps({"a": np.arange(3)}, 4, numpy1=True)
    assert safe_loads(data, member="m.p", allow_pickle=True)["a"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("data", [b"", b"not a pickle", pickle.dumps({"a": 1})[:-3],
                                  pickle.dumps(np.arange(3), protocol=5, buffer_callback=lambda b: False)])
def test_broken_pickles_are_corrupt_cache_errors(data):
    with pytest.raises(CorruptCacheError, match="cache.zip:example_1.p"):
        safe_loads(data, member="cache.zip:example_1.p")
