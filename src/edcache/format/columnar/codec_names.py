"""Codec strings of format v2 (``zstd:3``, ``lz4``, ``png``, ``jpeg:90``, ``webp:90``,
``webp:lossless``) and the ``codecs=`` argument: every codec string is parsed by
:func:`parse_codec`, every ``codecs=`` argument by :func:`normalize_codecs`. Nothing
here imports a codec library (see :mod:`.codecs` for encoding and decoding)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ...errors import CodecSpecError

#: the module each codec needs (imported on first use, by :mod:`.codecs`)
LIBRARIES = {"zstd": "zstandard", "lz4": "lz4.block", "png": "PIL.Image", "webp": "PIL.Image", "jpeg": "simplejpeg"}
_DEFAULT = {"zstd": 3, "jpeg": 90, "webp": 90}


@dataclass(frozen=True)
class Codec:
    """One parsed codec: ``name`` and its level or quality (``None``: lossless webp)."""

    name: str
    level: int | None = None

    @property
    def text(self) -> str:
        """The canonical spelling the schema records."""
        if self.name == "webp" and self.level is None:
            return "webp:lossless"
        return self.name if self.level is None else f"{self.name}:{self.level}"

    @property
    def lossless(self) -> bool:
        return self.name in ("zstd", "lz4", "png") or (self.name == "webp" and self.level is None)

    @property
    def image(self) -> bool:
        return self.name in ("png", "jpeg", "webp")


@lru_cache(maxsize=64)
def parse_codec(text: str) -> Codec:
    """Parse a codec string (``ValueError`` if it names no codec)."""
    if not isinstance(text, str):  # (ValueError: the callers turn it into their own error)
        raise ValueError(f"a codec is a str, got {type(text).__name__}")
    name, sep, arg = text.strip().lower().partition(":")
    if name not in LIBRARIES or (sep and not arg):
        raise ValueError(f"unknown codec {text!r}")
    if name in ("lz4", "png"):
        if sep:
            raise ValueError(f"codec {name!r} takes no parameter ({text!r})")
        return Codec(name)
    if name == "webp" and arg == "lossless":
        return Codec(name, None)
    level = _DEFAULT[name] if not sep else _int(arg, text)
    low, high = (1, 19) if name == "zstd" else (1, 100)
    if not low <= level <= high:
        raise ValueError(f"codec {text!r}: {'level' if name == 'zstd' else 'quality'} must be {low}..{high}")
    return Codec(name, level)


def _int(arg: str, text: str) -> int:
    if not arg.isdigit():
        raise ValueError(f"codec {text!r}: expected a number after ':'")
    return int(arg)


def is_lossy(text: str | None) -> bool:
    """Whether the column codec ``text`` loses information (jpeg, lossy webp)."""
    return text is not None and not parse_codec(text).lossless


def normalize_codecs(value: Any) -> list[list[Any]] | None:
    """The ``codecs=`` argument as the manifest records it: ``[[key, codec], …]`` with
    ``key`` null for a default applying to every other array column (``codecs="zstd"``),
    codecs in canonical spelling, ``raw`` entries kept (they exempt a field from the
    default). ``None`` or ``{}``: no codecs. Raises :class:`CodecSpecError`."""
    if value is None:
        return None
    if isinstance(value, str):
        items: list[tuple[Any, Any]] = [(None, value)]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise CodecSpecError(f"codecs must be a str or a dict {{field: codec}}, got {type(value).__name__}")
    out = []
    for key, text in items:
        if key is not None and type(key) not in (str, int):
            raise CodecSpecError(f"codecs: field {key!r} must be a str key or an int position")
        if not isinstance(text, str):
            raise CodecSpecError(f"codecs[{key!r}]: a codec is a str, got {type(text).__name__}")
        low = text.strip().lower()
        if low in ("raw", "none"):
            out.append([key, "raw"])
        elif low == "auto":
            out.append([key, "auto"])
        else:
            try:
                codec = parse_codec(low)
            except ValueError as exc:
                raise CodecSpecError(
                    f"codecs[{key!r}]: {exc}; known: raw, auto, zstd[:1-19], lz4, png, "
                    "jpeg[:1-100], webp[:1-100|lossless]"
                ) from None
            if key is None and not codec.lossless:
                raise CodecSpecError(
                    f"codecs={text!r}: a lossy codec is only used where a field names it "
                    f"(codecs={{'image': {text!r}}}); a default for every column must be lossless"
                )
            out.append([key, codec.text])
    return out or None


def valid_codecs_doc(doc: Any) -> bool:
    """Whether ``doc`` is a manifest's ``codecs`` entry (as :func:`normalize_codecs` makes)."""
    if doc is None:
        return True
    if not isinstance(doc, list) or not all(isinstance(p, list) and len(p) == 2 for p in doc):
        return False
    try:
        return normalize_codecs({p[0]: p[1] for p in doc}) == doc
    except (CodecSpecError, TypeError):  # (TypeError: an unhashable key)
        return False


def choice_for(codecs: list[list[Any]] | None, key: Any) -> tuple[str, bool] | None:
    """``(codec or "auto", explicit)`` for the column ``key``, or None (stored raw)."""
    if not codecs or key is None:
        return None
    default = None
    for k, text in codecs:
        if k is None:
            default = text
        elif k == key and type(k) is type(key):
            return None if text == "raw" else (text, True)
    return None if default in (None, "raw") else (default, False)
