"""What a prompt handed to the runtime must be, checked once, before any layer runs."""

from __future__ import annotations

import torch

from ..ops.common import MASK_DTYPES, check_tensor

__all__ = ["check_prompt"]


def check_prompt(h, mask, batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device, *,
                 left_padding: bool) -> int:
    """``inputs_embeds`` ``h`` ``[batch, T, hidden_size]`` of ``dtype`` on ``device``, and its ``attention_mask``
    ``[batch, T]`` (or ``None``); with ``left_padding``, zeros then ones in every row. Returns ``T``."""
    check_tensor("inputs_embeds", h, dim=3, dtypes=(dtype,), device=device)
    if h.shape[0] == 0 or h.shape[1] == 0 or h.shape[2] != hidden_size:
        raise ValueError(f"inputs_embeds must be [batch >= 1, T >= 1, {hidden_size}], got {list(h.shape)}")
    if h.shape[0] != batch:
        raise ValueError(f"inputs_embeds has {h.shape[0]} rows, but {batch} sequences were given")
    if mask is not None:
        check_tensor("attention_mask", mask, dim=2, dtypes=MASK_DTYPES, device=device)
        if tuple(mask.shape) != tuple(h.shape[:2]):
            raise ValueError(f"attention_mask must be [{h.shape[0]}, {h.shape[1]}] like inputs_embeds, "
                             f"got {list(mask.shape)}")
        # Plan time: the one read-back of a prompt, before any layer runs (decode needs left padding).
        keep = mask != 0
        if left_padding and bool((keep[:, :-1] & ~keep[:, 1:]).any() | ~keep[:, -1].all()):
            raise ValueError("attention_mask must be left padding: zeros, then ones, with the last column all 1")
    return h.shape[1]
