"""A folder of pickle files, one per example (``{i:08d}.p``)."""

from __future__ import annotations

import os
import pickle

from .base import Store


class FolderStore(Store):
    name = "folder"
    label = "folder of pickles"

    def write(self, examples, n):
        d = self.path
        dumps = pickle.dumps
        for i, ex in enumerate(examples):
            with open(os.path.join(d, f"{i:08d}.p"), "wb") as fh:
                fh.write(dumps(ex, protocol=pickle.HIGHEST_PROTOCOL))

    def open(self):
        self._dir = self.path + os.sep

    def read(self, i):
        with open(f"{self._dir}{i:08d}.p", "rb") as fh:
            return pickle.loads(fh.read())
