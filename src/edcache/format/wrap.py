"""Wrapped values: ``torch.Tensor`` and ``PIL.Image.Image`` stored as numpy arrays.

A tensor or an image is turned into a numpy array (a copy owned by the cache) and a
*tag* that says how to turn the array back:

* ``torch:<dtype>`` -- a CPU tensor of that dtype (``torch:float32``, ``torch:bfloat16``,
  ...). bfloat16 has no numpy dtype: its bits are stored as ``<u2``.
* ``pil:<mode>`` -- a PIL image of that mode (``pil:RGB``, ``pil:I;16``, ...), stored as
  ``np.asarray(img)``. Palette images (mode ``P``) are converted to ``RGB`` (``RGBA``
  when they have transparency) on arrival: the palette is not kept.

Neither torch nor PIL is imported by edcache: a value is recognised only if its module
is already loaded (``sys.modules``), and reading a wrapped column imports torch/PIL
then (a cache of tensors needs torch to be read as tensors).

Tags are validated against the fixed sets :data:`TORCH_DTYPES` and :data:`PIL_MODES`;
anything else in a cache file is a :class:`~edcache.errors.CorruptCacheError`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

#: torch dtype name -> numpy dtype of the stored array
TORCH_DTYPES: dict[str, str] = {
    "bool": "|b1", "uint8": "|u1", "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8",
    "complex64": "<c8", "complex128": "<c16",
}
#: PIL mode -> numpy dtype of ``np.asarray(img)``
PIL_MODES: dict[str, str] = {
    "1": "|b1", "L": "|u1", "LA": "|u1", "RGB": "|u1", "RGBA": "|u1", "CMYK": "|u1",
    "YCbCr": "|u1", "LAB": "|u1", "HSV": "|u1", "I": "<i4", "I;16": "<u2", "F": "<f4",
}
#: what ``pil=`` may be: images come back as images, or as their pixel arrays
PIL_OPTIONS = ("image", "array")


def valid_tag(tag: Any) -> bool:
    if not isinstance(tag, str):
        return False
    family, _, name = tag.partition(":")
    return (family == "torch" and name in TORCH_DTYPES) or (family == "pil" and name in PIL_MODES)


def stored_dtype(tag: str) -> np.dtype:
    family, _, name = tag.partition(":")
    return np.dtype(TORCH_DTYPES[name] if family == "torch" else PIL_MODES[name])


def unwrap(value: Any) -> tuple[str, np.ndarray] | None:
    """``(tag, array)`` for a tensor or PIL image, else None. The array may share memory
    with the tensor: callers copy it (the chunk builder copies every array it keeps)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return tensor_to_array(value)
    image = sys.modules.get("PIL.Image")
    if image is not None and isinstance(value, image.Image):
        return image_to_array(value)
    return None


def tensor_to_array(t: Any) -> tuple[str, np.ndarray]:
    torch = sys.modules["torch"]
    name = str(t.dtype).rpartition(".")[2]
    if name not in TORCH_DTYPES:
        raise TypeError(f"a torch tensor of dtype {t.dtype}, which edcache does not store")
    if t.layout != torch.strided:
        raise TypeError(f"a torch tensor with layout {t.layout}; store t.to_dense()")
    t = t.detach().cpu().resolve_conj().resolve_neg()
    if name == "bfloat16":
        t = t.view(torch.uint16)
    return f"torch:{name}", t.numpy()


def image_to_array(img: Any) -> tuple[str, np.ndarray]:
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        mode = img.mode
    if mode not in PIL_MODES:
        raise TypeError(f"a PIL image of mode {mode!r}, which edcache does not store; convert it "
                        "(img.convert('RGB')) or store np.asarray(img)")
    arr = np.asarray(img)
    want = np.dtype(PIL_MODES[mode])
    if arr.dtype != want:
        arr = arr.astype(want)
    return f"pil:{mode}", arr


def wrapper(tag: str, pil: str = "image") -> Callable[[Any], Any]:
    """``array -> value`` for a tag: a tensor (a copy: never a view of a read-only
    memory map, which an in-place op would crash on), or a PIL image (``pil="image"``)
    or the array itself (``pil="array"``)."""
    family, _, name = tag.partition(":")
    if family == "torch":
        import torch

        from_numpy, array = torch.from_numpy, np.array
        if name == "bfloat16":
            bf16 = torch.bfloat16
            return lambda a: from_numpy(array(a)).view(bf16)
        return lambda a: from_numpy(array(a))
    if pil == "array":
        return lambda a: a
    from PIL import Image

    fromarray = Image.fromarray
    if name == "1":
        return lambda a: fromarray(np.ascontiguousarray(a, dtype=np.uint8) * np.uint8(255)).convert("1")
    if name in ("RGB", "RGBA", "L", "LA", "I", "F", "I;16"):
        # fromarray infers these modes from the array's shape and dtype
        def to_image(a: Any, _mode: str = name) -> Any:
            img = fromarray(np.ascontiguousarray(a))
            return img if img.mode == _mode else Image.frombytes(_mode, img.size, np.ascontiguousarray(a).tobytes())
        return to_image

    def to_image_bytes(a: Any, _mode: str = name) -> Any:
        a = np.ascontiguousarray(a)
        return Image.frombytes(_mode, (a.shape[1], a.shape[0]), a.tobytes())
    return to_image_bytes


def fixed_tensor_getter(tag: str, array: np.ndarray) -> Callable[[int], Any] | None:
    """``r -> tensor`` of row ``r`` of a fixed column ``array`` (rows of at least one
    dimension) holding tensors: one copy of the row, one ``torch.from_numpy`` (the
    cheapest safe path: the tensor owns its memory). None for other tags."""
    family, _, name = tag.partition(":")
    if family != "torch":
        return None
    import torch

    from_numpy = torch.from_numpy
    if name == "bfloat16":
        bf16 = torch.bfloat16
        return lambda r: from_numpy(array[r].copy()).view(bf16)
    return lambda r: from_numpy(array[r].copy())


def stack_wrapped(tag: str, batch: np.ndarray, pil: str = "image") -> Any:
    """A gathered batch (a new array, not a view of a map) of a wrapped column: one
    tensor for tensors, a list of images (or the array) for images."""
    family, _, name = tag.partition(":")
    if family == "torch":
        import torch

        t = torch.from_numpy(batch if batch.flags.writeable else batch.copy())
        return t.view(torch.bfloat16) if name == "bfloat16" else t
    if pil == "array":
        return batch
    conv = wrapper(tag, pil)
    return [conv(a) for a in batch]


def conversion_hint(value: Any) -> str | None:
    """How to make ``value`` storable, when there is a known way."""
    mod = type(value).__module__ or ""
    if mod.startswith("torch"):
        return "convert it with .numpy() (or .to_dense(), .float())"
    if mod.startswith("PIL"):
        return "convert it with np.asarray(img) or img.convert('RGB')"
    if mod.startswith(("jax", "tensorflow", "cupy")):
        return "convert it with np.asarray(value)"
    if hasattr(value, "__array__"):
        return "convert it with np.asarray(value)"
    if hasattr(value, "numpy") and callable(getattr(value, "numpy", None)):
        return "convert it with .numpy()"
    return None


class Tagged:
    """An array with its tag, handed to the codec (a mixed column stored as records)."""

    __slots__ = ("array", "tag")

    def __init__(self, tag: str, array: np.ndarray) -> None:
        self.tag, self.array = tag, array
