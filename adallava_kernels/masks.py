"""Which keys a query sees, and at which position a token sits: the one rule for every path.

A padding mask is ``[batch, kv_len]``, nonzero where a position holds a token (transformers' 2-D
``attention_mask``). Queries are the last ``q_len`` of ``kv_len`` positions and see the keys at or
before their own position that are not padding. Hidden keys get the dtype's minimum in an additive
mask (finite, as transformers, so a query that sees nothing averages instead of giving NaN).
"""

from __future__ import annotations

import torch

__all__ = ["additive_mask", "causal_mask", "causal_visible", "positions", "visible_positions_mask"]


def positions(padding: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' ``generate`` derives them: the tokens before each one."""
    return (padding.long().cumsum(-1) - 1).clamp(min=0)


def causal_visible(
    batch: int, q_len: int, kv_len: int, padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``[batch, 1, q_len, kv_len]`` bool: key ``j`` is visible to query ``i`` (at ``kv_len - q_len + i``)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos
    allowed = allowed.expand(batch, 1, q_len, kv_len)
    if padding is not None:
        allowed = allowed & (padding != 0)[:, None, None, :]
    return allowed


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def causal_mask(padding: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, 1, q_len, kv_len]`` additive causal-and-padding mask of the padding mask ``[batch, kv_len]``."""
    batch, kv_len = padding.shape
    return additive_mask(causal_visible(batch, q_len, kv_len, padding, padding.device), dtype)


def visible_positions_mask(lengths: torch.Tensor, starts: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[batch, 1, 1, width]`` mask of one decode query per sequence: 0 on positions
    ``[starts, lengths)`` (``starts``: the left padding), the minimum elsewhere, so positions never
    written (zeros, or another sequence's stale data) get exactly zero weight."""
    at = torch.arange(width, device=lengths.device)
    visible = (at >= starts[:, None]) & (at < lengths[:, None])
    return additive_mask(visible, dtype)[:, None, None, :]
