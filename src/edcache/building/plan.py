"""Planning: which chunks of consecutive indices still have to be computed."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from ..format.base import ChunkTask


def plan_chunks(length: int, chunk_size: int, committed: AbstractSet[int] = frozenset()) -> list[ChunkTask]:
    """The chunks of ``range(length)`` not yet committed, in index order.

    Chunk ``c`` always covers ``c * chunk_size`` up to (not including)
    ``min((c + 1) * chunk_size, length)``: the split never depends on workers or timing.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tasks = []
    for chunk, start in enumerate(range(0, length, chunk_size)):
        if chunk not in committed:
            tasks.append(ChunkTask(chunk, start, min(start + chunk_size, length)))
    return tasks
