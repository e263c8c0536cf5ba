"""Weight layouts the kernels read fastest (plain torch: importing this needs no Triton)."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["prepare_column_gather", "stack_rows", "stacked_rows"]


def prepare_column_gather(w: torch.Tensor) -> torch.Tensor:
    """``w`` stored column-major: equal values and shape, gathered columns contiguous in memory.

    Make it once per model (it copies the weight); pass it wherever ``w`` goes.
    """
    return w.t().contiguous().t()


def stacked_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """What ``torch.cat(parts)`` would hold, as a view, when ``parts`` already lie stacked: row-major 2-D
    tensors of one dtype, one after another in one storage (the rows of one stacked tensor, in order).
    ``None`` otherwise, and always on the meta device, whose tensors have no addresses to compare."""
    first = parts[0]
    if first.is_meta or first.dim() != 2 or first.untyped_storage().data_ptr() == 0:
        return None
    offset = first.storage_offset()
    for part in parts:
        if (part.dim() != 2 or part.shape[1] != first.shape[1] or not part.is_contiguous()
                or part.dtype != first.dtype or part.device != first.device
                or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or part.storage_offset() != offset):
            return None
        offset += part.numel()
    rows = sum(part.shape[0] for part in parts)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))


def stack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts`` stacked by rows: a view when they already lie stacked (:func:`stacked_rows`), else a copy
    (``torch.cat``). Stacking the rows of a stacked tensor again so costs no memory."""
    stacked = stacked_rows(parts)
    return torch.cat(list(parts)) if stacked is None else stacked
