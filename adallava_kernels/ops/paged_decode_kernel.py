"""Triton kernel of the paged decode attention (see ``paged_attention``): one program per (sequence,
head, split) streams its pages with an online softmax; the splits meet in ``split_combine``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_combine import combine_splits
from .triton_utils import INTERPRET, LOG2E

# One query row per program: the scores are a reduction over head_dim, not a
# tl.dot (which needs 16 rows); decode streams K/V, so the tile is sized for
# loads in flight. Fixed, not autotuned: a step is captured once as a graph.
_BLOCK_N = 16 if INTERPRET else 64
_NUM_WARPS = 4


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, lse_ptr,
    NQ, PAGE, SPLIT_LEN, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kd,
    stride_tb, stride_th, stride_tw,
    stride_ob, stride_oh, stride_od, stride_osplit,
    stride_lb, stride_lh, stride_lsplit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Query head ``program_id(0) % NQ`` of sequence ``program_id(0) // NQ`` over split ``program_id(1)``."""
    bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    b = (bh // NQ).to(tl.int64)
    h = (bh % NQ).to(tl.int64)
    kvh = tl.load(kvmap_ptr + h).to(tl.int64)
    # A free slot of a head list padded to its capacity (a plan bound as data) attends nothing: its output
    # is 0 (and its splits' log-sum-exp -inf), so the combine reads defined values.
    free = kvh < 0
    kvh = tl.maximum(kvh, 0)
    length = tl.load(len_ptr + b)
    start = tl.load(start_ptr + b)
    lo = tl.maximum(start, pid_split * SPLIT_LEN)
    hi = tl.where(free, lo, tl.minimum(length, (pid_split + 1) * SPLIT_LEN))

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * qk_scale
    table = table_ptr + b * stride_tb + kvh * stride_th

    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_i = tl.max(tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32), 0)
    l_i = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.float32), 0)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = (offs_n >= lo) & (offs_n < hi)
        page = tl.load(table + (offs_n // PAGE) * stride_tw, mask=valid, other=0).to(tl.int64)
        row = page * stride_kp + (offs_n % PAGE) * stride_ks
        tile_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :] * stride_kd, mask=tile_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        # Nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :] * stride_kd, mask=tile_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)
    o_off = b * stride_ob + h * stride_oh + offs_d * stride_od
    if SPLIT == 1:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=mask_d)
    else:
        tl.store(o_ptr + o_off + pid_split * stride_osplit, out, mask=mask_d)
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + pid_split * stride_lsplit, lse)


def launch_paged_decode(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q`` ``[batch, heads, d]``, ``pages`` ``[2, num_pages, page_size, d]``, ``block_tables``
    ``[batch, kv_heads, width]`` int32, ``lengths``/``starts`` ``[batch]`` int32 -> ``[batch, heads, d]``
    (into ``out`` when given)."""
    batch, nq, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    if batch * nq == 0:
        return out
    page_size, width = pages.shape[2], block_tables.shape[2]
    blocks = triton.cdiv(width * page_size, _BLOCK_N)
    split_len = triton.cdiv(blocks, split) * _BLOCK_N
    k_pages, v_pages = pages[0], pages[1]
    if split == 1:
        target, lse = out, out
        t_strides, l_strides = (*out.stride(), 0), (0, 0, 0)
    else:
        target = torch.empty(batch, nq, split, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, nq, split, dtype=torch.float32, device=q.device)
        t_strides = (target.stride(0), target.stride(1), target.stride(3), target.stride(2))
        l_strides = lse.stride()
    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_decode_kernel[(batch * nq, split)](
        q, k_pages, v_pages, block_tables, head_to_kv, lengths, starts, target, lse,
        nq, page_size, split_len, scale * LOG2E,
        *q.stride(), *k_pages.stride(), *block_tables.stride(),
        *t_strides, *l_strides,
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLIT=split, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS,
    )
    if split > 1:
        # The combine indexes [batch, row, head, d, split]: one row per sequence here.
        combine_splits(target, (target.stride(0), 0, target.stride(1), target.stride(3), target.stride(2)),
                       lse, (lse.stride(0), 0, lse.stride(1), lse.stride(2)),
                       out, (out.stride(0), 0, out.stride(1), out.stride(2)),
                       rows=1, batch=batch, heads=nq, head_dim=head_dim, split=split)
    return out
