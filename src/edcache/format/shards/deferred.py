"""Tuples nested too deep to decode inside msgpack's extension hook: the decoder leaves
them as :class:`_Deferred` placeholders and :func:`_resolve_deferred` expands them
afterwards, without recursion (see :class:`~.codec.Decoder`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _DecodeState:
    """Tuple nesting while one record is decoded: ``level`` tuples deep on the C stack
    (inside msgpack's hook), from ``base`` (the depth of the deferred tuple being
    expanded); ``deferred`` once a tuple was left for later."""

    __slots__ = ("base", "deferred", "level")

    def __init__(self) -> None:
        self.base = 0
        self.level = 0
        self.deferred = False


class _Deferred:
    """A tuple too deep to decode inside the hook: its payload and its nesting depth."""

    __slots__ = ("data", "depth")

    def __init__(self, data: bytes, depth: int) -> None:
        self.data = data
        self.depth = depth


def _resolve_deferred(root: Any, expand: Callable[[_Deferred], list]) -> Any:
    """``root`` with every :class:`_Deferred` replaced by the tuple of ``expand(it)``.

    Walks with an explicit stack (no recursion): the lists and dicts of a freshly
    decoded record are updated in place, tuples holding a replaced item are rebuilt.
    """
    stack = [_Frame("root", None, [root], None)]
    while True:
        frame = stack[-1]
        if frame.pos < len(frame.items):
            value = frame.items[frame.pos]
            kind = type(value)
            if kind is _Deferred:
                child = _Frame("tuple", None, expand(value), None)
                child.changed = True
                stack.append(child)
            elif kind is list:
                stack.append(_Frame("list", value, value, None))
            elif kind is dict:
                keys = list(value)
                child = _Frame("dict", value, list(value.values()), keys)
                if any(type(k) is _Deferred for k in keys):  # a deep tuple as a key
                    child.keys = [_resolve_deferred(k, expand) for k in keys]
                    child.changed = True
                stack.append(child)
            elif kind is tuple:
                stack.append(_Frame("tuple", value, list(value), None))
            else:
                frame.pos += 1
            continue
        stack.pop()
        if frame.kind == "root":
            return frame.items[0]
        result = frame.obj
        if frame.changed:
            if frame.kind == "tuple":
                result = tuple(frame.items)
            elif frame.kind == "dict":
                result.clear()
                result.update(zip(frame.keys or (), frame.items, strict=False))
        parent = stack[-1]
        if frame.changed:
            parent.items[parent.pos] = result
            parent.changed = True
        parent.pos += 1


class _Frame:
    __slots__ = ("changed", "items", "keys", "kind", "obj", "pos")

    def __init__(self, kind: str, obj: Any, items: list, keys: list | None) -> None:
        self.kind, self.obj, self.items, self.keys = kind, obj, items, keys
        self.pos = 0
        self.changed = False
