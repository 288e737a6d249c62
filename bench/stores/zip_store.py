"""edflow-style zip of pickles: one ZIP_DEFLATED archive, members ``example_{i}.p``."""

from __future__ import annotations

import os
import pickle
import zipfile

from .base import Store


class ZipStore(Store):
    name = "zip"
    label = "edflow zip of pickles"

    @property
    def zpath(self):
        return os.path.join(self.path, "cached.zip")

    def write(self, examples, n):
        with zipfile.ZipFile(self.zpath, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, ex in enumerate(examples):
                zf.writestr(f"example_{i}.p", pickle.dumps(ex, protocol=pickle.HIGHEST_PROTOCOL))

    def open(self):
        self.zf = zipfile.ZipFile(self.zpath, "r")
        self._read = self.zf.read

    def read(self, i):
        return pickle.loads(self._read(f"example_{i}.p"))

    def close(self):
        try:
            self.zf.close()
        except Exception:
            pass
