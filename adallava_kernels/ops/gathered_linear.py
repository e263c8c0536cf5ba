"""Gathered linear layers: multiply by a subset of a weight's rows or columns, read in place.

The two primitives of the masked MLP (and of the masked attention's
projections):

- :func:`row_gathered_linear`: ``y = x @ W[rows].T`` (gate, up; q/k/v of active heads);
- :func:`col_gathered_linear`: ``y = x @ W[:, cols].T`` (down; o_proj over active heads).

The kernels read the weight through the int32 index list: no gathered copy
of the weight is made, and the grid covers only the active rows (columns are
the reduction, so their count sets the loop length). Accumulation is fp32.

A column gather of a row-major ``[out, in]`` weight reads ``in``-strided
elements. :func:`prepare_column_gather` returns the same matrix stored
column-major (one transposed copy per model, not per plan), so gathered
columns are contiguous rows in memory; the kernels take any strides, so both
layouts work and give the same result.

Two regimes: prefill (more than :data:`DECODE_MAX_TOKENS` rows of ``x``) uses
large tiles for ``tl.dot``; decode uses 16-row tiles and splits the column
gather's reduction across programs, so that a handful of tokens still spread
the weight reads over the whole GPU (the cost of decode is the active weight
bytes).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2
from .layout import prepare_column_gather
from .rms_norm import check_norm_weight, normed_tile, rms_scale
from .workspace import counters, scratch
from .triton_utils import (DECODE_MAX_TOKENS, autotuned, config, dependent_launch, dot, dot_flags, min_per_split,
                           multiprocessors, pdl_flags, PREFETCH_TILES, prefetch_lines, regime, smallest_block)

__all__ = [
    "COL_CONFIGS",
    "ROW_CONFIGS",
    "DECODE_MAX_TOKENS",
    "row_gathered_linear",
    "col_gathered_linear",
    "swiglu_gathered",
    "prepare_column_gather",
]


def _config(bm, bn, bk, warps, stages, band=8):
    return config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BAND_M=band)


# Every config below passes the static check of its compiled sm_90 code at LLaVA-1.5-7B shapes, batch 1 and
# 16 (tests/test_kernels_static.py, bench/static.py): 16-byte asynchronous weight loads, at least 2 buffers
# of each weight tile, at least 32 KiB in flight per SM, a grid of at least one program per SM with no
# 1.0-1.5 wave tail, no spills. Configs that failed it are gone: BLOCK_N 128 at decode (86 programs on
# 132 SMs, 255 registers), BLOCK_N 64 / BLOCK_K 256 (1.3 waves, spills), and the row gather's BLOCK_N 64 / BLOCK_K
# 128 once the norm came inside it (its x, norm-weight, gate and up tiles, 3 deep, need 120 KiB of shared memory: one
# program per SM, 1.3 waves; the H200 sweep of 2026-12-04 had it within 0.4% of BLOCK_N 32 where it won).
ROW_CONFIGS = {
    # Prefill, many tokens: compute-bound tiles for tl.dot. SwiGLU holds two fp32 accumulators: tiles of
    # 128 x 128 with 64-deep K spill at 4 or 8 warps (and 128 x 256 needs 240 KB of shared memory), so the
    # wide tiles take a 32-deep K, or are halved.
    "prefill": [
        _config(128, 128, 32, warps=8, stages=3),
        _config(128, 64, 64, warps=8, stages=4),
        _config(64, 128, 64, warps=4, stages=4),
        _config(64, 64, 64, warps=4, stages=3),
    ],
    # Decode, 1 to 16 tokens: memory-bound; a 16-row tile is the smallest tl.dot takes, and narrow, deep
    # weight tiles keep many loads in flight over many programs.
    "decode": [
        _config(16, 32, 128, warps=4, stages=4, band=1),
        _config(16, 32, 256, warps=4, stages=4, band=1),
    ],
}
# The column gather reads each tile's column indices one iteration ahead (:func:`_col_loop`), so its weight
# tile is as deep as a dense one: num_stages - 1 buffers (5 stages: 4).
COL_CONFIGS = {
    "prefill": [
        _config(128, 128, 64, warps=8, stages=3),
        _config(128, 64, 64, warps=8, stages=4),
        _config(64, 128, 32, warps=4, stages=4),
    ],
    "decode": [
        _config(16, 64, 128, warps=4, stages=5, band=1),
        _config(16, 64, 64, warps=4, stages=7, band=1),
    ],
}
INTERPRETER_CONFIGS = [_config(16, 32, 32, warps=4, stages=1, band=2)]

_TUNE_KEY = ["M_BUCKET", "N", "K", "IEEE"]


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND_M: tl.constexpr):
    # Banded launch order: the BAND_M row tiles of a band share each weight tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_band = BAND_M * num_pid_n
    first_m = (pid // per_band) * BAND_M
    band_rows = tl.minimum(num_pid_m - first_m, BAND_M)
    pid_m = first_m + (pid % per_band) % band_rows
    pid_n = (pid % per_band) // band_rows
    return pid_m, pid_n


@triton.jit
def _k_share(pid_k, k_end, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # Split pid_k's columns: an equal share of [0, k_end), starting on a BLOCK_K boundary.
    share = tl.cdiv(tl.cdiv(k_end, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * share
    return k_lo, tl.minimum(k_end, k_lo + share)


@triton.jit
def _counted_end(count_ptr, K, COUNTED: tl.constexpr, DENSE: tl.constexpr):
    # The columns that count: the device count of a padded list (DENSE: every column or none).
    k_end = K
    if COUNTED:
        k_end = tl.minimum(tl.load(count_ptr), K)
        if DENSE:
            k_end = tl.where(k_end > 0, K, 0)
    return k_end


@triton.jit
def _prefetch_row_tiles(pid, pid_k, w1_ptr, w2_ptr, rows_ptr, M, N, K, stride_w1n, stride_w1k, stride_w2n,
                        stride_w2k, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BAND_M: tl.constexpr):
    """Before the PDL wait: the first weight tiles of tile ``pid``, split ``pid_k`` (rows from the plan's list)
    into L2."""
    _, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, BAND_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + offs_n, mask=offs_n < N, other=-1)
    k_lo, k_hi = _k_share(pid_k, K, SPLIT_K, BLOCK_K)
    prefetch_lines(w1_ptr, rows, rows >= 0, stride_w1n, k_lo, k_hi, stride_w1k, PREFETCH_TILES * BLOCK_K)
    if SWIGLU:
        prefetch_lines(w2_ptr, rows, rows >= 0, stride_w2n, k_lo, k_hi, stride_w2k, PREFETCH_TILES * BLOCK_K)


@triton.jit
def _prefetch_col_tiles(pid, pid_k, w_ptr, wd_ptr, cols_ptr, count_ptr, M, N, K, stride_wn, stride_wk, stride_dn,
                        stride_dk, COUNTED: tl.constexpr, DENSE: tl.constexpr, DENSE_WHEN_FULL: tl.constexpr,
                        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BAND_M: tl.constexpr):
    """Before a wait (PDL's, or a phase's): the first weight tiles of tile ``pid``, split ``pid_k``, into L2,
    from the loop the kernel will take (the count and column list are the plan's)."""
    _, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, BAND_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_end = _counted_end(count_ptr, K, COUNTED, DENSE)
    k_lo, k_hi = _k_share(pid_k, k_end, SPLIT_K, BLOCK_K)
    if DENSE:
        prefetch_lines(w_ptr, offs_n, offs_n < N, stride_wn, k_lo, k_hi, stride_wk, PREFETCH_TILES * BLOCK_K)
    else:
        full = k_end < 0  # False: a gathered loop, unless DENSE_WHEN_FULL finds every column counted
        if DENSE_WHEN_FULL:
            full = k_end == K
        if full:
            prefetch_lines(wd_ptr, offs_n, offs_n < N, stride_dn, k_lo, k_hi, stride_dk, PREFETCH_TILES * BLOCK_K)
        else:
            offs_k = k_lo + tl.arange(0, PREFETCH_TILES * BLOCK_K)
            listed = offs_k < k_hi
            cols = tl.load(cols_ptr + offs_k, mask=listed, other=0)
            prefetch_lines(w_ptr, cols, listed, stride_wk, pid_n * BLOCK_N, N, stride_wn, BLOCK_N)


@triton.jit
def _phase_col_tile(index, tiles, w_ptr, wd_ptr, cols_ptr, count_ptr, k_end, M, N, K, stride_wn, stride_wk,
                    stride_dn, stride_dk, DENSE: tl.constexpr, DENSE_WHEN_FULL: tl.constexpr, SPLIT_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """The consuming phase's program ``index`` of a phased kernel (its ticket past the phase before): a counted
    column gather's tile and split, split by split, its first weight lines asked of L2 (PREFETCH: compiled
    code) while what it waits for finishes, and its share ``[k_lo, k_hi)`` of the counted columns. Returns
    ``pid, pid_k, k_lo, k_hi``."""
    pid = index % tiles
    pid_k = index // tiles
    if PREFETCH:
        _prefetch_col_tiles(pid, pid_k, w_ptr, wd_ptr, cols_ptr, count_ptr, M, N, K, stride_wn, stride_wk, stride_dn,
                            stride_dk, True, DENSE, DENSE_WHEN_FULL, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, 1)
    k_lo, k_hi = _k_share(pid_k, k_end, SPLIT_K, BLOCK_K)
    return pid, pid_k, k_lo, k_hi


@triton.jit
def _epilogue(acc, offs_m, offs_n, mask_m, mask_n, y_ptr, stride_ym, stride_yn, res_ptr, stride_rm, stride_rn,
              part_ptr, cnt_ptr, pid_m, pid_n, pid_k, N,
              SPLIT_K: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write a gather's fp32 tile ``acc`` to y where ``mask_n``, plus the residual with RESIDUAL (read within
    the bounds alone, so whole vectors load). With SPLIT_K > 1 each split writes its partial tile to
    part_ptr and takes a ticket (one atomic a program); the last of a tile sums the partials in split order
    (bitwise repeatable), adds the residual, writes y and puts the ticket counter back to 0."""
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    bounds = mask_m[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if RESIDUAL:
            res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=bounds,
                          other=0.0)
            acc += res.to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_parts = part_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(tile_parts + pid_k * (BLOCK_M * BLOCK_N) + local, acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket publishes it
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last split of this tile: the sum, in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(tile_parts + s * (BLOCK_M * BLOCK_N) + local, cache_modifier=".cg")
            if RESIDUAL:
                res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=bounds,
                              other=0.0)
                total += res.to(tl.float32)
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile, 0)  # the ticket counter back to 0 for the next launch


@triton.jit
def _row_tile(
    pid, pid_k, x_ptr, w1_ptr, w2_ptr, rows_ptr, y_ptr, res_ptr, part_ptr, cnt_ptr, norm_ptr, eps, M, N, K,
    stride_xm, stride_xk, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_ym, stride_yn,
    stride_rm, stride_rn,
    SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BAND_M: tl.constexpr,
):
    """Output tile ``pid`` (in banded order), split ``pid_k``, of :func:`_row_gather_kernel`."""
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, BAND_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=-1)
    # -1 marks the free slots of a list padded to its capacity (a plan bound as data), at its end:
    # a tile of free slots has nothing to compute, and a free slot's weight row is never read.
    if tl.max(rows, 0) < 0:
        return
    mask_n = mask_n & (rows >= 0)
    rows = rows.to(tl.int64)
    k_lo, k_hi = _k_share(pid_k, K, SPLIT_K, BLOCK_K)

    offs_k = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w1_ptrs = w1_ptr + rows[None, :] * stride_w1n + offs_k[:, None] * stride_w1k
    w2_ptrs = w2_ptr + rows[None, :] * stride_w2n + offs_k[:, None] * stride_w2k
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
        mask_k = offs_k < k_hi - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if NORM:
            a, squares = normed_tile(a, norm_ptr + 0 * offs_m[:, None] + (offs_k + k * BLOCK_K)[None, :],
                                     mask_m[:, None] & mask_k[None, :], squares, UPCAST)
        b1 = tl.load(w1_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc1 = dot(a, b1, acc1, IEEE, UPCAST)
        if SWIGLU:
            b2 = tl.load(w2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc2 = dot(a, b2, acc2, IEEE, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_w1k
        w2_ptrs += BLOCK_K * stride_w2k
    if NORM:
        inv_rms = rms_scale(squares, K, eps)
        acc1 = acc1 * inv_rms[:, None]
        acc2 = acc2 * inv_rms[:, None]
    if SWIGLU:
        acc1 = acc1 * tl.sigmoid(acc1) * acc2
    _epilogue(acc1, offs_m, offs_n, mask_m, mask_n, y_ptr, stride_ym, stride_yn, res_ptr, stride_rm, stride_rn,
              part_ptr, cnt_ptr, pid_m, pid_n, pid_k, N, SPLIT_K, RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def _row_gather_kernel(
    x_ptr, w1_ptr, w2_ptr, rows_ptr, y_ptr, res_ptr, part_ptr, cnt_ptr, norm_ptr, eps,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_ym, stride_yn,
    stride_rm, stride_rn,
    SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BAND_M: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * w1[rows[n], k]; with SWIGLU, silu(that) * (same with w2); with RESIDUAL,
    plus res[m, n]. SPLIT_K > 1 (not with SWIGLU): program_id(1) takes an equal share of K, and the splits
    meet in the same launch (:func:`_epilogue`). NORM (SPLIT_K 1): x goes through transformers' RMSNorm
    with weight norm_ptr first, inside the reduction (:func:`~.rms_norm.normed_tile`)."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    if PDL:
        _prefetch_row_tiles(pid, pid_k, w1_ptr, w2_ptr, rows_ptr, M, N, K, stride_w1n, stride_w1k, stride_w2n,
                            stride_w2k, SWIGLU, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, BAND_M)
    dependent_launch(PDL)
    _row_tile(pid, pid_k, x_ptr, w1_ptr, w2_ptr, rows_ptr, y_ptr, res_ptr, part_ptr, cnt_ptr, norm_ptr, eps, M, N, K,
              stride_xm, stride_xk, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_ym, stride_yn,
              stride_rm, stride_rn, SWIGLU, SPLIT_K, RESIDUAL, NORM, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BAND_M)


@triton.jit
def _col_loop(acc, x_ptr, w_ptr, cols_ptr, xmask_ptr, offs_m, offs_n, mask_m, mask_n, k_lo, k_hi, K,
              stride_xm, stride_xk, stride_wn, stride_wk, stride_mm, stride_mk,
              XMASK: tl.constexpr, DENSE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """acc += x[:, k_lo:k_hi] @ w[:, cols[k_lo:k_hi]].T (DENSE: cols[k] is k).

    The gather loads the next tile's column indices into registers while this tile is reduced. Loaded in the
    same iteration, they would make the weight load one indirection deep, and Triton's pipeliner gives such a
    load (num_stages - 1) / 2 buffers instead of num_stages - 1 (2 instead of 4 at 5 stages: a partial
    layer's o_proj and down had a third of a dense layer's bytes in flight)."""
    ahead = k_lo + tl.arange(0, BLOCK_K)
    if not DENSE:
        ahead = tl.load(cols_ptr + ahead, mask=ahead < k_hi, other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if DENSE:
            # Tiles start on BLOCK_K and the splits end on it or at K: a bound known to divide by 16 keeps
            # the mask constant over a vector, so the weight loads as whole vectors.
            counted = offs_k < K
            cols = offs_k
        else:
            counted = offs_k < k_hi
            cols = ahead.to(tl.int64)
            nxt = offs_k + BLOCK_K
            ahead = tl.load(cols_ptr + nxt, mask=nxt < k_hi, other=0)
        row_mask = mask_m[:, None] & (offs_k < K)[None, :]
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=row_mask, other=0.0)
        keep = counted[None, :]
        if XMASK:
            keep = keep & (tl.load(xmask_ptr + offs_m[:, None] * stride_mm + offs_k[None, :] * stride_mk,
                                   mask=row_mask, other=0) != 0)
        a = tl.where(keep, a, 0.0)
        b = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + cols[:, None] * stride_wk,
            mask=counted[:, None] & mask_n[None, :], other=0.0,
        )
        acc = dot(a, b, acc, IEEE, UPCAST)
    return acc


@triton.jit
def _col_tile(
    pid, pid_k, x_ptr, w_ptr, cols_ptr, y_ptr, count_ptr, xmask_ptr, res_ptr, part_ptr, cnt_ptr, wd_ptr,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_mm, stride_mk, stride_rm,
    stride_rn, stride_dn, stride_dk,
    SPLIT_K: tl.constexpr, COUNTED: tl.constexpr, XMASK: tl.constexpr, RESIDUAL: tl.constexpr,
    DENSE: tl.constexpr, DENSE_WHEN_FULL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BAND_M: tl.constexpr,
):
    """Output tile ``pid`` (in banded order), split ``pid_k``, of :func:`_col_gather_kernel`."""
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, BAND_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_end = _counted_end(count_ptr, K, COUNTED, DENSE)
    k_lo, k_hi = _k_share(pid_k, k_end, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DENSE_WHEN_FULL:
        if k_end == K:
            acc = _col_loop(acc, x_ptr, wd_ptr, cols_ptr, xmask_ptr, offs_m, offs_n, mask_m, mask_n, k_lo, k_hi, K,
                            stride_xm, stride_xk, stride_dn, stride_dk, stride_mm, stride_mk,
                            XMASK, True, IEEE, UPCAST, BLOCK_K)
        else:
            acc = _col_loop(acc, x_ptr, w_ptr, cols_ptr, xmask_ptr, offs_m, offs_n, mask_m, mask_n, k_lo, k_hi, K,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_mm, stride_mk,
                            XMASK, False, IEEE, UPCAST, BLOCK_K)
    else:
        acc = _col_loop(acc, x_ptr, w_ptr, cols_ptr, xmask_ptr, offs_m, offs_n, mask_m, mask_n, k_lo, k_hi, K,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_mm, stride_mk,
                        XMASK, DENSE, IEEE, UPCAST, BLOCK_K)
    _epilogue(acc, offs_m, offs_n, mask_m, mask_n, y_ptr, stride_ym, stride_yn, res_ptr, stride_rm, stride_rn,
              part_ptr, cnt_ptr, pid_m, pid_n, pid_k, N, SPLIT_K, RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def _col_gather_kernel(
    x_ptr, w_ptr, cols_ptr, y_ptr, count_ptr, xmask_ptr, res_ptr, part_ptr, cnt_ptr, wd_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_mm, stride_mk, stride_rm, stride_rn,
    stride_dn, stride_dk,
    SPLIT_K: tl.constexpr, COUNTED: tl.constexpr, XMASK: tl.constexpr, RESIDUAL: tl.constexpr,
    DENSE: tl.constexpr, DENSE_WHEN_FULL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BAND_M: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * w[n, cols[k]] (+ res[m, n] with RESIDUAL).

    COUNTED: only the first count[0] columns count (a list padded to its capacity, read on the device);
    XMASK: x[m, k] counts only where xmask[m, k] != 0 (a row whose plan lacks that unit). DENSE: cols[k] is k
    over the counted part (a layer kept whole or skipped): the columns are indexed directly, so a weight
    stored row-major loads as whole vectors, and cols is never read. DENSE_WHEN_FULL (with COUNTED): when
    the count is K (a union that keeps every column), the columns are read as DENSE from wd, the same
    weight in its row-major layout, instead of gathered from w (its column-major copy): the device count
    picks the loop, so one launch serves both. x and its mask are read as whole vectors across the row
    (the row's width K a multiple of 16 makes them 16-byte loads); a column that does not count is taken
    as 0, whatever x holds there (NaN included). The weight columns of free slots are never read.

    SPLIT_K > 1: program_id(1) takes an equal share of the counted columns, and the splits meet in the
    same launch (:func:`_epilogue`)."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    if PDL:
        _prefetch_col_tiles(pid, pid_k, w_ptr, wd_ptr, cols_ptr, count_ptr, M, N, K, stride_wn, stride_wk, stride_dn,
                            stride_dk, COUNTED, DENSE, DENSE_WHEN_FULL, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, BAND_M)
    dependent_launch(PDL)
    _col_tile(pid, pid_k, x_ptr, w_ptr, cols_ptr, y_ptr, count_ptr, xmask_ptr, res_ptr, part_ptr, cnt_ptr, wd_ptr,
              M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_mm, stride_mk,
              stride_rm, stride_rn, stride_dn, stride_dk, SPLIT_K, COUNTED, XMASK, RESIDUAL, DENSE, DENSE_WHEN_FULL,
              IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BAND_M)


ROW_KERNELS = autotuned(_row_gather_kernel, ROW_CONFIGS, INTERPRETER_CONFIGS, _TUNE_KEY)
COL_KERNELS = autotuned(_col_gather_kernel, COL_CONFIGS, INTERPRETER_CONFIGS, _TUNE_KEY)


def _m_bucket(m: int) -> int:
    # Tune once per power of two of the token count, not once per length.
    return next_power_of_2(m)


_MIN_K_PER_SPLIT = min_per_split(256)
_SMALLEST_DECODE_N = min(smallest_block("BLOCK_N", table, INTERPRETER_CONFIGS, "decode")
                         for table in (ROW_CONFIGS, COL_CONFIGS))


def _split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Reduction splits for decode: enough programs for two per SM, each split at least 2 K-blocks long
    (so its loop keeps its loads in flight)."""
    if regime(m) == "prefill" or k == 0:
        return 1
    tiles = cdiv(m, 16) * cdiv(n, _SMALLEST_DECODE_N)
    return max(1, min(cdiv(2 * multiprocessors(device), tiles), cdiv(k, _MIN_K_PER_SPLIT), 16))


def _split_workspace(m: int, n: int, split: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The partials (:func:`_split_partials`) and ticket counters of a split launch."""
    return scratch(device, _split_partials(m, n, split)), counters(device, _split_tickets(m, n))


def _split_partials(m: int, n: int, split: int) -> int:
    """The fp32 partials of a split launch: room for any decode config's tiles (BLOCK_M 16; BLOCK_N from 32 up
    to 128, each dividing 128)."""
    return split * cdiv(m, 16) * 16 * cdiv(n, 128) * 128


def _split_tickets(m: int, n: int) -> int:
    """The ticket counters of a split launch's output tiles, its smallest tiles counted."""
    return cdiv(m, 16) * cdiv(n, _SMALLEST_DECODE_N)


def _launch_rows(x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, rows: torch.Tensor, out: torch.Tensor,
                 residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0):
    m, k = x2.shape
    n = rows.numel()
    w2_ = w1 if w2 is None else w2
    # SwiGLU and the norm need the whole sum in one program.
    split = 1 if w2 is not None or norm_weight is not None else _split_k(m, n, k, x2.device)
    partials, tickets = _split_workspace(m, n, split, x2.device) if split > 1 else (out, rows)
    res_strides = (0, 0) if residual is None else (residual.stride(0), residual.stride(1))
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    ROW_KERNELS[regime(m)][grid](
        x2, w1, w2_, rows, out, x2 if residual is None else residual, partials, tickets,
        x2 if norm_weight is None else norm_weight, eps, m, n, k, _m_bucket(m),
        x2.stride(0), x2.stride(1), w1.stride(0), w1.stride(1), w2_.stride(0), w2_.stride(1),
        out.stride(0), out.stride(1), *res_strides,
        SWIGLU=w2 is not None, SPLIT_K=split, RESIDUAL=residual is not None, NORM=norm_weight is not None,
        **dot_flags(x2.dtype), **pdl_flags(x2.device, regime(m)),
    )
    return out


def _launch_cols(x2: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, out: torch.Tensor,
                 count: torch.Tensor | None = None, x_mask: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, dense: bool = False,
                 dense_weight: torch.Tensor | None = None):
    m, k = x2.shape
    n = w.shape[0]
    if k == 0:
        return out.zero_() if residual is None else out.copy_(residual)
    split = _split_k(m, n, k, x2.device)
    partials, tickets = _split_workspace(m, n, split, x2.device) if split > 1 else (out, cols)
    mask_strides = (0, 0) if x_mask is None else (x_mask.stride(0), x_mask.stride(1))
    res_strides = (0, 0) if residual is None else (residual.stride(0), residual.stride(1))
    wd = w if dense_weight is None else dense_weight
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    COL_KERNELS[regime(m)][grid](
        x2, w, cols, out, cols if count is None else count, x2 if x_mask is None else x_mask,
        x2 if residual is None else residual, partials, tickets, wd, m, n, k, _m_bucket(m),
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1), *mask_strides,
        *res_strides, wd.stride(0), wd.stride(1), SPLIT_K=split, COUNTED=count is not None,
        XMASK=x_mask is not None, RESIDUAL=residual is not None, DENSE=dense,
        DENSE_WHEN_FULL=dense_weight is not None and count is not None and not dense, **dot_flags(x2.dtype),
        **pdl_flags(x2.device, regime(m)),
    )
    return out


# -- public launchers --------------------------------------------------------
# Input checks live in the ops that call these (masked_mlp, masked_attention);
# these check only what the kernels themselves rely on.


def _flat(x: torch.Tensor) -> torch.Tensor:
    # Not reshape(-1, k): that is ambiguous when k == 0 (no active neuron).
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _out(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    shape = (*x.shape[:-1], n)
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {x.dtype} tensor of shape {list(shape)} on {x.device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
    return out


def _index(index: torch.Tensor) -> torch.Tensor:
    return index if index.dtype == torch.int32 else index.to(torch.int32)


def row_gathered_linear(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None, *,
                        residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                        eps: float = 0.0):
    """``x @ w[rows].T`` (plus ``residual``, the result's shape): ``x`` ``[..., in]``, ``w`` ``[out, in]``,
    ``rows`` int indices -> ``[..., len(rows)]``. With every row (``rows`` = ``arange(out)``) it is the dense
    projection a decode step runs for a layer kept whole: in decode the reduction is split over programs
    that meet in the same launch, bitwise repeatable.

    ``norm_weight`` ``[in]`` (not with ``residual``): ``x`` is taken through transformers' RMSNorm with that
    weight and ``eps`` first, inside the same pass, as :func:`swiglu_gathered` does (a decode step's final
    norm inside ``lm_head``); the reduction is then not split."""
    check_norm_weight(norm_weight, x)
    if norm_weight is not None and residual is not None:
        raise ValueError("row_gathered_linear takes norm_weight or residual, not both")
    y = _out(x, rows.numel(), out)
    if y.numel():
        flat = math.prod(y.shape[:-1])
        _launch_rows(_flat(x), w, None, _index(rows), y.view(flat, rows.numel()),
                     None if residual is None else residual.reshape(flat, rows.numel()), norm_weight, eps)
    return y


def swiglu_gathered(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None,
    *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
):
    """``silu(x @ w_gate[rows].T) * (x @ w_up[rows].T)`` in one pass, written once at width ``len(rows)``.

    ``norm_weight`` ``[in]``: ``x`` is taken through transformers' RMSNorm with that weight and ``eps`` first,
    inside the same pass (the post-attention norm of a decode layer, fused; see
    :func:`~.rms_norm.normed_tile` for its one rounding)."""
    check_norm_weight(norm_weight, x)
    y = _out(x, rows.numel(), out)
    if y.numel():
        _launch_rows(_flat(x), w_gate, w_up, _index(rows), y.view(math.prod(y.shape[:-1]), rows.numel()),
                     norm_weight=norm_weight, eps=eps)
    return y


def col_gathered_linear(
    x: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, out: torch.Tensor | None = None, *,
    count: torch.Tensor | None = None, x_mask: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    dense: bool = False, dense_weight: torch.Tensor | None = None,
):
    """``x @ w[:, cols].T``: ``x`` ``[..., len(cols)]``, ``w`` ``[out, in]`` (any strides) -> ``[..., out]``.

    For a plan bound as data: ``count`` (int32 ``[1]``, on the device) keeps only the first ``count[0]``
    entries of ``cols`` and of ``x``'s last dim (the rest is a padded list's free slots: their weight
    columns are never read); ``x_mask`` ``[rows of x, len(cols)]`` keeps ``x[m, k]`` only where it is
    nonzero (the units a row's own plan lacks in a batch's union). ``x`` and ``x_mask`` are read as whole
    rows, 16 bytes a load: an element that does not count is taken as 0 whatever it holds (NaN included).
    ``residual`` (the shape of the result): added to it in the same pass (a decoder layer's residual
    stream). In decode the reduction is split over programs that meet in the same launch, in a fixed
    order (:mod:`.workspace`): the result is bitwise repeatable. ``dense``: ``cols`` is ``arange`` over its
    counted part (a decode layer every row keeps whole or skips, its weight in its own row-major layout):
    the kernel indexes the columns directly, as a dense projection that ``count`` may switch off.
    ``dense_weight`` (with ``count``; ``w`` a column-major copy): the same matrix as ``w`` in its row-major
    layout; when ``count`` is every column (a batch whose rows all keep the layer whole) the kernel reads it
    as a dense projection instead of gathering ``w``'s columns, so a full layer costs what a dense one does.
    """
    if dense_weight is not None and (dense_weight.shape != w.shape or dense_weight.dtype != w.dtype
                                     or dense_weight.device != w.device):
        raise ValueError(f"dense_weight must be w's matrix ({w.dtype} {list(w.shape)} on {w.device}), got "
                         f"{dense_weight.dtype} {list(dense_weight.shape)} on {dense_weight.device}")
    y = _out(x, w.shape[0], out)
    if y.numel():
        rows = math.prod(y.shape[:-1])
        _launch_cols(_flat(x), w, _index(cols), y.view(rows, w.shape[0]), count, x_mask,
                     None if residual is None else residual.reshape(rows, w.shape[0]), dense, dense_weight)
    return y
