"""The floor: a Python list of the example dicts, in memory."""

from __future__ import annotations

from ..common import make_examples, raw_example_bytes, shape_n
from .base import Store


class MemoryStore(Store):
    name = "memory"
    label = "in-memory list (floor)"
    has_open = False  # nothing to open: open() regenerates the list

    def write(self, examples, n):
        self.data = list(examples)

    def open(self):
        self.data = make_examples(self.shape, shape_n(self.shape, self.quick))

    def read(self, i):
        return self.data[i]

    def nbytes(self):
        n = shape_n(self.shape, self.quick)
        return int(n * raw_example_bytes(self.shape, n))

    def data_files(self):
        return None

    def torch_dataset(self):
        return ListDataset(self.data)


class ListDataset:
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {**self.data[i], "index_": i}  # same fields as edcache's examples (see base.py)
