"""Collating examples into a batch (as :meth:`CachedDataset.get_batch` returns it when the
format cannot gather the batch column-wise itself), and quieting torch's collate about
the read-only arrays of a cache."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

# torch's default collate calls torch.as_tensor on each example's arrays, which warns
# that our read-only memory-mapped arrays are not writable, once in every DataLoader
# worker of every epoch. It is safe to silence there only: the collate stacks those
# tensors into a new batch tensor (a copy), so no tensor it returns aliases the map.
# The filter matches that message raised from that module and nothing else.
_COLLATE_MESSAGE = "The given NumPy array is not writable"
_COLLATE_MODULE = r"torch\.utils\.data\._utils\.collate"


def quiet_collate_warning() -> None:
    """Install the filter above unless this process has it (called when a cache's reader opens)."""
    for action, message, category, module, _lineno in warnings.filters:
        if (action == "ignore" and category is UserWarning and message is not None
                and message.pattern == _COLLATE_MESSAGE
                and module is not None and module.pattern == _COLLATE_MODULE):
            return
    warnings.filterwarnings("ignore", message=_COLLATE_MESSAGE, category=UserWarning, module=_COLLATE_MODULE)


def collate_positions(examples: list) -> tuple[Any, ...]:
    """Tuple (or list) examples collated position by position, as :func:`collate` does
    per key; examples of different lengths keep only the common positions."""
    width = min(len(ex) for ex in examples)
    columns = collate([{n: ex[n] for n in range(width)} for ex in examples])
    return tuple(columns[n] for n in range(width))


def collate(examples: list[dict]) -> dict[Any, Any]:
    """Stack what stacks (arrays of one shape and dtype, numbers); lists otherwise."""
    batch: dict[str, Any] = {}
    for key in examples[0] if examples else ():
        values: list[Any] = [ex.get(key) for ex in examples]
        if all(isinstance(v, np.ndarray) for v in values) and len({(v.dtype, v.shape) for v in values}) == 1:
            batch[key] = np.stack(values)
        elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
            batch[key] = np.asarray(values)
        elif all(type(v) is bool for v in values):  # as a bool column gathers
            batch[key] = np.asarray(values, dtype=bool)
        else:
            batch[key] = values
    return batch
