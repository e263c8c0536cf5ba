"""The combine step of split-KV attention: per-split partial outputs and log2-sum-exps -> the exact output.

A split attention (``flash_attention`` and the paged decode attention, when the grid would not fill
the GPU) lets each program cover one share of the keys and write its normalised partial output with
the log2-sum-exp of its scores; this kernel weighs the shares by ``2^lse`` and sums them, which is
the softmax over all keys. A split that saw no key has ``lse = -inf`` and weight 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_power_of_2

__all__ = ["combine_splits"]


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, o_ptr, SQ, NQ,
    stride_pb, stride_ps, stride_ph, stride_pd, stride_psplit,
    stride_lb, stride_ls, stride_lh, stride_lsplit,
    stride_ob, stride_os, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    """o = sum_s w_s * part_s with w_s = 2^lse_s / sum 2^lse: the exact softmax over all splits."""
    row = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b = (bh // NQ).to(tl.int64)
    h = (bh % NQ).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLIT)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < SPLIT
    lse = tl.load(lse_ptr + b * stride_lb + row * stride_ls + h * stride_lh + offs_s * stride_lsplit,
                  mask=mask_s, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(lse - top)
    total = tl.sum(w, 0)
    w = w / tl.where(total > 0, total, 1.0)
    part = tl.load(
        part_ptr + b * stride_pb + row * stride_ps + h * stride_ph
        + offs_s[:, None] * stride_psplit + offs_d[None, :] * stride_pd,
        mask=mask_s[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0,
    )
    out = tl.sum(part * w[:, None], 0)
    tl.store(o_ptr + b * stride_ob + row * stride_os + h * stride_oh + offs_d * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)



def combine_splits(
    part: torch.Tensor, part_strides: tuple, lse: torch.Tensor, lse_strides: tuple, out: torch.Tensor,
    out_strides: tuple, *, rows: int, batch: int, heads: int, head_dim: int, split: int,
) -> torch.Tensor:
    """Write ``out`` from the fp32 partials indexed ``[batch, row, head, d, split]`` by ``part_strides``
    and their log2-sum-exps indexed ``[batch, row, head, split]`` by ``lse_strides``; ``out_strides``
    index ``out`` ``[batch, row, head, d]`` (a stride of 0 for a dimension of one)."""
    _combine_kernel[(rows, batch * heads)](
        part, lse, out, rows, heads, *part_strides, *lse_strides, *out_strides,
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), SPLIT=split,
        BLOCK_SPLIT=max(2, next_power_of_2(split)),
    )
    return out
