"""Causal flash attention over a list of query heads, each reading the KV head a map names.

Online softmax (in base 2) with fp32 accumulation over the query heads ``q`` holds, each reading the
KV head ``head_to_kv`` names (after masking, the GQA map is arbitrary), with an optional padding
mask. Queries are the last ``q_len`` of ``kv_len`` positions, so the same kernel runs prefill and
decode. When the grid would not fill the GPU (decode, few heads, small batch), each program covers
one share of the KV blocks and writes a partial output with its log-sum-exp, which
:mod:`~adallava_kernels.ops.split_combine` combines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2
from .split_combine import combine_splits
from .triton_utils import (
    LOG2E, autotuned, config, dot, dot_flags, min_per_split, regime, smallest_block, splits,
)

__all__ = ["CONFIGS", "flash_attention"]


CONFIGS = {
    # FlashAttention-2's forward tiles for head_dim 128 on Hopper and Ampere.
    "prefill": [
        config(8, 3, BLOCK_M=128, BLOCK_N=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(8, 2, BLOCK_M=128, BLOCK_N=128),
    ],
    # A 16-row query tile is the smallest tl.dot takes; the KV stream dominates.
    "decode": [
        config(4, 3, BLOCK_M=16, BLOCK_N=64),
        config(4, 3, BLOCK_M=16, BLOCK_N=128),
    ],
}
INTERPRETER_CONFIGS = [config(4, 1, BLOCK_M=16, BLOCK_N=16)]

# Split the reduction only where each split keeps at least this many KV positions.
_MIN_KV_PER_SPLIT = min_per_split(256)


@triton.jit
def _attend_blocks(
    acc, m_i, l_i, q, k_base, v_base, pad_base, start, stop, offs_m, offs_d, mask_d,
    PAST, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, stride_ps,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, m, l) over KV positions [start, stop), in log2 units."""
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < stop
        k = tl.load(
            k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            mask=in_range[None, :] & mask_d[:, None], other=0.0,
        )
        s = dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE, UPCAST) * qk_scale
        keep = in_range[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= PAST + offs_m[:, None])
        if HAS_PAD:
            pad = tl.load(pad_base + offs_n * stride_ps, mask=in_range, other=0)
            keep = keep & (pad != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=in_range[:, None] & mask_d[None, :], other=0.0,
        )
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_attn_kernel(
    q_ptr, k_ptr, v_ptr, kvmap_ptr, pad_ptr, o_ptr, lse_ptr,
    SQ, SKV, NQ, qk_scale, SQ_BUCKET, SKV_BUCKET,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ps,
    stride_ob, stride_os, stride_oh, stride_od, stride_osplit,
    stride_lb, stride_ls, stride_lh, stride_lsplit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    HAS_PAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Causal attention of query tile ``program_id(0)`` of head ``program_id(1) % NQ``.

    With SPLIT > 1, program ``program_id(2)`` covers one share of the KV
    blocks and writes its normalised partial output and log2-sum-exp.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = (bh // NQ).to(tl.int64)
    h = (bh % NQ).to(tl.int64)
    kvh = tl.load(kvmap_ptr + h).to(tl.int64)
    past = SKV - SQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SQ
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + offs_m[:, None] * stride_qs + h * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    pad_base = pad_ptr + b * stride_pb

    # This tile sees keys [0, hi); whole blocks below `diag` are visible to all of its rows,
    # so only the blocks from `diag` on pay for the causal mask.
    hi = tl.minimum(SKV, past + (pid_m + 1) * BLOCK_M)
    diag = ((past + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    blocks = tl.cdiv(hi, BLOCK_N)
    per_split = tl.cdiv(blocks, SPLIT)
    start = pid_split * per_split * BLOCK_N
    stop = tl.minimum(hi, start + per_split * BLOCK_N)
    mid = tl.maximum(start, tl.minimum(stop, diag))

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, k_base, v_base, pad_base, start, mid, offs_m, offs_d, mask_d,
        past, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, stride_ps,
        False, HAS_PAD, IEEE, UPCAST, BLOCK_M, BLOCK_N,
    )
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, k_base, v_base, pad_base, mid, stop, offs_m, offs_d, mask_d,
        past, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, stride_ps,
        True, HAS_PAD, IEEE, UPCAST, BLOCK_M, BLOCK_N,
    )

    # A row that sees no key (all padding) has l = 0: its output is 0, its weight in a combine 0.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_off = b * stride_ob + offs_m[:, None] * stride_os + h * stride_oh + offs_d[None, :] * stride_od
    o_mask = mask_m[:, None] & mask_d[None, :]
    if SPLIT == 1:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptr + o_off + pid_split * stride_osplit, out, mask=o_mask)
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + offs_m * stride_ls + h * stride_lh + pid_split * stride_lsplit, lse,
                 mask=mask_m)



KERNELS = autotuned(_flash_attn_kernel, CONFIGS, INTERPRETER_CONFIGS, ["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "SPLIT"])


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_to_kv: torch.Tensor,
    padding_mask: torch.Tensor | None, out: torch.Tensor, scale: float, *, split: int | None = None,
) -> torch.Tensor:
    """Causal attention: ``q`` ``[batch, q_len, heads, d]``; ``k``, ``v`` ``[batch, kv_heads, kv_len, d]``.

    Query ``i`` sits at position ``kv_len - q_len + i``. ``padding_mask``:
    ``[batch, kv_len]`` int32, 0 for a padded position. ``out`` has the
    layout of ``q``; a row that sees no key is 0. ``split`` overrides the
    number of KV splits (default: chosen to fill the GPU).
    """
    batch, sq, nq, head_dim = q.shape
    skv = k.shape[2]
    if batch * sq * nq == 0:
        return out
    if skv == 0:
        return out.zero_()
    which = regime(sq)
    block_m = smallest_block("BLOCK_M", CONFIGS, INTERPRETER_CONFIGS, which)
    programs = cdiv(sq, block_m) * batch * nq
    if split is None:
        split = splits(programs, cdiv(skv, _MIN_KV_PER_SPLIT), q.device)
    pad = padding_mask if padding_mask is not None else head_to_kv  # any pointer: never read without HAS_PAD
    pad_strides = (padding_mask.stride(0), padding_mask.stride(1)) if padding_mask is not None else (0, 0)
    if split == 1:
        target, lse = out, out
        t_strides = (*out.stride(), 0)
        l_strides = (0, 0, 0, 0)
    else:
        target = torch.empty(batch, sq, nq, split, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, sq, nq, split, dtype=torch.float32, device=q.device)
        t_strides = (target.stride(0), target.stride(1), target.stride(2), target.stride(4), target.stride(3))
        l_strides = lse.stride()
    block_d = max(16, next_power_of_2(head_dim))
    grid = lambda meta: (cdiv(sq, meta["BLOCK_M"]), batch * nq, split)  # noqa: E731
    KERNELS[which][grid](
        q, k, v, head_to_kv, pad, target, lse,
        sq, skv, nq, scale * LOG2E, next_power_of_2(sq), next_power_of_2(skv),
        *q.stride(), *k.stride(), *v.stride(), *pad_strides,
        *t_strides, *l_strides,
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLIT=split, HAS_PAD=padding_mask is not None,
        **dot_flags(q.dtype),
    )
    if split > 1:
        combine_splits(target, t_strides, lse, l_strides, out, out.stride(), rows=sq, batch=batch, heads=nq,
                       head_dim=head_dim, split=split)
    return out

