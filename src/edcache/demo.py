"""A built-in demo dataset with real work per example: JPEG decode, resize, normalize.

On first use, :class:`DemoImages` writes a few thousand synthetic JPEG photos
(gradients, shapes and noise, 320x240, about 80 KB each) with Pillow into
``<root>/images``, on all cores. Each example decodes one file, resizes it to 64x64 and
normalizes it to float32 in [-1, 1]: the kind of preprocessing edcache exists to do
once. Everything the demo writes is under ``root`` (default ``~/.cache/edcache-demo``):
``rm -r`` it to remove the demo. Needs ``pip install edcache[demo]``.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import numpy as np

from .dataset import DatasetMixin

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "edcache-demo")
CLASSES = 10


def _synthetic_photo(i: int, rng: np.random.Generator) -> np.ndarray:
    h, w = 240, 320
    c = i % CLASSES
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    # each gradient varies along one line only: compute it there and broadcast
    diagonal = 128 + 100 * np.sin(np.arange(h + w, dtype=np.float32) / (30 + c))
    base = np.empty((h, w, 3), dtype=np.float32)
    base[..., 0] = 128 + 100 * np.sin(x / (20 + 3 * c) + i)
    base[..., 1] = 128 + 100 * np.cos(y / (15 + 2 * c) - i)
    base[..., 2] = diagonal[np.arange(h)[:, None] + np.arange(w)]
    cy, cx, r = rng.integers(40, 200), rng.integers(40, 280), rng.integers(15, 40)
    base[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = (255 * (c % 2), 25 * c, 255 - 25 * c)
    shift = int(rng.integers(0, _NOISE_ROWS - h))
    base += _noise()[shift : shift + h]  # sensor noise: a window of one field, not new per photo
    return np.clip(base, 0, 255).astype(np.uint8)


_NOISE_ROWS = 240 + 128
_NOISE: list[np.ndarray] = []


def _noise() -> np.ndarray:
    if not _NOISE:
        _NOISE.append(12 * np.random.default_rng(0).standard_normal((_NOISE_ROWS, 320, 3), dtype=np.float32))
    return _NOISE[0]


def _write_photo(job: tuple[str, int]) -> None:
    """Write demo photo ``i`` to ``path`` (atomically: a killed run leaves no torn JPEG)."""
    from PIL import Image

    path, i = job
    tmp = f"{path}.{os.getpid()}.part"
    Image.fromarray(_synthetic_photo(i, np.random.default_rng(i))).save(tmp, format="JPEG", quality=92)
    os.replace(tmp, path)


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
    workers : int or None
        Processes writing the JPEGs (``None`` = all cores, ``0`` = this process).
    """

    in_memory_keys: ClassVar[list[str]] = ["label", "split"]

    def __init__(self, root: str = DEFAULT_ROOT, n: int = 2000, size: int = 64, progress: bool = True,
                 workers: int | None = None) -> None:
        self.root = root
        self.n = n
        self.size = size
        self.progress = progress
        self.name = f"demo-{n}-{size}"
        self.image_dir = os.path.join(root, "images")
        self._ensure_images(workers)

    def _path(self, i: int) -> str:
        return os.path.join(self.image_dir, f"{i:06d}.jpg")

    def _ensure_images(self, workers: int | None = None) -> None:
        missing = [(self._path(i), i) for i in range(self.n) if not os.path.exists(self._path(i))]
        if not missing:
            return
        os.makedirs(self.image_dir, exist_ok=True)
        from tqdm.auto import tqdm

        from .building.coordinator import default_num_workers

        workers = default_num_workers() if workers is None else workers
        bar = tqdm(total=len(missing), desc="writing demo JPEGs", unit="img", disable=not self.progress)
        with bar:
            if workers <= 1 or len(missing) < 64:
                for job in missing:
                    _write_photo(job)
                    bar.update()
                return
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_photo, missing, chunksize=16):
                    bar.update()

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict[str, Any]:
        from PIL import Image

        bilinear = Image.BILINEAR  # type: ignore[attr-defined]  # (Pillow 9.0 has no Image.Resampling)
        with Image.open(self._path(i)) as im:
            small = im.convert("RGB").resize((self.size, self.size), bilinear)
            pixels = np.asarray(small, dtype=np.float32)
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
