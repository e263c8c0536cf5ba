"""Weight layouts the kernels read fastest (plain torch: importing this needs no Triton)."""

import torch

__all__ = ["prepare_column_gather"]


def prepare_column_gather(w: torch.Tensor) -> torch.Tensor:
    """``w`` stored column-major: equal values and shape, gathered columns contiguous in memory.

    Make it once per model (it copies the weight); pass it wherever ``w`` goes.
    """
    return w.t().contiguous().t()
