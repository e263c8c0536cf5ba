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
launches' bit for bit where their tiles and splits are the same (the interpreter's configs). Decode only
(at most ``DECODE_MAX_TOKENS`` rows). Off unless ``ADALLAVA_PHASED_ATTENTION=1``
(:func:`phased_attention_enabled`): no GPU has measured it yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import cdiv, check_tensor, next_power_of_2
from .gathered_linear import _col_tile, _counted_end, _phase_col_tile, _split_k, _split_partials, _split_tickets
from .paged_attention import check_head_to_kv
from .paged_decode_kernel import BLOCK_N, NUM_WARPS, QUERY_ROWS, _attend_head, split_partials
from .triton_utils import DECODE_MAX_TOKENS, INTERPRET, LOG2E, dot_flags, finish_phases, wait_at_least
from .workspace import counters, scratch

__all__ = ["PHASED_ATTENTION_ENV", "paged_attention_o_proj_phased", "phased_attention_enabled"]

PHASED_ATTENTION_ENV = "ADALLAVA_PHASED_ATTENTION"
# One config, not tuned: o_proj's decode tile (64 outputs by 128 columns, one head at head_dim 128), the
# attention's own blocks; num_stages for the kernel's both loops. Under the interpreter the two launches'
# configs, so the results can be compared bit for bit.
CONFIG = {"BLOCK_M": 16, "BLOCK_NO": 64, "BLOCK_KO": 128, "num_warps": NUM_WARPS, "num_stages": 5}
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_NO": 32, "BLOCK_KO": 32, "num_warps": NUM_WARPS, "num_stages": 5}
# The counters after the two launches' tickets: the ticket counter, the programs finished, one count per share.
_SYNC_HEAD = tl.constexpr(2)


def phased_attention_enabled() -> bool:
    """Whether decode layers run attention and ``o_proj`` as :func:`paged_attention_o_proj_phased`
    (``ADALLAVA_PHASED_ATTENTION=1``)."""
    return os.environ.get(PHASED_ATTENTION_ENV) == "1"


@triton.jit
def _phased_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr, o_ptr, apart_ptr, acnt_ptr,
    w_ptr, wd_ptr, cols_ptr, count_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr, sync_ptr, error_ptr,
    BATCH, NQ, PAGE, qk_scale, N, K,
    stride_mb, stride_mh,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kd,
    stride_tb, stride_th, stride_tw,
    stride_ob, stride_oh, stride_od,
    stride_wn, stride_wk, stride_dn, stride_dk, stride_rm, stride_rn, stride_ym, stride_yn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, DENSE: tl.constexpr,
    DENSE_WHEN_FULL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, COMPILED: tl.constexpr,
    SYNC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NO: tl.constexpr, BLOCK_KO: tl.constexpr, SPAN: tl.constexpr,
):
    """y = res + o @ w[:, cols[:count]].T, o [BATCH, NQ, HEAD_DIM] the paged attention of q (module docstring:
    the phases and their counters). o is scratch, contiguous: o_proj reads it as [BATCH, NQ * HEAD_DIM].
    apart/acnt: the attention's partials and tickets; part/cnt: o_proj's; sync: the ticket counter, the
    programs finished, then each o_proj share's count of (row, head) outputs final (0 before the launch, and
    after it); error: what a wait found unfinished under the interpreter. COMPILED: not the interpreter."""
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    heads = BATCH * NQ * SPLIT
    out_tiles = tl.cdiv(BATCH, BLOCK_M) * tl.cdiv(N, BLOCK_NO)
    k_end = _counted_end(count_ptr, K, True, DENSE)
    # Every o_proj share of the counted columns starts on a multiple of it (0: nothing is counted).
    share = tl.cdiv(tl.cdiv(k_end, SPLIT_K), BLOCK_KO) * BLOCK_KO
    if ticket < heads:
        # Head slot by head slot, so the first o_proj shares' heads finish first, whatever the batch.
        h = ticket // (BATCH * SPLIT)
        b = (ticket // SPLIT) % BATCH
        _attend_head(b * NQ + h, ticket % SPLIT, q_ptr, k_ptr, v_ptr, table_ptr, kvmap_ptr, len_ptr, start_ptr,
                     o_ptr, apart_ptr, acnt_ptr, NQ, PAGE, qk_scale, stride_mb, stride_mh, stride_qb, stride_qh,
                     stride_qd, stride_kp, stride_ks, stride_kd, stride_tb, stride_th, stride_tw, stride_ob,
                     stride_oh, stride_od, sync_ptr + _SYNC_HEAD, k_end, share, HEAD_DIM, BLOCK_D, SPLIT, BLOCK_N,
                     BLOCK_SPLIT, ROWS, IEEE, UPCAST, True, SPAN)
    else:
        pid, pid_k, k_lo, k_hi = _phase_col_tile(ticket - heads, out_tiles, w_ptr, wd_ptr, cols_ptr, count_ptr, k_end,
                                                 BATCH, N, K, stride_wn, stride_wk, stride_dn, stride_dk, DENSE,
                                                 DENSE_WHEN_FULL, SPLIT_K, BLOCK_M, BLOCK_NO, BLOCK_KO, COMPILED)
        if k_hi > k_lo:  # every row's output of each head slot whose columns the share touches
            expected = BATCH * ((k_hi - 1) // HEAD_DIM - k_lo // HEAD_DIM + 1)
            wait_at_least(sync_ptr + _SYNC_HEAD + pid_k, expected, error_ptr, COMPILED)
        _col_tile(pid, pid_k, o_ptr, w_ptr, cols_ptr, y_ptr, count_ptr, o_ptr, res_ptr, part_ptr, cnt_ptr, wd_ptr,
                  BATCH, N, K, stride_ob, stride_od, stride_wn, stride_wk, stride_ym, stride_yn, 0, 0, stride_rm,
                  stride_rn, stride_dn, stride_dk, SPLIT_K, True, False, True, DENSE, DENSE_WHEN_FULL, IEEE, UPCAST,
                  BLOCK_M, BLOCK_NO, BLOCK_KO, 1)
    finish_phases(sync_ptr, heads + out_tiles * SPLIT_K, _SYNC_HEAD + SPLIT_K, SYNC)


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
    if out is not None and (out.shape != residual.shape or out.dtype != residual.dtype
                            or out.device != residual.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {residual.dtype} tensor of shape {list(residual.shape)} on "
                         f"{residual.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    batch, nq, head_dim = q.shape
    hidden, k = w_o.shape
    device = q.device
    config = INTERPRETER_CONFIG if INTERPRET else CONFIG
    y = torch.empty_like(residual) if out is None else out
    attended = torch.empty(batch, nq, head_dim, dtype=q.dtype, device=device)  # o_proj's input, contiguous
    split_k = _split_k(batch, hidden, k, device)
    # One workspace, the attention's part then o_proj's: the two reductions run at once.
    attention_parts = split_partials(batch, nq, head_dim, split) if split > 1 else 0
    parts = scratch(device, attention_parts + (_split_partials(batch, hidden, split_k) if split_k > 1 else 0) + 1)
    attention_tickets, tiles = batch * nq, _split_tickets(batch, hidden)
    sync = next_power_of_2(_SYNC_HEAD.value + split_k)
    ticks = counters(device, attention_tickets + tiles + sync)
    # Under the interpreter a wait that finds its heads unfinished is counted here, not spun on.
    errors = torch.zeros(1, dtype=torch.int32, device=device) if INTERPRET else ticks
    wd = w_o if dense_weight is None else dense_weight
    k_pages, v_pages = pages[0], pages[1]
    grid = (batch * nq * split + cdiv(batch, config["BLOCK_M"]) * cdiv(hidden, config["BLOCK_NO"]) * split_k,)
    _phased_attention_kernel[grid](
        q, k_pages, v_pages, block_tables, head_to_kv, lengths, starts, attended, parts, ticks,
        w_o, wd, cols, count, residual, y, parts[attention_parts:], ticks[attention_tickets:],
        ticks[attention_tickets + tiles:], errors,
        batch, nq, pages.shape[2], scale * LOG2E, hidden, k,
        *((0, head_to_kv.stride(0)) if head_to_kv.dim() == 1 else head_to_kv.stride()),
        *q.stride(), *k_pages.stride(), *block_tables.stride(), *attended.stride(),
        w_o.stride(0), w_o.stride(1), wd.stride(0), wd.stride(1), residual.stride(0), residual.stride(1),
        y.stride(0), y.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), SPLIT=split, BLOCK_N=BLOCK_N,
        BLOCK_SPLIT=max(2, next_power_of_2(split)), ROWS=QUERY_ROWS, SPLIT_K=split_k, DENSE=dense,
        DENSE_WHEN_FULL=dense_weight is not None and not dense, **dot_flags(q.dtype), COMPILED=not INTERPRET,
        SYNC=sync, SPAN=_span(head_dim, config["BLOCK_KO"]), **config, **({} if INTERPRET else {"maxnreg": 128}),
    )
    if INTERPRET and errors.item():
        raise RuntimeError(f"{errors.item()} o_proj programs of paged_attention_o_proj_phased found the heads they "
                           "wait for unfinished: the phases' counts are wrong")
    return y
