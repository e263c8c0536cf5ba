"""Triton kernels of the head-masked attention: per-head projection with RoPE, and flash attention.

- :func:`head_projection`: ``x @ W[head rows].T`` for a list of heads, one
  program per (token tile, head), with the rotary embedding applied to the
  fp32 accumulator in the epilogue. A program holds the two halves of its
  head in two accumulators, because RoPE rotates element ``d`` with element
  ``d + head_dim / 2``. The output layout is free (strides per batch,
  position, head and element), so K and V are written straight into the
  ``[batch, heads, seq, head_dim]`` layout a KV cache stores.
- :func:`flash_attention`: causal attention with online softmax and fp32
  accumulation over a list of query heads, each reading the KV head the
  ``head_to_kv`` map names (after masking, the GQA map is arbitrary), with an
  optional padding mask. Queries are the last ``q_len`` of ``kv_len``
  positions, so the same kernel runs prefill and decode.

Both split their reduction across programs when the grid would not fill the
GPU (decode, few heads, small batch): the projection adds fp32 partial sums
atomically (RoPE is linear, so rotating the partial sums is exact); the
attention writes per-split partial outputs with their log-sum-exp, which a
small kernel combines. This is what lets time fall with the number of active
heads: without the split, 8 heads of one sequence would occupy 8 programs
whatever their count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING as _INTERPRET, kernel_configs
from .gathered_linear import DECODE_MAX_TOKENS, _dot, _flags, _multiprocessors, _regime

__all__ = ["DECODE_MAX_TOKENS", "head_projection", "flash_attention", "PROJECTION_CONFIGS", "ATTENTION_CONFIGS"]

_LOG2E = 1.4426950408889634


def _config(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# One program computes [BLOCK_M tokens, head_dim]: a 128-wide tile at head_dim 128.
PROJECTION_CONFIGS = {
    "prefill": [
        # Hopper: 128x128 tiles with 64-deep K and 3-4 stages fit its 228 KB of shared memory.
        _config(8, 3, BLOCK_M=128, BLOCK_K=64),
        _config(4, 4, BLOCK_M=64, BLOCK_K=64),
        # Ampere: 32-deep K so 4 stages fit 164 KB.
        _config(4, 4, BLOCK_M=128, BLOCK_K=32),
    ],
    # 1 to 16 tokens: the weight stream dominates; deep K tiles keep loads in flight.
    "decode": [
        _config(4, 4, BLOCK_M=16, BLOCK_K=128),
        _config(4, 3, BLOCK_M=16, BLOCK_K=256),
    ],
}
ATTENTION_CONFIGS = {
    # FlashAttention-2's forward tiles for head_dim 128 on Hopper and Ampere.
    "prefill": [
        _config(8, 3, BLOCK_M=128, BLOCK_N=64),
        _config(4, 3, BLOCK_M=64, BLOCK_N=64),
        _config(8, 2, BLOCK_M=128, BLOCK_N=128),
    ],
    # A 16-row query tile is the smallest tl.dot takes; the KV stream dominates.
    "decode": [
        _config(4, 3, BLOCK_M=16, BLOCK_N=64),
        _config(4, 3, BLOCK_M=16, BLOCK_N=128),
    ],
}
# Under TRITON_INTERPRET=1 autotuning does not work: one small config per
# kernel, so odd sizes still cross tile boundaries in tests.
_INTERPRETER = {
    "projection": [_config(4, 1, BLOCK_M=16, BLOCK_K=32)],
    "attention": [_config(4, 1, BLOCK_M=16, BLOCK_N=16)],
}

# Below this much reduction per split (KV positions, hidden features),
# splitting costs more than it hides. The interpreter splits finer, so that
# small test shapes take the split paths.
_MIN_KV_PER_SPLIT = 32 if _INTERPRET else 256
_MIN_K_PER_SPLIT = 32 if _INTERPRET else 128
_MAX_SPLITS = 32


# -- projection -----------------------------------------------------------------


@triton.jit
def _head_proj_kernel(
    x_ptr, w_ptr, heads_ptr, cos_ptr, sin_ptr, y_ptr,
    M, K, SEQ, M_BUCKET, ROPE_SLOTS,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_cb, stride_cs, stride_cd,
    stride_yb, stride_ys, stride_yh, stride_yd,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    ROPE: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, s, slot, :] = rope(x[b*SEQ + s] @ w[heads[slot]*HEAD_DIM : +HEAD_DIM].T); slots from ROPE_SLOTS on
    are not rotated (V, when q, k and v are projected in one launch)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    pid_k = tl.program_id(2)
    head = tl.load(heads_ptr + slot).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_H)
    mask_m = offs_m < M
    mask_d = offs_d < HALF
    rows_lo = head * HEAD_DIM + offs_d
    rows_hi = rows_lo + HALF

    acc_lo = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        w_mask = mask_k[:, None] & mask_d[None, :]
        w_lo = tl.load(w_ptr + rows_lo[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
        w_hi = tl.load(w_ptr + rows_hi[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc_lo = _dot(a, w_lo, acc_lo, IEEE, UPCAST)
        acc_hi = _dot(a, w_hi, acc_hi, IEEE, UPCAST)

    batch = offs_m // SEQ
    pos = offs_m % SEQ
    tile_mask = mask_m[:, None] & mask_d[None, :]
    if ROPE:
        # rotate_half: (lo, hi) -> (lo * cos - hi * sin, hi * cos + lo * sin).
        c_off = batch[:, None] * stride_cb + pos[:, None] * stride_cs + offs_d[None, :] * stride_cd
        cos_lo = tl.load(cos_ptr + c_off, mask=tile_mask, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + c_off + HALF * stride_cd, mask=tile_mask, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + c_off, mask=tile_mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + c_off + HALF * stride_cd, mask=tile_mask, other=0.0).to(tl.float32)
        rotate = slot < ROPE_SLOTS
        out_lo = tl.where(rotate, acc_lo * cos_lo - acc_hi * sin_lo, acc_lo)
        out_hi = tl.where(rotate, acc_hi * cos_hi + acc_lo * sin_hi, acc_hi)
    else:
        out_lo = acc_lo
        out_hi = acc_hi
    y_off = batch[:, None] * stride_yb + pos[:, None] * stride_ys + slot * stride_yh + offs_d[None, :] * stride_yd
    if SPLIT_K == 1:
        tl.store(y_ptr + y_off, out_lo.to(y_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(y_ptr + y_off + HALF * stride_yd, out_hi.to(y_ptr.dtype.element_ty), mask=tile_mask)
    else:
        tl.atomic_add(y_ptr + y_off, out_lo, mask=tile_mask)
        tl.atomic_add(y_ptr + y_off + HALF * stride_yd, out_hi, mask=tile_mask)


# -- attention ------------------------------------------------------------------


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
        s = _dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE, UPCAST) * qk_scale
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
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
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


# -- tuning -----------------------------------------------------------------------


def _configs(kind: str, regime: str) -> list:
    tuned = (PROJECTION_CONFIGS if kind == "projection" else ATTENTION_CONFIGS)[regime]
    return kernel_configs(tuned, _INTERPRETER[kind])


_PROJ = {
    regime: triton.autotune(
        configs=_configs("projection", regime), key=["M_BUCKET", "K", "HEAD_DIM", "IEEE"], restore_value=["y_ptr"]
    )(_head_proj_kernel)
    for regime in ("prefill", "decode")
}
_ATTN = {
    regime: triton.autotune(configs=_configs("attention", regime), key=["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "SPLIT"])(
        _flash_attn_kernel
    )
    for regime in ("prefill", "decode")
}


def _splits(programs: int, reduction_blocks: int, device: torch.device) -> int:
    """Reduction splits so that ``programs`` times the splits covers the GPU about twice."""
    if programs >= _multiprocessors(device):
        return 1
    return max(1, min(triton.cdiv(2 * _multiprocessors(device), programs), reduction_blocks, _MAX_SPLITS))


def _block_h(head_dim: int) -> int:
    # tl.dot needs each tile dimension to be at least 16.
    return max(16, triton.next_power_of_2(head_dim // 2))


# -- launchers --------------------------------------------------------------------
# The op (masked_attention) checks its inputs; these check nothing.


def head_projection(
    x: torch.Tensor, w: torch.Tensor, heads: torch.Tensor, head_dim: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, out: torch.Tensor, *, split: int | None = None,
    rope_slots: int | None = None,
) -> torch.Tensor:
    """Project ``x`` ``[batch, seq, hidden]`` onto ``heads`` of ``w``, rotated when ``cos``/``sin`` are given.

    ``out`` is a 4-D view indexed ``[batch, seq, slot, d]`` (any strides);
    ``cos`` and ``sin`` are contiguous ``[batch or 1, seq, head_dim]`` tensors.
    ``split`` overrides the number of reduction splits (default: chosen to fill the GPU).
    ``rope_slots``: rotate only the first this many slots (default: all).
    """
    batch, seq, hidden = x.shape
    m, n_heads = batch * seq, heads.numel()
    if m == 0 or n_heads == 0:
        return out
    x2 = x.reshape(m, hidden)
    regime = _regime(m)
    block_m = min(c.kwargs["BLOCK_M"] for c in _configs("projection", regime))
    programs = triton.cdiv(m, block_m) * n_heads
    if split is None:
        split = 1 if regime == "prefill" else _splits(programs, triton.cdiv(hidden, _MIN_K_PER_SPLIT), x.device)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    rope = cos is not None
    if rope:
        # A batch of 1 broadcasts: stride 0 reads the same rows for every sequence.
        rope_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
    else:
        cos = sin = x2  # any pointer: never read without ROPE
        rope_strides = (0, 0, 0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_heads, split)  # noqa: E731
    _PROJ[regime][grid](
        x2, w, heads, cos, sin, target,
        m, hidden, seq, triton.next_power_of_2(m), n_heads if rope_slots is None else rope_slots,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), *rope_strides, *target.stride(),
        HEAD_DIM=head_dim, BLOCK_H=_block_h(head_dim), ROPE=rope, SPLIT_K=split, **_flags(x.dtype),
    )
    if split > 1:
        out.copy_(target)
    return out


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
    regime = _regime(sq)
    block_m = min(c.kwargs["BLOCK_M"] for c in _configs("attention", regime))
    programs = triton.cdiv(sq, block_m) * batch * nq
    if split is None:
        split = _splits(programs, triton.cdiv(skv, _MIN_KV_PER_SPLIT), q.device)
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
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), batch * nq, split)  # noqa: E731
    _ATTN[regime][grid](
        q, k, v, head_to_kv, pad, target, lse,
        sq, skv, nq, scale * _LOG2E, triton.next_power_of_2(sq), triton.next_power_of_2(skv),
        *q.stride(), *k.stride(), *v.stride(), *pad_strides,
        *t_strides, *l_strides,
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLIT=split, HAS_PAD=padding_mask is not None,
        **_flags(q.dtype),
    )
    if split > 1:
        _combine_kernel[(sq, batch * nq)](
            target, lse, out, sq, nq,
            target.stride(0), target.stride(1), target.stride(2), target.stride(4), target.stride(3),
            *lse.stride(), *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLIT=split, BLOCK_SPLIT=max(2, triton.next_power_of_2(split)),
        )
    return out
