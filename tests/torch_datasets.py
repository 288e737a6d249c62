"""Plain PyTorch-style datasets for the issue-12 tests (importable by spawned workers)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_tensor(i: int, shape=(3, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.rand(shape, generator=g)


class TorchvisionStyle:
    """``(image_tensor, label)`` like torchvision's datasets: no root, no name."""

    in_memory_keys = (1,)

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return image_tensor(i), i % 7


class PilImages:
    """``(PIL image, label)``; modes cycle per dataset, sizes fixed."""

    def __init__(self, n: int = 24, mode: str = "RGB") -> None:
        self.n, self.mode = n, mode

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        img = Image.fromarray(rgb, "RGB")
        if self.mode == "RGBA":
            img = img.convert("RGBA")
        elif self.mode != "RGB":
            img = img.convert(self.mode)
        return img, i


class DictOfTensors:
    """edflow-style: root, name, dict examples whose values are tensors."""

    def __init__(self, root: str, n: int = 30) -> None:
        self.root, self.name, self.n = root, "dict_of_tensors", n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {
            "x": image_tensor(i, (4, 5)).half(),
            "y": torch.tensor(i, dtype=torch.int64),
            "mask": torch.arange(6) % (i % 3 + 1) == 0,
            "meta": {"boxes": torch.ones(i % 4, 4), "id": f"item{i}"},
        }


class ListNoLocation:
    """List examples, no root/name: a tensor of varying length and a str."""

    def __init__(self, n: int = 20) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return [torch.arange(i % 5 + 1, dtype=torch.int32), f"s{i}"]


CPU_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
]


class AllDtypes:
    """One tensor per CPU dtype, as a tuple; plus a 0-d tensor."""

    def __init__(self, n: int = 10) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        base = torch.arange(6, dtype=torch.float64).reshape(2, 3) + i
        out = []
        for dt in CPU_DTYPES:
            if dt is torch.bool:
                out.append(base.long() % 2 == 0)
            elif dt.is_complex:
                out.append(torch.complex(base, -base).to(dt))
            else:
                out.append(base.to(dt))
        out.append(torch.tensor(float(i)))
        return tuple(out)


class Versioned:
    """A dataset with an explicit cache_version."""

    cache_version = "1"

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((2,), float(i)), i


def scale_and_flip(example):
    """A read-time transform (picklable: module level): normalise a uint8/float image, flip it."""
    img, label = example
    img = img.float()
    return torch.flip(img, dims=[-1]) * 2.0, label


def add_one(example):
    img, label = example
    return img + 1, label


def list_collate(batch):
    return batch


def assert_same(cached, raw, path="example"):
    """``cached`` equals ``raw``: same types, tensors with the same dtype, shape and
    values, PIL images with the same mode, size and pixels (``index_`` of dicts aside)."""
    if isinstance(raw, torch.Tensor):
        assert isinstance(cached, torch.Tensor), (path, type(cached))
        assert cached.dtype == raw.dtype and cached.shape == raw.shape, (path, cached.dtype, cached.shape)
        assert torch.equal(cached, raw), path
    elif isinstance(raw, Image.Image):
        assert isinstance(cached, Image.Image), (path, type(cached))
        assert (cached.mode, cached.size) == (raw.mode, raw.size), path
        assert np.array_equal(np.asarray(cached), np.asarray(raw)), path
    elif isinstance(raw, dict):
        assert type(cached) is dict, (path, type(cached))
        assert set(cached) - {"index_"} == set(raw), path
        for k in raw:
            assert_same(cached[k], raw[k], f"{path}[{k!r}]")
    elif isinstance(raw, (list, tuple)):
        assert type(cached) is type(raw) and len(cached) == len(raw), (path, type(cached))
        for k, (c, r) in enumerate(zip(cached, raw)):
            assert_same(c, r, f"{path}[{k}]")
    elif isinstance(raw, np.ndarray):
        assert isinstance(cached, np.ndarray) and cached.dtype == raw.dtype and np.array_equal(cached, raw), path
    else:
        assert type(cached) is type(raw) and cached == raw, (path, cached, raw)
