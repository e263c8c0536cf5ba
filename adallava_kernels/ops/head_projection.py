"""Per-head projection with RoPE in the epilogue: ``x @ W[head rows].T`` for a list of heads.

One program per (token tile, head slot): a program holds the two halves of its head in two
accumulators, because RoPE rotates element ``d`` with element ``d + head_dim / 2``, and applies the
rotation to the fp32 accumulator. The output layout is free (strides per batch, position, head and
element), so K and V are written straight into the ``[batch, heads, seq, head_dim]`` layout a KV
cache stores; slots from ``rope_slots`` on are not rotated, so q, k and v of a stacked weight
``[q; k; v]`` are projected in one launch.

When the grid would not fill the GPU (decode, few heads, small batch) the reduction over the hidden
features is split across programs. This is what lets time fall with the number of active heads:
without the split, 8 heads of one sequence would occupy 8 programs whatever their count. The splits
meet in the same launch, in a fixed order (:mod:`.workspace`): each writes its fp32 partial tile to
the workspace and takes a ticket (one integer atomic a program); the last of a tile sums the partials
in split order, then rotates, casts and writes the tile as an unsplit program does, and puts its
ticket counter back to 0. No float atomic is used, so the result is bitwise repeatable, and the output
is written once, in place (no zero-fill, no fp32 copy): a free slot is left unwritten either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2
from .rms_norm import check_norm_weight, normed_tile, rms_scale
from .triton_utils import (PREFETCH_TILES, autotuned, config, dependent_launch, dot, dot_flags, min_per_split, pdl_flags,
                           prefetch_lines, regime, smallest_block, splits)
from .workspace import counters, scratch

__all__ = ["CONFIGS", "PagedKV", "head_projection"]


# One program computes [BLOCK_M tokens, head_dim]: a 128-wide tile at head_dim 128.
CONFIGS = {
    "prefill": [
        # Hopper: 128x128 tiles with 64-deep K and 3-4 stages fit its 228 KB of shared memory.
        config(8, 3, BLOCK_M=128, BLOCK_K=64),
        config(4, 4, BLOCK_M=64, BLOCK_K=64),
        # Ampere: 32-deep K so 4 stages fit 164 KB; 8 warps, as 4 spill the two 128 x 64 accumulators.
        config(8, 4, BLOCK_M=128, BLOCK_K=32),
    ],
    # 1 to 16 tokens: the weight stream dominates; deep K tiles keep loads in flight.
    "decode": [
        config(4, 4, BLOCK_M=16, BLOCK_K=128),
        config(4, 3, BLOCK_M=16, BLOCK_K=256),
    ],
}
INTERPRETER_CONFIGS = [config(4, 1, BLOCK_M=16, BLOCK_K=32)]

# Split the reduction only where each split keeps at least this many hidden features.
_MIN_K_PER_SPLIT = min_per_split(128)
# The fewest token rows a tile has (the smallest tile tl.dot takes): ticket counters for this many cover
# the tiles of any config.
_MIN_BLOCK_M = 16


@triton.jit
def _prefetch_head_tiles(slot, pid_k, pid_p, w_ptr, heads_ptr, K, stride_wn, stride_wk, HEAD_DIM: tl.constexpr,
                         BLOCK_H: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Before the PDL wait: program (``slot``, split ``pid_k``, pair block ``pid_p``)'s first K tiles of its
    head's rows (the head from the plan's list) into L2; a split's tiles are every SPLIT_K-th from its own."""
    HALF: tl.constexpr = HEAD_DIM // 2
    head = tl.load(heads_ptr + slot)
    offs_d = pid_p * BLOCK_H + tl.arange(0, BLOCK_H)
    rows = head.to(tl.int64) * HEAD_DIM + offs_d
    listed = (offs_d < HALF) & (head >= 0)
    for t in tl.static_range(PREFETCH_TILES):
        k0 = (pid_k + t * SPLIT_K) * BLOCK_K
        prefetch_lines(w_ptr, rows, listed, stride_wn, k0, K, stride_wk, BLOCK_K)
        prefetch_lines(w_ptr, rows + HALF, listed, stride_wn, k0, K, stride_wk, BLOCK_K)


@triton.jit
def _project_head(
    pid_m, slot, pid_k, pid_p, SLOTS, x_ptr, w_ptr, heads_ptr, cos_ptr, sin_ptr, y_ptr,
    k_pages_ptr, v_pages_ptr, table_ptr, pos_ptr, part_ptr, cnt_ptr, norm_ptr, eps,
    M, K, SEQ, ROPE_SLOTS, PAIR_BLOCKS, Q_SLOTS, KV_SLOTS, PAGE,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_cb, stride_cs, stride_cd,
    stride_yb, stride_ys, stride_yh, stride_yd,
    stride_pp, stride_ps, stride_tb, stride_th, stride_tw,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    ROPE: tl.constexpr, SPLIT_K: tl.constexpr, PAGED: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The program (token tile ``pid_m``, head slot ``slot`` of ``SLOTS``, split ``pid_k``, pair block ``pid_p``)
    of :func:`_head_proj_kernel` (its docstring: what it computes and writes); the phased attention block
    (:mod:`.phased_attention`) runs it as its first phase."""
    HALF: tl.constexpr = HEAD_DIM // 2
    head = tl.load(heads_ptr + slot).to(tl.int64)
    if head < 0:  # a free slot of a list padded to its capacity (plans bound as data): nothing to project
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_p * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_m = offs_m < M
    mask_d = offs_d < HALF
    rows_lo = head * HEAD_DIM + offs_d
    rows_hi = rows_lo + HALF

    acc_lo = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if NORM:
            a, squares = normed_tile(a, norm_ptr + 0 * offs_m[:, None] + offs_k[None, :],
                                     mask_m[:, None] & mask_k[None, :], squares, UPCAST)
        w_mask = mask_k[:, None] & mask_d[None, :]
        w_lo = tl.load(w_ptr + rows_lo[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
        w_hi = tl.load(w_ptr + rows_hi[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc_lo = dot(a, w_lo, acc_lo, IEEE, UPCAST)
        acc_hi = dot(a, w_hi, acc_hi, IEEE, UPCAST)
    if NORM:
        inv_rms = rms_scale(squares, K, eps)
        acc_lo = acc_lo * inv_rms[:, None]
        acc_hi = acc_hi * inv_rms[:, None]

    if SPLIT_K > 1:
        tile = (pid_m * SLOTS + slot) * PAIR_BLOCKS + pid_p
        # This split's partial: rows offs_m of plane (slot, pair block, split), lo then hi.
        plane = ((slot * PAIR_BLOCKS + pid_p) * SPLIT_K).to(tl.int64)
        local = offs_m[:, None] * (2 * BLOCK_H) + tl.arange(0, BLOCK_H)[None, :]
        rows = mask_m[:, None]
        tl.store(part_ptr + (plane + pid_k) * M * (2 * BLOCK_H) + local, acc_lo, mask=rows)
        tl.store(part_ptr + (plane + pid_k) * M * (2 * BLOCK_H) + local + BLOCK_H, acc_hi, mask=rows)
        tl.debug_barrier()  # every thread's partial is written before the ticket publishes it
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        if last:  # the last split of this tile: the sum, in split order
            acc_lo = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            acc_hi = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                parts = part_ptr + (plane + s) * M * (2 * BLOCK_H) + local
                acc_lo += tl.load(parts, mask=rows, other=0.0, cache_modifier=".cg")
                acc_hi += tl.load(parts + BLOCK_H, mask=rows, other=0.0, cache_modifier=".cg")
            tl.store(cnt_ptr + tile, 0)  # the ticket counter back to 0 for the next launch
        mask_m = mask_m & last  # only the last split writes the tile (the rest of this runs masked off)

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
    to_pages = False
    if PAGED:
        to_pages = slot >= Q_SLOTS
        kv = slot - Q_SLOTS
        is_v = kv >= KV_SLOTS
        kv = tl.where(is_v, kv - KV_SLOTS, kv)
        page_rows = mask_m & to_pages
        position = tl.load(pos_ptr + batch, mask=page_rows, other=0) + pos
        page = tl.load(table_ptr + batch * stride_tb + kv * stride_th + (position // PAGE) * stride_tw,
                       mask=page_rows, other=0).to(tl.int64)
        p_off = page[:, None] * stride_pp + (position % PAGE)[:, None] * stride_ps + offs_d[None, :]
        k_mask = tile_mask & page_rows[:, None] & (is_v == 0)
        v_mask = tile_mask & page_rows[:, None] & is_v
        dtype = k_pages_ptr.dtype.element_ty
        tl.store(k_pages_ptr + p_off, out_lo.to(dtype), mask=k_mask)
        tl.store(k_pages_ptr + p_off + HALF, out_hi.to(dtype), mask=k_mask)
        tl.store(v_pages_ptr + p_off, out_lo.to(dtype), mask=v_mask)
        tl.store(v_pages_ptr + p_off + HALF, out_hi.to(dtype), mask=v_mask)
        tile_mask = tile_mask & (to_pages == 0)
        slot = tl.minimum(slot, Q_SLOTS - 1)  # y holds the q slots only: never addressed past them
    y_off = batch[:, None] * stride_yb + pos[:, None] * stride_ys + slot * stride_yh + offs_d[None, :] * stride_yd
    tl.store(y_ptr + y_off, out_lo.to(y_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(y_ptr + y_off + HALF * stride_yd, out_hi.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _head_proj_kernel(
    x_ptr, w_ptr, heads_ptr, cos_ptr, sin_ptr, y_ptr,
    k_pages_ptr, v_pages_ptr, table_ptr, pos_ptr, part_ptr, cnt_ptr, norm_ptr, eps,
    M, K, SEQ, M_BUCKET, ROPE_SLOTS, PAIR_BLOCKS, Q_SLOTS, KV_SLOTS, PAGE,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_cb, stride_cs, stride_cd,
    stride_yb, stride_ys, stride_yh, stride_yd,
    stride_pp, stride_ps, stride_tb, stride_th, stride_tw,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    ROPE: tl.constexpr, SPLIT_K: tl.constexpr, PAGED: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, s, slot, :] = rope(x[b*SEQ + s] @ w[heads[slot]*HEAD_DIM : +HEAD_DIM].T); slots from ROPE_SLOTS on
    are not rotated (V, when q, k and v are projected in one launch). A program computes BLOCK_H of a head's
    rotation pairs (element d with d + HEAD_DIM / 2): PAIR_BLOCKS programs share a head, which fills the
    GPU in decode without splitting the reduction.

    PAGED: slots [Q_SLOTS, Q_SLOTS + KV_SLOTS) are K heads and the next KV_SLOTS V heads; they go to the
    pages instead of y (KV slot j of row b at position pos[b] + s: page table[b, j, position // PAGE]),
    so the projection is also the KV append.

    SPLIT_K > 1: program_id(2) // PAIR_BLOCKS takes every SPLIT_K-th K block; each split writes its fp32
    partial [BLOCK_M, 2 * BLOCK_H] (lo, then hi) to part_ptr, rows addressed by token (so the layout is the
    same for any BLOCK_M), and takes a ticket on the tile's int32 counter; the last of the tile sums the
    partials in split order and runs the epilogue below (RoPE is applied to the full sum), the others
    write nothing.

    NORM (SPLIT_K 1): x is taken through transformers' RMSNorm with weight norm_ptr first, inside the
    reduction (:func:`~.rms_norm.normed_tile`), so the norm costs no launch of its own."""
    if PDL:
        _prefetch_head_tiles(tl.program_id(1), tl.program_id(2) // PAIR_BLOCKS, tl.program_id(2) % PAIR_BLOCKS, w_ptr,
                             heads_ptr, K, stride_wn, stride_wk, HEAD_DIM, BLOCK_H, SPLIT_K, BLOCK_K)
    dependent_launch(PDL)
    _project_head(tl.program_id(0), tl.program_id(1), tl.program_id(2) // PAIR_BLOCKS, tl.program_id(2) % PAIR_BLOCKS,
                  tl.num_programs(1), x_ptr, w_ptr, heads_ptr, cos_ptr, sin_ptr, y_ptr, k_pages_ptr, v_pages_ptr,
                  table_ptr, pos_ptr, part_ptr, cnt_ptr, norm_ptr, eps, M, K, SEQ, ROPE_SLOTS, PAIR_BLOCKS, Q_SLOTS,
                  KV_SLOTS, PAGE, stride_xm, stride_xk, stride_wn, stride_wk, stride_cb, stride_cs, stride_cd,
                  stride_yb, stride_ys, stride_yh, stride_yd, stride_pp, stride_ps, stride_tb, stride_th, stride_tw,
                  HEAD_DIM, BLOCK_H, ROPE, SPLIT_K, PAGED, NORM, IEEE, UPCAST, BLOCK_M, BLOCK_K)


KERNELS = autotuned(_head_proj_kernel, CONFIGS, INTERPRETER_CONFIGS, ["M_BUCKET", "K", "HEAD_DIM", "IEEE"])


def _block_h(head_dim: int, which: str) -> int:
    """Rotation pairs a program computes: a whole head in prefill (a wide tile for tl.dot); in decode the
    smallest tile tl.dot takes (16), so a head's rows spread over several programs that each read whole
    weight rows and keep the full reduction (the grid fills the GPU without splitting it)."""
    whole = max(16, next_power_of_2(head_dim // 2))
    return whole if which == "prefill" else 16


@dataclass(frozen=True)
class PagedKV:
    """Where a projection's K and V heads go instead of its output: the pool's ``k_pages``/``v_pages``
    ``[num_pages, page_size, head_dim]``, each row's ``tables`` ``[batch, kv_slots, width]`` int32 and
    ``positions`` ``[batch]`` int32 (the first new token's position; token ``s`` goes to ``positions + s``)."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    tables: torch.Tensor
    positions: torch.Tensor


def head_projection(
    x: torch.Tensor, w: torch.Tensor, heads: torch.Tensor, head_dim: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, out: torch.Tensor, *, split: int | None = None,
    rope_slots: int | None = None, paged: PagedKV | None = None, norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Project ``x`` ``[batch, seq, hidden]`` onto ``heads`` of ``w``, rotated when ``cos``/``sin`` are given.

    ``out`` is a 4-D view indexed ``[batch, seq, slot, d]`` (any strides);
    ``cos`` and ``sin`` are contiguous ``[batch or 1, seq, head_dim]`` tensors.
    ``split`` overrides the number of reduction splits (default: chosen to fill the GPU).
    ``rope_slots``: rotate only the first this many slots (default: all).
    ``paged``: the last ``2 * kv_slots`` slots (K heads, then V heads) are written to the pages (the KV
    append, fused) and ``out`` holds the other slots only; the reduction is then not split unless ``split``
    says so.
    ``norm_weight`` ``[hidden]``: ``x`` is taken through transformers' RMSNorm with that weight and ``eps``
    first, inside the reduction (a decode layer's input norm, fused: :func:`~.rms_norm.normed_tile`); the
    reduction is then not split.

    A split reduction meets in the launch, in a fixed order (bitwise repeatable); its partials and ticket
    counters are the shared workspace (:mod:`.workspace`), which grows outside a CUDA graph capture only:
    run a shape once eagerly before capturing it.
    """
    batch, seq, hidden = x.shape
    m, n_heads = batch * seq, heads.numel()
    check_norm_weight(norm_weight, x)
    if norm_weight is not None and split not in (None, 1):
        raise ValueError(f"split must be 1 or None with norm_weight (the norm needs each row's whole sum), got {split}")
    if m == 0 or n_heads == 0:
        return out
    x2 = x.reshape(m, hidden)
    which = regime(m)
    block_m = smallest_block("BLOCK_M", CONFIGS, INTERPRETER_CONFIGS, which)
    block_h = _block_h(head_dim, which)
    pair_blocks = cdiv(head_dim // 2, block_h)
    programs = cdiv(m, block_m) * n_heads * pair_blocks
    if split is None:
        # Prefill tiles fill the GPU; so do the paged decode step's pair blocks (every q, k and v head).
        whole = which == "prefill" or paged is not None or norm_weight is not None
        split = 1 if whole else splits(programs, cdiv(hidden, _MIN_K_PER_SPLIT), x.device)
    if split > 1:
        # Partials [slot, pair block, split, m, 2 * block_h] whatever BLOCK_M; a counter per tile of the
        # smallest BLOCK_M.
        partials = scratch(x.device, n_heads * pair_blocks * split * m * 2 * block_h)
        tickets = counters(x.device, cdiv(m, _MIN_BLOCK_M) * n_heads * pair_blocks)
    else:
        partials, tickets = out, heads  # never read with one split
    rope = cos is not None
    if rope:
        # A batch of 1 broadcasts: stride 0 reads the same rows for every sequence.
        rope_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
    else:
        cos = sin = x2  # any pointer: never read without ROPE
        rope_strides = (0, 0, 0)
    if paged is None:
        kv_slots, page_args, page_strides = 0, (x2, x2, heads, heads), (0, 0, 0, 0, 0)
        page_size = 1
    else:
        kv_slots, page_size = paged.tables.shape[1], paged.k_pages.shape[1]
        page_args = (paged.k_pages, paged.v_pages, paged.tables, paged.positions)
        page_strides = (paged.k_pages.stride(0), paged.k_pages.stride(1), *paged.tables.stride())
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), n_heads, split * pair_blocks)  # noqa: E731
    KERNELS[which][grid](
        x2, w, heads, cos, sin, out, *page_args, partials, tickets, x2 if norm_weight is None else norm_weight, eps,
        m, hidden, seq, next_power_of_2(m), n_heads if rope_slots is None else rope_slots, pair_blocks,
        n_heads - 2 * kv_slots, kv_slots, page_size,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), *rope_strides, *out.stride(), *page_strides,
        HEAD_DIM=head_dim, BLOCK_H=block_h, ROPE=rope, SPLIT_K=split, PAGED=paged is not None,
        NORM=norm_weight is not None, **pdl_flags(x.device, which),
        **dot_flags(x.dtype),
    )
    return out
