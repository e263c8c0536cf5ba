"""Triton kernel of the paged decode attention (see ``paged_attention``).

One program per (sequence, query head, split). A split covers an equal share
of the sequence's visible positions, computed on the device from its length,
so the work stays balanced whatever the context. Each program streams its
share in blocks of ``BLOCK_N`` positions: the block table gives each
position's page, the K and V tiles of the block are loaded 16 bytes a thread
and staged through shared memory by Triton's software pipeline (the scores
and the weighted sum are ``tl.dot`` with the query in row 0 of a 16-row
tile, which is what the pipeliner streams), with an online softmax.

Splits meet in the same launch: each writes its normalised partial output
and log2-sum-exp to the workspace (:mod:`.workspace`), takes a ticket with
one atomic, and the last of a (sequence, head) weighs the partials by
``2^lse`` (the exact softmax over all splits, in a fixed order) and writes
the output.

The head map names each query head's KV slot of the block table: one map for
every sequence (``[heads]``, a row stride of 0) or one per sequence
(``[batch, heads]``: each row's own plan). A free slot (-1: a plan bound as
data, or a head a row's plan does not keep) attends nothing and gives 0: its
programs return at once, before any K/V page or the query is read, and take
no ticket (every split of it reads the same map entry, so all return), split
0 writing the zeros.

With programmatic dependent launch (``ADALLAVA_PDL=1``), a program asks L2 for
the K and V rows of its first two blocks before it waits for the head
projection before it, addressed from the head map, the lengths and the block
table (which that kernel does not write: it writes the newest position's K
and V into L2, where a prefetch of that line finds it either way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_power_of_2
from .triton_utils import INTERPRET, LOG2E, PREFETCH_TILES, dependent_launch, dot, dot_flags, pdl_flags, prefetch_lines
from .workspace import counters, scratch

# Positions a program's loop takes at a time: 4 pages of 16; a K or V tile of 16 KB at head_dim 128.
BLOCK_N = 16 if INTERPRET else 64
NUM_WARPS = 4
# Buffers in flight: the tiles' page indices are loaded first (one indirection), so 4 stages keep one
# tile of K and V ahead of the one being reduced.
NUM_STAGES = 1 if INTERPRET else 7
QUERY_ROWS = 16  # the smallest tile tl.dot takes; row 0 is the query
# The K/V loop's own stages, so a kernel that runs it beside another loop (ops.phased_attention) keeps its
# buffers whatever stages that kernel's other loop takes.
LOOP_STAGES = tl.constexpr(NUM_STAGES)


@triton.jit
def _split_span(length, start, split, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    # Split ``split``'s share of [start, length), whole blocks each, so every split starts on a block.
    share = tl.cdiv(tl.cdiv(tl.maximum(length - start, 0), SPLIT), BLOCK_N) * BLOCK_N
    lo = start + split * share
    return lo, tl.minimum(length, lo + share)


@triton.jit
def _prefetch_kv_tiles(bh, split, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, NQ, PAGE,
                       stride_mb, stride_mh, stride_kp, stride_ks, stride_kd, stride_tb, stride_th, stride_tw,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Before the PDL wait: the K and V rows of the program's first blocks into L2, from its row's head map,
    lengths and block table (which the head projection before it does not write; it writes the newest
    position's K and V, which L2 then holds either way)."""
    b = (bh // NQ).to(tl.int64)
    kvh = tl.load(kvmap_ptr + b * stride_mb + (bh % NQ) * stride_mh).to(tl.int64)
    lo, hi = _split_span(tl.load(len_ptr + b), tl.load(start_ptr + b), split, SPLIT, BLOCK_N)
    table = table_ptr + b * stride_tb + tl.maximum(kvh, 0) * stride_th
    offs_n = lo + tl.arange(0, PREFETCH_TILES * BLOCK_N)
    valid = (offs_n < hi) & (kvh >= 0)
    page = tl.load(table + (offs_n // PAGE) * stride_tw, mask=valid, other=0).to(tl.int64)
    row = page * stride_kp + (offs_n % PAGE) * stride_ks
    # BLOCK_D (a power of 2) elements from 0, those below HEAD_DIM prefetched.
    prefetch_lines(k_ptr, row, valid, 1, 0, HEAD_DIM, stride_kd, BLOCK_D)
    prefetch_lines(v_ptr, row, valid, 1, 0, HEAD_DIM, stride_kd, BLOCK_D)


@triton.jit
def _release_head(rel_ptr, h, k_end, share, HEAD_DIM: tl.constexpr, SPAN: tl.constexpr):
    """Head slot ``h``'s output is final for one row: count it toward every reduction share of ``[0, k_end)``
    (``share`` wide, so at most ``SPAN`` of them) its columns ``[h * HEAD_DIM, (h + 1) * HEAD_DIM)`` fall in
    (release: its stores first)."""
    lo = h * HEAD_DIM
    if lo < k_end:
        tl.debug_barrier()  # every thread's part of the output is written before the count publishes it
        shares = lo // share + tl.arange(0, SPAN)
        last = (tl.minimum(lo + HEAD_DIM, k_end) - 1) // share
        tl.atomic_add(rel_ptr + shares, 1, mask=shares <= last, sem="release")


@triton.jit
def _attend_head(
    bh, split, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, part_ptr, cnt_ptr,
    NQ, PAGE, qk_scale,
    stride_mb, stride_mh,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kd,
    stride_tb, stride_th, stride_tw,
    stride_ob, stride_oh, stride_od,
    rel_ptr, k_end, share,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    RELEASE: tl.constexpr, SPAN: tl.constexpr,
):
    """Query head ``bh % NQ`` of sequence ``bh // NQ`` over split ``split`` of :func:`_paged_decode_kernel`.
    RELEASE: the program that makes the head's output final counts it toward the shares it falls in, at most
    SPAN (:func:`_release_head`)."""
    b = (bh // NQ).to(tl.int64)
    h = (bh % NQ).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    o_off = b * stride_ob + h * stride_oh + offs_d * stride_od
    kvh = tl.load(kvmap_ptr + b * stride_mb + h * stride_mh).to(tl.int64)
    if kvh < 0:  # a free slot of this row: 0, written once (split 0); no page read, no ticket taken
        tl.store(o_ptr + o_off, tl.zeros((BLOCK_D,), dtype=o_ptr.dtype.element_ty), mask=mask_d & (split == 0))
        if RELEASE:
            if split == 0:
                _release_head(rel_ptr, h, k_end, share, HEAD_DIM, SPAN)
        return
    lo, hi = _split_span(tl.load(len_ptr + b), tl.load(start_ptr + b), split, SPLIT, BLOCK_N)

    offs_r = tl.arange(0, ROWS)
    # The query in row 0 of a [ROWS, d] tile; the other rows are 0 and their results unused.
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_r[:, None] * 0 + offs_d[None, :] * stride_qd,
                mask=(offs_r[:, None] == 0) & mask_d[None, :], other=0.0)
    table = table_ptr + b * stride_tb + kvh * stride_th

    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=LOOP_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        page = tl.load(table + (offs_n // PAGE) * stride_tw, mask=valid, other=0).to(tl.int64)
        row = page * stride_kp + (offs_n % PAGE) * stride_ks
        k = tl.load(k_ptr + row[None, :] + offs_d[:, None] * stride_kd, mask=valid[None, :] & mask_d[:, None],
                    other=0.0)
        s = dot(q, k, tl.zeros((ROWS, BLOCK_N), dtype=tl.float32), IEEE, UPCAST) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :] * stride_kd, mask=valid[:, None] & mask_d[None, :],
                    other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    first = offs_r == 0
    m0 = tl.sum(tl.where(first, m_i, 0.0), 0)
    l0 = tl.sum(tl.where(first, l_i, 0.0), 0)
    out = tl.sum(tl.where(first[:, None], acc, 0.0), 0) / tl.where(l0 > 0, l0, 1.0)
    if SPLIT == 1:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=mask_d)
        if RELEASE:
            _release_head(rel_ptr, h, k_end, share, HEAD_DIM, SPAN)
    else:
        # The partial: [BLOCK_D] output then its log2-sum-exp, per (sequence x head, split).
        row_len = BLOCK_D + 1
        mine = part_ptr + (bh.to(tl.int64) * SPLIT + split) * row_len
        tl.store(mine + offs_d, out)
        tl.store(mine + BLOCK_D, tl.where(l0 > 0, m0 + tl.math.log2(tl.where(l0 > 0, l0, 1.0)), float("-inf")))
        tl.debug_barrier()  # every thread's partial is written before the ticket publishes it
        ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
        if ticket == SPLIT - 1:  # the last split of this (sequence, head): combine all in a fixed order
            offs_s = tl.arange(0, BLOCK_SPLIT)
            mask_s = offs_s < SPLIT
            rows = part_ptr + (bh.to(tl.int64) * SPLIT + offs_s) * row_len
            lse = tl.load(rows + BLOCK_D, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
            top = tl.max(lse, 0)
            top = tl.where(top == float("-inf"), 0.0, top)
            w = tl.math.exp2(lse - top)
            total = tl.sum(w, 0)
            w = w / tl.where(total > 0, total, 1.0)
            parts = tl.load(rows[:, None] + offs_d[None, :], mask=mask_s[:, None], other=0.0, cache_modifier=".cg")
            tl.store(o_ptr + o_off, tl.sum(parts * w[:, None], 0).to(o_ptr.dtype.element_ty), mask=mask_d)
            tl.store(cnt_ptr + bh, 0)  # the ticket counter back to 0 for the next launch
            if RELEASE:
                _release_head(rel_ptr, h, k_end, share, HEAD_DIM, SPAN)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, part_ptr, cnt_ptr,
    NQ, PAGE, qk_scale,
    stride_mb, stride_mh,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kd,
    stride_tb, stride_th, stride_tw,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    """Query head ``program_id(0) % NQ`` of sequence ``program_id(0) // NQ`` over split ``program_id(1)``."""
    bh, split = tl.program_id(0), tl.program_id(1)
    if PDL:
        _prefetch_kv_tiles(bh, split, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, NQ, PAGE, stride_mb,
                           stride_mh, stride_kp, stride_ks, stride_kd, stride_tb, stride_th, stride_tw, HEAD_DIM,
                           BLOCK_D, SPLIT, BLOCK_N)
    dependent_launch(PDL)
    _attend_head(bh, split, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, part_ptr, cnt_ptr,
                 NQ, PAGE, qk_scale, stride_mb, stride_mh, stride_qb, stride_qh, stride_qd, stride_kp, stride_ks,
                 stride_kd, stride_tb, stride_th, stride_tw, stride_ob, stride_oh, stride_od, cnt_ptr, 0, 1,
                 HEAD_DIM, BLOCK_D, SPLIT, BLOCK_N, BLOCK_SPLIT, ROWS, IEEE, UPCAST, False, 1)


def split_partials(batch: int, heads: int, head_dim: int, split: int) -> int:
    """The fp32 partials a launch of ``split`` splits per (sequence, head) leaves: each split's output, then
    its log2-sum-exp."""
    return batch * heads * split * (max(16, next_power_of_2(head_dim)) + 1)


def launch_paged_decode(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q`` ``[batch, heads, d]``, ``pages`` ``[2, num_pages, page_size, d]``, ``block_tables``
    ``[batch, kv_heads, width]`` int32, ``head_to_kv`` ``[heads]`` or ``[batch, heads]`` (-1: a free slot),
    ``lengths``/``starts`` ``[batch]`` int32 -> ``[batch, heads, d]`` (into ``out`` when given). ``split``:
    programs per (sequence, head), from the pages' capacity."""
    batch, nq, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    if batch * nq == 0:
        return out
    k_pages, v_pages = pages[0], pages[1]
    block_d = max(16, next_power_of_2(head_dim))
    if split > 1:
        partials = scratch(q.device, split_partials(batch, nq, head_dim, split))
        tickets = counters(q.device, batch * nq)
    else:
        partials, tickets = out, lengths  # never read with one split
    _paged_decode_kernel[(batch * nq, split)](
        q, k_pages, v_pages, block_tables, head_to_kv, lengths, starts, out, partials, tickets,
        nq, pages.shape[2], scale * LOG2E,
        *((0, head_to_kv.stride(0)) if head_to_kv.dim() == 1 else head_to_kv.stride()),
        *q.stride(), *k_pages.stride(), *block_tables.stride(), *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLIT=split, BLOCK_N=BLOCK_N,
        BLOCK_SPLIT=max(2, next_power_of_2(split)), ROWS=QUERY_ROWS, **dot_flags(q.dtype),
        **pdl_flags(q.device, "decode"),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
