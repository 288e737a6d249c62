"""Writes caches exactly as edflow 0.4.0 did, for the legacy tests.

Deliberately independent of ``edcache.format.legacy``: it emulates edflow's writer
(``ZipFile(path, "a", ZIP_DEFLATED)`` + ``writestr`` of ``pickle.dumps(example)`` in the
workers' arrival order, then ``labels.p``) and numpy 1.x's pickles.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile

import numpy as np

from helpers import assert_same  # noqa: F401  (re-exported for the legacy tests)

IN_MEMORY_KEYS = ["label", "split", "score"]


def edflow_example(i: int) -> dict:
    """An example as an edflow ``DatasetMixin`` returned it (``index_`` is ``numpy.int64``)."""
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 255, (4, 5, 3), dtype=np.uint8),
        "feature": rng.standard_normal(3).astype(np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3) + i),
        "label": i % 3,
        "split": "train" if i % 4 else "val",
        "score": float(i) / 7,
        "name": f"img_{i:04d}",
        "meta": {"nested": {"ids": [i, i + 1], "pair": (i, str(i))}, "weight": np.float64(i),
                 "flag": np.bool_(i % 2), "raw": b"\x00\x01" * (i % 3)},
        "index_": np.int64(i),
    }


def _rename_numpy_core(data: bytes, protocol: int) -> bytes:
    """Rewrite a numpy-2 pickle so its globals read ``numpy.core...`` as numpy 1.x writes."""
    if protocol < 4:  # GLOBAL opcodes: newline-terminated text, no lengths to fix
        return data.replace(b"cnumpy._core.", b"cnumpy.core.")
    # Protocol 4: drop the (optional) FRAME opcodes, whose lengths would change, then
    # rewrite the length-prefixed module names.
    out, last = bytearray(), 0
    for op, _, pos in pickletools.genops(data):
        if op.name == "FRAME":
            out += data[last:pos]
            last = pos + 9
    out += data[last:]
    for sub in ("multiarray", "numeric"):
        new, old = f"numpy.core.{sub}".encode(), f"numpy._core.{sub}".encode()
        out = out.replace(b"\x8c" + bytes([len(old)]) + old, b"\x8c" + bytes([len(new)]) + new)
    return bytes(out)


def edflow_dumps(obj, protocol: int = 4, numpy1: bool = True) -> bytes:
    """``pickle.dumps(obj)`` as edflow did it, optionally as numpy 1.x would have named things."""
    data = pickle.dumps(obj, protocol=protocol)
    if numpy1:
        data = _rename_numpy_core(data, protocol)
        assert b"numpy._core" not in data
    return data


def arrival_order(indices: list[int], chunk_size: int, workers: int = 2) -> list[int]:
    """The order edflow's queue received examples: workers take chunks in turn and interleave."""
    chunks = [indices[i : i + chunk_size] for i in range(0, len(indices), chunk_size)]
    order: list[int] = []
    for r in range(0, len(chunks), workers):
        running = chunks[r : r + workers]
        for k in range(max(len(c) for c in running)):
            order += [c[k] for c in running if k < len(c)]
    return order


def edflow_view(i: int) -> dict:
    """What edflow's ``ds[i]`` returns: the stored example with ``index_`` set to ``i``."""
    example = edflow_example(i)
    example["index_"] = i
    return example


def edflow_labels(n: int, keys: list[str]) -> dict:
    return {k: [edflow_example(i)[k] for i in range(n)] for k in keys}


def edflow_run(path: str, n: int, keys: list[str] | None = None, *, chunk_size: int = 12,
               workers: int = 2, protocol: int = 4, numpy1: bool = True,
               stop_after: int | None = None) -> list[int]:
    """One ``cache_dataset`` run of edflow 0.4 on a dataset of ``n`` examples.

    Appends the examples missing from ``path`` in arrival order, then ``labels.p``.
    ``stop_after=k`` emulates a KeyboardInterrupt after ``k`` examples: the ``with``
    block closes the zip (valid, fewer examples, no new ``labels.p``). Returns the
    order the examples were written in.
    """
    keys = IN_MEMORY_KEYS if keys is None else keys
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        present = set(zf.namelist())
        todo = [i for i in range(n) if f"example_{i}.p" not in present]
        order = arrival_order(todo, chunk_size, workers)
        for k, i in enumerate(order):
            if stop_after is not None and k == stop_after:
                return order[:k]
            zf.writestr(f"example_{i}.p", edflow_dumps(edflow_example(i), protocol, numpy1))
        with warnings.catch_warnings():  # a second run appends a second labels.p, as edflow did
            warnings.simplefilter("ignore", UserWarning)
            zf.writestr("labels.p", edflow_dumps(edflow_labels(n, keys), protocol, numpy1))
    return order


def cut_central_directory(path: str, *, partial_last_member: bool = False) -> None:
    """Make ``path`` look like the zip of a writer killed by SIGKILL: no central directory.

    With ``partial_last_member`` the last member is cut mid-data and its local header
    has the zero CRC and sizes ``zipfile`` writes before the data (the state while a
    ``writestr`` is in progress).
    """
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        end = zf.start_dir
    last = infos[-1]
    with open(path, "r+b") as f:
        if partial_last_member:
            f.seek(last.header_offset + 14)
            f.write(b"\x00" * 12)  # crc32, compressed size, uncompressed size
            end = last.header_offset + 30 + len(last.filename.encode()) + last.compress_size // 2
        f.truncate(end)


def write_edflow_folder(folder: str, n: int, keys: list[str] | None = None, *, labels: bool = True,
                        protocol: int = 4) -> None:
    """A zip cache extracted by hand: ``example_{i}.p`` files plus ``labels.p``."""
    keys = IN_MEMORY_KEYS if keys is None else keys
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"example_{i}.p"), "wb") as f:
            f.write(edflow_dumps(edflow_example(i), protocol))
    if labels:
        with open(os.path.join(folder, "labels.p"), "wb") as f:
            f.write(edflow_dumps(edflow_labels(n, keys), protocol))


def write_cachable(path: str, n: int, args: tuple = (), kwargs: dict | None = None) -> None:
    """What ``@cachable(path)`` left: the zip, ``path + ".p"`` and ``path + "parameters.p"``."""
    edflow_run(path, n)
    with open(path + "parameters.p", "wb") as f:
        f.write(pickle.dumps((args, kwargs or {})))
    with open(path + ".p", "wb") as f:
        f.write(pickle.dumps(n))


def edflow_read(path: str) -> tuple[list, dict]:
    """What edflow 0.4's ``from_cache`` does with a zip: ``pickle.loads`` of the members.

    Returns the examples (index order, ``len`` = number of ``example_*`` members) and the
    labels (the last ``labels.p``).
    """
    with zipfile.ZipFile(path) as zf:
        n = len([name for name in zf.namelist() if name.startswith("example_")])
        examples = [pickle.loads(zf.read(f"example_{i}.p")) for i in range(n)]
        labels = pickle.loads(zf.read("labels.p"))
    return examples, labels


class EdflowLikeDataset:
    """A dataset to cache: ``edflow_example(i)`` without ``index_`` (``__getitem__`` adds it).

    ``kill_at`` SIGKILLs the process when that index is computed (a crash mid-build);
    ``calls`` records the indices computed in this process.
    """

    def __init__(self, root: str, name: str, n: int, keys: list[str] | None = None,
                 kill_at: int | None = None) -> None:
        self.root, self.name, self.n = root, name, n
        self.in_memory_keys = IN_MEMORY_KEYS if keys is None else keys
        self.kill_at = kill_at
        self.calls: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.kill_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        self.calls.append(i)
        example = edflow_example(i)
        example["index_"] = i
        return example
