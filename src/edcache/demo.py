"""A built-in demo dataset with real work per example: JPEG decode, resize, normalize.

On first use, :class:`DemoImages` writes a few thousand synthetic JPEG photos
(gradients, shapes and noise, 320x240) with Pillow into ``<root>/images``. Each
example decodes one file, resizes it to 64x64 and normalizes it to float32 in [-1, 1]:
the kind of preprocessing edcache exists to do once. Needs ``pip install edcache[demo]``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from .dataset import DatasetMixin

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "edcache-demo")
CLASSES = 10


def _synthetic_photo(i: int, rng: np.random.Generator) -> np.ndarray:
    h, w = 240, 320
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = i % CLASSES
    base = np.stack(
        [
            128 + 100 * np.sin(x / (20 + 3 * c) + i),
            128 + 100 * np.cos(y / (15 + 2 * c) - i),
            128 + 100 * np.sin((x + y) / (30 + c)),
        ],
        axis=-1,
    )
    cy, cx, r = rng.integers(40, 200), rng.integers(40, 280), rng.integers(15, 40)
    base[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = (255 * (c % 2), 25 * c, 255 - 25 * c)
    base += rng.normal(0, 12, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


class DemoImages(DatasetMixin):
    """Synthetic JPEG photos, decoded and resized per example.

    Parameters
    ----------
    root : str
        Folder for the images (``<root>/images``) and the cache (``<root>/cached``).
    n : int
        Number of images.
    size : int
        Side of the square output images.
    progress : bool
        Show a progress bar while the JPEGs are written (the first time only).
    """

    in_memory_keys = ["label", "split"]

    def __init__(self, root: str = DEFAULT_ROOT, n: int = 2000, size: int = 64, progress: bool = True) -> None:
        self.root = root
        self.n = n
        self.size = size
        self.progress = progress
        self.name = f"demo-{n}-{size}"
        self.image_dir = os.path.join(root, "images")
        self._ensure_images()

    def _path(self, i: int) -> str:
        return os.path.join(self.image_dir, f"{i:06d}.jpg")

    def _ensure_images(self) -> None:
        from PIL import Image

        missing = [i for i in range(self.n) if not os.path.exists(self._path(i))]
        if not missing:
            return
        os.makedirs(self.image_dir, exist_ok=True)
        from tqdm.auto import tqdm

        for i in tqdm(missing, desc="writing demo JPEGs", unit="img", disable=not self.progress):
            rng = np.random.default_rng(i)
            tmp = self._path(i) + ".part"
            Image.fromarray(_synthetic_photo(i, rng)).save(tmp, format="JPEG", quality=92)
            os.replace(tmp, self._path(i))

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict[str, Any]:
        from PIL import Image

        with Image.open(self._path(i)) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            pixels = np.asarray(im, dtype=np.float32)
        return {
            "image": pixels / 127.5 - 1.0,
            "label": i % CLASSES,
            "split": "train" if i % 5 else "validation",
            "file": os.path.basename(self._path(i)),
        }


def make_demo() -> DemoImages:
    """Factory for ``edcache --dataset edcache.demo.make_demo``."""
    return DemoImages()


def read_throughput(dataset: Any, n: int, seed: int = 0) -> float:
    """Examples per second for ``n`` random reads of ``dataset`` (touching every array)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(dataset), n)
    start = time.perf_counter()
    for i in indices:
        float(dataset[int(i)]["image"].sum())
    return n / (time.perf_counter() - start)
