"""A decode layer's attention and ``o_proj`` in one launch: the paged attention and the column gather as two
phases of one kernel.

A decode step runs them as two launches: the paged decode attention, each row over its own heads' pages
(:mod:`.paged_decode_kernel`), then ``o_proj`` over the union's columns with the residual
(:func:`~.gathered_linear.col_gathered_linear`). Each ``o_proj`` program reduces over a share of the
columns, which are the outputs of a few heads: it needs those heads' attention, not every head's. The
kernel boundary waits for more than the data asks, and costs what every kernel of a captured step pays
(``bench.boundary`` measures it beside a phase boundary inside one kernel).

:func:`paged_attention_o_proj_phased` runs the same programs, with the same code, in one grid, ordered as
:mod:`.phased_mlp` orders its phases:

- a program takes a ticket, and the ticket names its work: tickets ``[0, A)`` are the attention's
  (head slot, row, split) programs, head by head; the rest are ``o_proj``'s tiles, split by split. A
  program only waits for tickets below its own, held by programs that started before it, so no wait can
  deadlock; under the interpreter, which runs programs in order, no wait spins;
- the program that makes a (row, head) output final (the head's only split, the last split to finish,
  which combines them, or split 0 of a head the row lacks, which writes its 0) releases a count of every
  ``o_proj`` share its columns fall in;
- an ``o_proj`` program asks L2 for its first weight lines, waits (acquire loads, about 100 ns apart) for
  its share's count of (row, head) outputs, and reduces it; the shares meet as the column gather's do
  (:mod:`.workspace`: bitwise repeatable);
- the last program to finish puts the phases' counters back to 0.

The two launches' workspaces are disjoint parts of one (they run at once here). The result is the two
launches' bit for bit where their tiles and splits are the same (the interpreter's configs).

:func:`attention_block_phased` puts the launch before them in front as a third phase: the head projection
(q, k and v of the union's slots of the normed input, RoPE, K and V appended to the pages:
:func:`~.head_projection._project_head`, the paged decode step's programs, K and V slots first). The
program that writes a slot's pair block releases that slot's count; an attention program waits for its row's
q, K and V slots alone, so the first heads attend while later slots are still projected. A layer is then
two launches: this one and the MLP's (:mod:`.phased_mlp`).

With ``ADALLAVA_PDL=1`` a program prefetches what its program ID names in the first phase (the projection's
weight rows, or the attention's K and V) before it waits for the kernel before, and takes its ticket after
the wait, as :mod:`.phased_mlp`'s do.

Decode only (at most ``DECODE_MAX_TOKENS`` rows). Off unless ``ADALLAVA_PHASED_ATTENTION`` is ``1`` (two
phases) or ``qkv`` (three; :func:`phased_attention_mode`): no GPU has measured either yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import cdiv, check_tensor, next_power_of_2
from .gathered_linear import _col_tile, _counted_end, _phase_col_tile, _split_k, _split_partials, _split_tickets
from .head_projection import CONFIGS as PROJECTION_CONFIGS, INTERPRETER_CONFIGS as PROJECTION_INTERPRETER_CONFIGS
from .head_projection import _block_h, _prefetch_head_tiles, _project_head
from .paged_attention import check_head_to_kv
from .paged_decode_kernel import BLOCK_N, NUM_WARPS, QUERY_ROWS, _attend_head, _prefetch_kv_tiles, split_partials
from .rms_norm import check_norm_weight
from .triton_utils import (DECODE_MAX_TOKENS, INTERPRET, LOG2E, config, dependent_launch, dot_flags, finish_phases,
                           pdl_flags, wait_at_least)
from . import tuning
from .workspace import counters, scratch

__all__ = ["PHASED_ATTENTION_ENV", "PHASED_ATTENTION_MODES", "attention_block_phased", "paged_attention_o_proj_phased",
           "phased_attention_enabled", "phased_attention_mode"]

PHASED_ATTENTION_ENV = "ADALLAVA_PHASED_ATTENTION"


def _with_projection(stages: int, projection: triton.Config, block_h: int, **blocks: int) -> triton.Config:
    """A config of this kernel: o_proj's ``blocks``, and the projection phase's tiles from the head projection's
    ``projection`` config with ``block_h`` rotation pairs a program."""
    return config(NUM_WARPS, stages, **blocks, BLOCK_MP=projection.kwargs["BLOCK_M"],
                  BLOCK_KP=projection.kwargs["BLOCK_K"], BLOCK_H=block_h)


# The head projection's decode pairs a program (whatever the head_dim).
_PAIRS = _block_h(128, "decode")
# The decode configs the sweep (bench.tune) times, the first the one launched without a table entry (and the
# one every test runs): o_proj's decode tile (64 outputs by 128 columns, one head at head_dim 128), and the
# projection phase's, the head projection's decode tile; num_stages for the kernel's loops. The second takes
# twice the pairs a projection program: half the programs (one wave at 7B, two an SM), each streaming twice the
# rows. The attention's own blocks are fixed (paged_decode_kernel). Never autotuned at run time
# (tuning.launch_fixed). Under the interpreter the separate launches' configs, so the results can be compared
# bit for bit.
CONFIGS = {"decode": [_with_projection(5, PROJECTION_CONFIGS["decode"][0], pairs, BLOCK_M=16, BLOCK_NO=64,
                                       BLOCK_KO=128) for pairs in (_PAIRS, 2 * _PAIRS)]}
INTERPRETER_CONFIGS = [_with_projection(5, PROJECTION_INTERPRETER_CONFIGS[0], _PAIRS, BLOCK_M=16, BLOCK_NO=32,
                                        BLOCK_KO=32)]
# The tuned table's key: rows, o_proj's outputs and columns, the projected head slots (0: q given).
KEY = ["M", "N", "K", "SLOTS"]
# Registers a thread may take: ptxas, left to itself, takes 96 and spills; with PDL's prefetch, 168 still
# spills. Shared memory holds an SM to two programs, and 192 registers a thread keep two.
MAX_REGISTERS = 192
# The counters after the two launches' tickets: the ticket counter, the programs finished, one count per share.
_SYNC_HEAD = tl.constexpr(2)


# ADALLAVA_PHASED_ATTENTION's values: what a decode layer's attention block runs as (unset, "" or "0": separate
# launches).
PHASED_ATTENTION_MODES = {"1": "o_proj", "qkv": "qkv"}


def phased_attention_mode() -> str | None:
    """What decode layers run their attention as: None (separate launches), ``"o_proj"``
    (``ADALLAVA_PHASED_ATTENTION=1``: the attention and ``o_proj`` one launch,
    :func:`paged_attention_o_proj_phased`) or ``"qkv"`` (``ADALLAVA_PHASED_ATTENTION=qkv``: q, k and v too, the
    whole block one launch, :func:`attention_block_phased`)."""
    value = os.environ.get(PHASED_ATTENTION_ENV, "")
    if value in ("", "0"):
        return None
    if value not in PHASED_ATTENTION_MODES:
        raise ValueError(f"{PHASED_ATTENTION_ENV} must be 0, 1 (the attention and o_proj one launch) or qkv (the "
                         f"projection too), got {value!r}")
    return PHASED_ATTENTION_MODES[value]


def phased_attention_enabled() -> bool:
    """Whether decode layers run attention and ``o_proj`` as phases of one launch (either mode of
    :func:`phased_attention_mode`)."""
    return phased_attention_mode() is not None


@triton.jit
def _phased_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, apart_ptr, acnt_ptr,
    w_ptr, wd_ptr, cols_ptr, count_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr, sync_ptr, error_ptr,
    x_ptr, wqkv_ptr, slots_ptr, cos_ptr, sin_ptr, pos_ptr, norm_ptr, eps,
    BATCH, NQ, PAGE, qk_scale, N, K, HIDDEN, SLOTS, KV_SLOTS, PAIR_BLOCKS,
    stride_mb, stride_mh,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kd,
    stride_tb, stride_th, stride_tw,
    stride_ob, stride_oh, stride_od,
    stride_wn, stride_wk, stride_dn, stride_dk, stride_rm, stride_rn, stride_ym, stride_yn,
    stride_xm, stride_xk, stride_qwn, stride_qwk, stride_cb, stride_cs, stride_cd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, DENSE: tl.constexpr,
    DENSE_WHEN_FULL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, COMPILED: tl.constexpr,
    SYNC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NO: tl.constexpr, BLOCK_KO: tl.constexpr, SPAN: tl.constexpr,
    PROJECT: tl.constexpr, BLOCK_MP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KP: tl.constexpr,
    PDL: tl.constexpr,
):
    """y = res + o @ w[:, cols[:count]].T, o [BATCH, NQ, HEAD_DIM] the paged attention of q (module docstring:
    the phases and their counters). o is scratch, contiguous: o_proj reads it as [BATCH, NQ * HEAD_DIM].
    apart/acnt: the attention's partials and tickets; part/cnt: o_proj's; sync: the ticket counter, the
    programs finished, each o_proj share's count of (row, head) outputs final, then (PROJECT) each projected
    slot's count of pair blocks written (0 before the launch, and after it); error: what a wait found
    unfinished under the interpreter. COMPILED: not the interpreter.

    PROJECT: q is first projected from x here, into the scratch at q_ptr, K and V appended to the pages
    (:func:`~.head_projection._project_head`: the union's SLOTS head slots of wqkv, the input norm inside,
    RoPE; one row tile, PAIR_BLOCKS programs a slot, the reduction whole), and an attention program waits
    for its row's q, K and V slots."""
    if PDL:
        _prefetch_first_phase(tl.program_id(0), k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, wqkv_ptr,
                              slots_ptr, BATCH, NQ, PAGE, HIDDEN, SLOTS, KV_SLOTS, PAIR_BLOCKS, stride_mb, stride_mh,
                              stride_kp, stride_ks, stride_kd, stride_tb, stride_th, stride_tw, stride_qwn, stride_qwk,
                              HEAD_DIM, BLOCK_D, SPLIT, BLOCK_N, PROJECT, BLOCK_H, BLOCK_KP)
    # The ticket after the wait: the kernel before may be a phased one, which puts these counters back to 0.
    dependent_launch(PDL)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    programs = BATCH * NQ * SPLIT + tl.cdiv(BATCH, BLOCK_M) * tl.cdiv(N, BLOCK_NO) * SPLIT_K
    used = _SYNC_HEAD + SPLIT_K
    if PROJECT:
        projected = SLOTS * PAIR_BLOCKS
        if ticket < projected:
            slot = _projected_slot(ticket, SLOTS, KV_SLOTS, PAIR_BLOCKS)
            # One row tile (pid_m 0, a tensor as the kernel's own program id is), the reduction whole (split 0 of
            # 1; its partials and tickets never used), RoPE on q and K, K and V to the pages, the norm inside.
            _project_head(ticket * 0, slot, 0, ticket % PAIR_BLOCKS, SLOTS, x_ptr, wqkv_ptr, slots_ptr, cos_ptr,
                          sin_ptr, q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, o_ptr, acnt_ptr, norm_ptr, eps, BATCH,
                          HIDDEN, 1, NQ + KV_SLOTS, PAIR_BLOCKS, NQ, KV_SLOTS, PAGE, stride_xm, stride_xk,
                          stride_qwn, stride_qwk, stride_cb, stride_cs, stride_cd, stride_qb, 0, stride_qh,
                          stride_qd, stride_kp, stride_ks, stride_tb, stride_th, stride_tw, HEAD_DIM, BLOCK_H, True,
                          1, True, True, IEEE, UPCAST, BLOCK_MP, BLOCK_KP)
            tl.debug_barrier()  # every thread's part of the slot is written before the count publishes it
            tl.atomic_add(sync_ptr + used + slot, 1, sem="release")
        else:
            _attention_or_o_proj(ticket - projected, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr,
                                 o_ptr, apart_ptr, acnt_ptr, w_ptr, wd_ptr, cols_ptr, count_ptr, res_ptr, y_ptr,
                                 part_ptr, cnt_ptr, sync_ptr, error_ptr, BATCH, NQ, PAGE, qk_scale, N, K, KV_SLOTS,
                                 PAIR_BLOCKS, stride_mb, stride_mh, stride_qb, stride_qh, stride_qd, stride_kp,
                                 stride_ks, stride_kd, stride_tb, stride_th, stride_tw, stride_ob, stride_oh,
                                 stride_od, stride_wn, stride_wk, stride_dn, stride_dk, stride_rm, stride_rn,
                                 stride_ym, stride_yn, HEAD_DIM, BLOCK_D, SPLIT, BLOCK_N, BLOCK_SPLIT, ROWS, SPLIT_K,
                                 DENSE, DENSE_WHEN_FULL, IEEE, UPCAST, COMPILED, BLOCK_M, BLOCK_NO, BLOCK_KO, SPAN,
                                 PROJECT)
        programs += projected
        used += SLOTS
    else:
        _attention_or_o_proj(ticket, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr,
                             apart_ptr, acnt_ptr, w_ptr, wd_ptr, cols_ptr, count_ptr, res_ptr, y_ptr, part_ptr,
                             cnt_ptr, sync_ptr, error_ptr, BATCH, NQ, PAGE, qk_scale, N, K, KV_SLOTS, PAIR_BLOCKS,
                             stride_mb, stride_mh, stride_qb, stride_qh, stride_qd, stride_kp, stride_ks, stride_kd,
                             stride_tb, stride_th, stride_tw, stride_ob, stride_oh, stride_od, stride_wn, stride_wk,
                             stride_dn, stride_dk, stride_rm, stride_rn, stride_ym, stride_yn, HEAD_DIM, BLOCK_D,
                             SPLIT, BLOCK_N, BLOCK_SPLIT, ROWS, SPLIT_K, DENSE, DENSE_WHEN_FULL, IEEE, UPCAST,
                             COMPILED, BLOCK_M, BLOCK_NO, BLOCK_KO, SPAN, PROJECT)
    finish_phases(sync_ptr, programs, used, SYNC)


@triton.jit
def _projected_slot(index, SLOTS, KV_SLOTS, PAIR_BLOCKS):
    """The head slot projection program ``index`` computes a pair block of: K and V slots first, then q, so the
    first attention programs' slots finish first."""
    return (index // PAIR_BLOCKS + SLOTS - KV_SLOTS * 2) % SLOTS


@triton.jit
def _prefetch_first_phase(pid, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, wqkv_ptr, slots_ptr, BATCH,
                          NQ, PAGE, HIDDEN, SLOTS, KV_SLOTS, PAIR_BLOCKS, stride_mb, stride_mh, stride_kp, stride_ks,
                          stride_kd, stride_tb, stride_th, stride_tw, stride_qwn, stride_qwk, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PROJECT: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_KP: tl.constexpr):
    """Before the PDL wait, from the program ID (the first programs start first, so it names the work its ticket
    most likely will): a first-phase program's first tiles into L2, the projection's weight rows (PROJECT) or
    the attention's K and V."""
    if PROJECT:
        if pid < SLOTS * PAIR_BLOCKS:
            _prefetch_head_tiles(_projected_slot(pid, SLOTS, KV_SLOTS, PAIR_BLOCKS), 0, pid % PAIR_BLOCKS, wqkv_ptr,
                                 slots_ptr, HIDDEN, stride_qwn, stride_qwk, HEAD_DIM, BLOCK_H, 1, BLOCK_KP)
    else:
        if pid < BATCH * NQ * SPLIT:
            h = pid // (BATCH * SPLIT)
            b = (pid // SPLIT) % BATCH
            _prefetch_kv_tiles(b * NQ + h, pid % SPLIT, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, NQ,
                               PAGE, stride_mb, stride_mh, stride_kp, stride_ks, stride_kd, stride_tb, stride_th,
                               stride_tw, HEAD_DIM, BLOCK_D, SPLIT, BLOCK_N)


@triton.jit
def _attention_or_o_proj(
    index, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, apart_ptr, acnt_ptr,
    w_ptr, wd_ptr, cols_ptr, count_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr, sync_ptr, error_ptr,
    BATCH, NQ, PAGE, qk_scale, N, K, KV_SLOTS, PAIR_BLOCKS,
    stride_mb, stride_mh,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kd,
    stride_tb, stride_th, stride_tw,
    stride_ob, stride_oh, stride_od,
    stride_wn, stride_wk, stride_dn, stride_dk, stride_rm, stride_rn, stride_ym, stride_yn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, DENSE: tl.constexpr,
    DENSE_WHEN_FULL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, COMPILED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NO: tl.constexpr, BLOCK_KO: tl.constexpr, SPAN: tl.constexpr,
    PROJECT: tl.constexpr,
):
    """The program ``index`` past the projection (if any): an attention program (head slot, row, split), head
    slot by head slot, then o_proj's tiles, split by split (:func:`_phased_attention_kernel`)."""
    heads = BATCH * NQ * SPLIT
    out_tiles = tl.cdiv(BATCH, BLOCK_M) * tl.cdiv(N, BLOCK_NO)
    k_end = _counted_end(count_ptr, K, True, DENSE)
    # Every o_proj share of the counted columns starts on a multiple of it (0: nothing is counted).
    share = tl.cdiv(tl.cdiv(k_end, SPLIT_K), BLOCK_KO) * BLOCK_KO
    if index < heads:
        # Head slot by head slot, so the first o_proj shares' heads finish first, whatever the batch.
        h = index // (BATCH * SPLIT)
        b = (index // SPLIT) % BATCH
        if PROJECT:
            _wait_for_projection(sync_ptr + _SYNC_HEAD + SPLIT_K, kvmap_ptr, b, h, NQ, KV_SLOTS, PAIR_BLOCKS,
                                 stride_mb, stride_mh, error_ptr, COMPILED)
        _attend_head(b * NQ + h, index % SPLIT, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr,
                     o_ptr, apart_ptr, acnt_ptr, NQ, PAGE, qk_scale, stride_mb, stride_mh, stride_qb, stride_qh,
                     stride_qd, stride_kp, stride_ks, stride_kd, stride_tb, stride_th, stride_tw, stride_ob,
                     stride_oh, stride_od, sync_ptr + _SYNC_HEAD, k_end, share, HEAD_DIM, BLOCK_D, SPLIT, BLOCK_N,
                     BLOCK_SPLIT, ROWS, IEEE, UPCAST, True, SPAN)
    else:
        pid, pid_k, k_lo, k_hi = _phase_col_tile(index - heads, out_tiles, w_ptr, wd_ptr, cols_ptr, count_ptr, k_end,
                                                 BATCH, N, K, stride_wn, stride_wk, stride_dn, stride_dk, DENSE,
                                                 DENSE_WHEN_FULL, SPLIT_K, BLOCK_M, BLOCK_NO, BLOCK_KO, COMPILED)
        if k_hi > k_lo:  # every row's output of each head slot whose columns the share touches
            expected = BATCH * ((k_hi - 1) // HEAD_DIM - k_lo // HEAD_DIM + 1)
            wait_at_least(sync_ptr + _SYNC_HEAD + pid_k, expected, error_ptr, COMPILED)
        _col_tile(pid, pid_k, o_ptr, w_ptr, cols_ptr, y_ptr, count_ptr, o_ptr, res_ptr, part_ptr, cnt_ptr, wd_ptr,
                  BATCH, N, K, stride_ob, stride_od, stride_wn, stride_wk, stride_ym, stride_yn, 0, 0, stride_rm,
                  stride_rn, stride_dn, stride_dk, SPLIT_K, True, False, True, DENSE, DENSE_WHEN_FULL, IEEE, UPCAST,
                  BLOCK_M, BLOCK_NO, BLOCK_KO, 1)


@triton.jit
def _wait_for_projection(slot_counts, kvmap_ptr, b, h, NQ, KV_SLOTS, PAIR_BLOCKS, stride_mb, stride_mh, error_ptr,
                         COMPILED: tl.constexpr):
    """Row ``b``'s head slot ``h`` attends its q slot and its K and V slots: wait until each has its PAIR_BLOCKS
    programs' counts (a head the row lacks reads none of them)."""
    kvh = tl.load(kvmap_ptr + b * stride_mb + h * stride_mh)
    if kvh >= 0:
        wait_at_least(slot_counts + h, PAIR_BLOCKS, error_ptr, COMPILED)
        wait_at_least(slot_counts + NQ + kvh, PAIR_BLOCKS, error_ptr, COMPILED)
        wait_at_least(slot_counts + NQ + KV_SLOTS + kvh, PAIR_BLOCKS, error_ptr, COMPILED)


def _span(head_dim: int, block_k: int) -> int:
    """The most o_proj shares one head slot's columns fall in: shares start ``block_k`` or more apart."""
    return next_power_of_2(cdiv(head_dim, block_k) + 1)


def _check(q, pages, block_tables, head_to_kv, lengths, starts, split, w_o, cols, count, residual,
           dense_weight) -> None:
    check_tensor("q", q, dim=3)
    batch, nq, head_dim = q.shape
    if not 1 <= batch <= DECODE_MAX_TOKENS:
        raise ValueError(f"q must have 1 to {DECODE_MAX_TOKENS} rows (a decode step's), got {batch}")
    device, dtype = q.device, q.dtype
    check_tensor("pages", pages, dim=4, dtypes=(dtype,), device=device)
    if pages.shape[0] != 2 or pages.shape[3] != head_dim:
        raise ValueError(f"pages must be [2, pages, page size, {head_dim}] (K and V; q's head_dim), got "
                         f"{list(pages.shape)}")
    check_tensor("block_tables", block_tables, dim=3, dtypes=(torch.int32,), device=device)
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, kv heads, pages] (q's rows first), got "
                         f"{list(block_tables.shape)}")
    check_head_to_kv(head_to_kv, q)
    for name, t in (("lengths", lengths), ("starts", starts)):
        check_tensor(name, t, dim=1, dtypes=(torch.int32,), device=device)
        if t.shape[0] != batch:
            raise ValueError(f"{name} must be [{batch}] (one per row of q), got {list(t.shape)}")
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int (the attention's splits per head), got {split!r}")
    check_tensor("w_o", w_o, dim=2, dtypes=(dtype,), device=device)
    if w_o.shape[1] != nq * head_dim:
        raise ValueError(f"w_o must be [hidden, {nq * head_dim}] (q's heads x head_dim columns), got "
                         f"{list(w_o.shape)}")
    check_tensor("cols", cols, dim=1, dtypes=(torch.int32,), device=device)
    if cols.numel() != nq * head_dim:
        raise ValueError(f"cols must list {nq * head_dim} columns (q's head slots x head_dim), got {cols.numel()}")
    check_tensor("count", count, dtypes=(torch.int32,), device=device)
    if count.numel() != 1:
        raise ValueError(f"count must hold one int32 (the listed columns that count), got shape {list(count.shape)}")
    check_tensor("residual", residual, dim=2, dtypes=(dtype,), device=device)
    if tuple(residual.shape) != (batch, w_o.shape[0]):
        raise ValueError(f"residual must be [{batch}, {w_o.shape[0]}] (q's rows, w_o's outputs), got "
                         f"{list(residual.shape)}")
    if dense_weight is not None and (dense_weight.shape != w_o.shape or dense_weight.dtype != dtype
                                     or dense_weight.device != device):
        raise ValueError(f"dense_weight must be w_o's matrix ({dtype} {list(w_o.shape)} on {device}), got "
                         f"{dense_weight.dtype} {list(dense_weight.shape)} on {dense_weight.device}")


def paged_attention_o_proj_phased(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int, w_o: torch.Tensor, cols: torch.Tensor,
    count: torch.Tensor, residual: torch.Tensor, dense: bool = False, dense_weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode layer's attention and ``o_proj``, the residual added, in one launch: what
    ``col_gathered_linear(paged_decode_attention_triton(q, pages, block_tables, head_to_kv, lengths, starts,
    scale, split).flatten(1), w_o, cols, count=count, residual=residual, dense=dense, dense_weight=dense_weight)``
    gives (module docstring).

    Args:
        q: ``[rows of the step (1 to 16), head slots, head_dim]``, each row's queries in the union's head slots.
        pages, block_tables, head_to_kv, lengths, starts, scale, split: the paged decode attention's
            (:func:`~.paged_attention.paged_decode_attention_triton`; -1 in ``head_to_kv``: a head the row
            lacks, which gives 0).
        w_o: ``[hidden, head slots x head_dim]``, any layout (a column-major copy for gathered columns);
            ``dense_weight``: its matrix row-major, read when every listed column counts.
        cols: int32 ``[head slots x head_dim]``: the union's columns, then -1 in its free slots.
        count: int32 ``[1]`` on the device: the listed columns that count.
        residual: ``[rows, hidden]``, added to the result.
        dense: the layer is kept whole or skipped: ``cols`` is ``arange`` over its counted part.
        out: where to write the result (``residual``'s shape, dtype and device, contiguous); a new tensor if
            None.

    Returns:
        ``[rows, hidden]``: ``residual`` plus ``o_proj`` of the attention.
    """
    _check(q, pages, block_tables, head_to_kv, lengths, starts, split, w_o, cols, count, residual, dense_weight)
    _check_out(out, residual)
    return _launch(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols, count, residual,
                   dense, dense_weight, out, None)


def attention_block_phased(
    h: torch.Tensor, w_qkv: torch.Tensor, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norm_weight: torch.Tensor, eps: float, pages: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor,
    head_to_kv: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int,
    w_o: torch.Tensor, cols: torch.Tensor, count: torch.Tensor, dense: bool = False,
    dense_weight: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode layer's whole attention block in one launch of three phases: q, K and V of the union's head
    slots of the normed ``h``, rotated, K and V appended to the pages (what
    :func:`~.head_projection.head_projection` with ``paged`` and ``norm_weight`` does), then
    :func:`paged_attention_o_proj_phased` of that q with ``h`` as the residual. An attention program waits
    only for its row's q, K and V slots.

    Args:
        h: ``[rows of the step (1 to 16), hidden]``, the layer's input (and the residual).
        w_qkv: ``[q, K and V heads x head_dim, hidden]``, the stacked projection.
        heads: int32 ``[head slots + 2 x KV slots]``: the union's q heads, then its K heads, then its V heads, as
            heads of ``w_qkv`` (-1 in free slots).
        cos, sin: ``[rows or 1, 1, head_dim]``, contiguous: each row's rotation at its new position.
        norm_weight, eps: the layer's input RMSNorm, applied inside the projection.
        positions: int32 ``[rows]``: where each row's new K and V go (the positions stored before this step);
            ``lengths`` is ``positions + 1``, the new token attended.
        pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols, count, dense, dense_weight,
            out: :func:`paged_attention_o_proj_phased`'s (``block_tables`` ``[rows, KV slots, pages]`` also
            addresses the append).

    Returns:
        ``[rows, hidden]``: ``h`` plus ``o_proj`` of the attention. ``pages`` hold the new K and V.
    """
    check_tensor("h", h, dim=2)
    check_tensor("head_to_kv", head_to_kv, dtypes=(torch.int32,), device=h.device)
    check_tensor("block_tables", block_tables, dim=3, dtypes=(torch.int32,), device=h.device)
    check_tensor("pages", pages, dim=4, dtypes=(h.dtype,), device=h.device)
    rows, hidden = h.shape
    if not 1 <= rows <= DECODE_MAX_TOKENS:
        raise ValueError(f"h must have 1 to {DECODE_MAX_TOKENS} rows (a decode step's), got {rows}")
    nq, nkv, head_dim = head_to_kv.shape[-1], block_tables.shape[1], pages.shape[3]
    check_tensor("w_o", w_o, dim=2, dtypes=(h.dtype,), device=h.device)
    if tuple(w_o.shape) != (hidden, nq * head_dim):
        raise ValueError(f"w_o must be [{hidden}, {nq * head_dim}] (h's features, head_to_kv's head slots x the pages' "
                         f"head_dim), got {list(w_o.shape)}")
    # The attention's query: scratch the projection writes and the attention reads, contiguous.
    q = torch.empty(rows, nq, head_dim, dtype=h.dtype, device=h.device)
    _check(q, pages, block_tables, head_to_kv, lengths, starts, split, w_o, cols, count, h, dense_weight)
    _check_projection(h, w_qkv, heads, cos, sin, norm_weight, positions, nq, nkv, head_dim)
    _check_out(out, h)
    return _launch(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols, count, h, dense,
                   dense_weight, out, (h, w_qkv, heads, cos, sin, positions, norm_weight, eps))


def _check_projection(h, w_qkv, heads, cos, sin, norm_weight, positions, nq, nkv, head_dim) -> None:
    rows, hidden = h.shape
    device, dtype = h.device, h.dtype
    check_tensor("w_qkv", w_qkv, dim=2, dtypes=(dtype,), device=device)
    if w_qkv.shape[1] != hidden or w_qkv.shape[0] % head_dim:
        raise ValueError(f"w_qkv must be [heads x {head_dim}, {hidden}] (whole heads of the pages' head_dim, h's "
                         f"features), got {list(w_qkv.shape)}")
    check_tensor("heads", heads, dim=1, dtypes=(torch.int32,), device=device)
    if heads.numel() != nq + 2 * nkv:
        raise ValueError(f"heads must list {nq + 2 * nkv} slots (head_to_kv's {nq} q slots, then block_tables' {nkv} "
                         f"K and {nkv} V slots), got {heads.numel()}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dim=3, device=device)
        if t.shape[0] not in (1, rows) or t.shape[1:] != (1, head_dim) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [{rows} or 1, 1, {head_dim}] (each row's rotation at its "
                             f"new position), got {list(t.shape)}")
    if norm_weight is None:
        raise ValueError("norm_weight must be given: the projection takes h through the layer's input RMSNorm")
    check_norm_weight(norm_weight, h)
    check_tensor("positions", positions, dim=1, dtypes=(torch.int32,), device=device)
    if positions.shape[0] != rows:
        raise ValueError(f"positions must be [{rows}] (one per row of h), got {list(positions.shape)}")


def _check_out(out, residual) -> None:
    if out is not None and (out.shape != residual.shape or out.dtype != residual.dtype
                            or out.device != residual.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {residual.dtype} tensor of shape {list(residual.shape)} on "
                         f"{residual.device}, got {out.dtype} {list(out.shape)} on {out.device}")


def _launch(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols, count, residual, dense,
            dense_weight, out, projection) -> torch.Tensor:
    """Both ops' launch: ``projection`` None (q given), or (x, w_qkv, heads, cos, sin, positions, norm weight,
    eps), q then the scratch the projection phase fills."""
    batch, nq, head_dim = q.shape
    hidden, k = w_o.shape
    device = q.device
    y = torch.empty_like(residual) if out is None else out
    attended = torch.empty(batch, nq, head_dim, dtype=q.dtype, device=device)  # o_proj's input, contiguous
    split_k = _split_k(batch, hidden, k, device)
    # One workspace, the attention's part then o_proj's: the two reductions run at once.
    attention_parts = split_partials(batch, nq, head_dim, split) if split > 1 else 0
    parts = scratch(device, attention_parts + (_split_partials(batch, hidden, split_k) if split_k > 1 else 0) + 1)
    attention_tickets, tiles = batch * nq, _split_tickets(batch, hidden)
    projected = projection is not None
    slots = projection[2].numel() if projected else 0
    sync = next_power_of_2(_SYNC_HEAD.value + split_k + slots)
    ticks = counters(device, attention_tickets + tiles + sync)
    # Under the interpreter a wait that finds its heads unfinished is counted here, not spun on.
    errors = torch.zeros(1, dtype=torch.int32, device=device) if INTERPRET else ticks
    wd = w_o if dense_weight is None else dense_weight
    k_pages, v_pages = pages[0], pages[1]
    if not projected:
        x, w_qkv, heads, cos, sin, positions, norm, eps = q, q, lengths, q, q, lengths, q, 0.0  # never read
        rope_strides, hidden_in = (0, 0, 0), 0
    else:
        x, w_qkv, heads, cos, sin, positions, norm, eps = projection
        # A batch of 1 broadcasts: stride 0 reads the same rows for every sequence.
        rope_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
        hidden_in = x.shape[1]

    def launch(chosen: triton.Config) -> None:
        blocks = dict(chosen.kwargs)
        # No wider than a head's pairs; without the projection phase the same code whatever the config says.
        blocks["BLOCK_H"] = (min(blocks["BLOCK_H"], max(_PAIRS, next_power_of_2(head_dim // 2))) if projected
                             else _PAIRS)
        pair_blocks = cdiv(head_dim // 2, blocks["BLOCK_H"]) if projected else 1
        grid = (slots * pair_blocks + batch * nq * split
                + cdiv(batch, blocks["BLOCK_M"]) * cdiv(hidden, blocks["BLOCK_NO"]) * split_k,)
        _phased_attention_kernel[grid](
            q, k_pages, v_pages, block_tables, head_to_kv, lengths, starts, attended, parts, ticks,
            w_o, wd, cols, count, residual, y, parts[attention_parts:], ticks[attention_tickets:],
            ticks[attention_tickets + tiles:], errors,
            x, w_qkv, heads, cos, sin, positions, norm, eps,
            batch, nq, pages.shape[2], scale * LOG2E, hidden, k, hidden_in, slots, block_tables.shape[1], pair_blocks,
            *((0, head_to_kv.stride(0)) if head_to_kv.dim() == 1 else head_to_kv.stride()),
            *q.stride(), *k_pages.stride(), *block_tables.stride(), *attended.stride(),
            w_o.stride(0), w_o.stride(1), wd.stride(0), wd.stride(1), residual.stride(0), residual.stride(1),
            y.stride(0), y.stride(1), x.stride(0), x.stride(1), w_qkv.stride(0), w_qkv.stride(1), *rope_strides,
            HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), SPLIT=split, BLOCK_N=BLOCK_N,
            BLOCK_SPLIT=max(2, next_power_of_2(split)), ROWS=QUERY_ROWS, SPLIT_K=split_k, DENSE=dense,
            DENSE_WHEN_FULL=dense_weight is not None and not dense, **dot_flags(q.dtype), COMPILED=not INTERPRET,
            SYNC=sync, SPAN=_span(head_dim, blocks["BLOCK_KO"]), PROJECT=projected, **blocks,
            num_warps=chosen.num_warps, num_stages=chosen.num_stages,
            **({} if INTERPRET else {"maxnreg": MAX_REGISTERS}), **pdl_flags(device, "decode"),
        )

    configs = INTERPRETER_CONFIGS if INTERPRET else CONFIGS["decode"]
    tuning.launch_fixed("_phased_attention_kernel", "decode", configs, KEY, [batch, hidden, k, slots], device, launch)
    if INTERPRET and errors.item():
        raise RuntimeError(f"{errors.item()} programs of the phased attention found what they wait for unfinished: "
                           "the phases' counts are wrong")
    return y
