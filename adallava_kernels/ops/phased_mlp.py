"""A decode layer's MLP in one launch: gate|up and down as two phases of one kernel.

A decode step runs its MLP as two launches: gate|up of the union's neurons with the post-attention norm
inside (:func:`~.gathered_linear.swiglu_gathered`), then ``down_proj`` over them, each row's neurons masked,
plus the residual (:func:`~.gathered_linear.col_gathered_linear`). Each down program reduces over a share
of the neurons, so it needs every gate|up tile of that share, not every one: the kernel boundary between
the two launches waits for more than the data asks, and costs what every kernel of a captured step pays
(its launch, first round trip, last wave's drain; ``bench.boundary`` measures both).

:func:`swiglu_mlp_phased` runs the same tiles, with the same code, in one grid:

- a program takes a ticket from a counter, and the ticket, not its program ID, names its work: tickets
  ``[0, A)`` are the gate|up tiles, in order; the rest are the down tiles, split by split. A program only
  ever waits for tickets below its own, which programs that started before it hold, so no wait can
  deadlock whatever order the GPU starts programs in; under the interpreter, which runs programs one at
  a time in order, no wait spins;
- a gate|up tile writes its activations, then releases a count of its down split's share;
- a down program asks L2 for its first weight lines, waits (acquire loads, about 100 ns apart) until its
  share's count is complete, and reduces it; the splits meet as the column gather's do (:mod:`.workspace`:
  bitwise repeatable);
- the last program to finish puts the counters back to 0 for the next launch.

With ``ADALLAVA_PDL=1`` (programmatic dependent launch) a program asks L2 for the first weight tiles of the
gate|up tile its program ID names (the first programs start first, so their tickets most likely name the
same), then waits for the kernel before, and only then takes its ticket: that kernel may be a phased one
putting the same counters back to 0.

The results are the two launches' bit for bit where the tiles and splits are the same (the interpreter's
config). Decode only (at most ``DECODE_MAX_TOKENS`` rows). Off unless ``ADALLAVA_PHASED_MLP=1``
(:func:`phased_mlp_enabled`): no GPU has measured it yet; ``make gpu-check`` times the step with it beside
the step without it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import cdiv, check_tensor, next_power_of_2
from .gathered_linear import (_col_tile, _counted_end, _phase_col_tile, _prefetch_row_tiles, _row_tile, _split_k,
                              _split_tickets, _split_workspace)
from .rms_norm import check_norm_weight
from .triton_utils import (DECODE_MAX_TOKENS, INTERPRET, config, dependent_launch, dot_flags, finish_phases,
                           pdl_flags, wait_at_least)
from . import tuning
from .workspace import counters

__all__ = ["PHASED_ENV", "phased_mlp_enabled", "swiglu_mlp_phased"]

PHASED_ENV = "ADALLAVA_PHASED_MLP"
# The decode configs the sweep (bench.tune) times, the first the one launched without a table entry (and the
# one every test runs): the two launches' it replaces (gate|up: 32 neurons by 128 features a tile; down: 64
# outputs by 128 neurons) at 4 stages for both loops, then at 5 (down's own: 4 buffers of its column gather,
# one index level deep). A down split's share starts on a multiple of BLOCK_KB, which BLOCK_NA divides: each
# gate|up tile counts toward one split. Never autotuned at run time (tuning.launch_fixed). Under the
# interpreter the two launches' own config, so the results can be compared bit for bit.
CONFIGS = {"decode": [config(4, 4, BLOCK_M=16, BLOCK_NA=32, BLOCK_KA=128, BLOCK_NB=64, BLOCK_KB=128),
                      config(4, 5, BLOCK_M=16, BLOCK_NA=32, BLOCK_KA=128, BLOCK_NB=64, BLOCK_KB=128)]}
INTERPRETER_CONFIGS = [config(4, 1, BLOCK_M=16, BLOCK_NA=32, BLOCK_KA=32, BLOCK_NB=32, BLOCK_KB=32)]
# The tuned table's key: rows, the union's neuron slots, hidden features.
KEY = ["M", "N", "HIDDEN"]
# The counters after the down tiles' tickets: the ticket counter, the programs finished, one count per split.
_SYNC_HEAD = tl.constexpr(2)


def phased_mlp_enabled() -> bool:
    """Whether decode layers run their MLP as :func:`swiglu_mlp_phased` (``ADALLAVA_PHASED_MLP=1``)."""
    return os.environ.get(PHASED_ENV) == "1"


@triton.jit
def _phased_mlp_kernel(
    h_ptr, wg_ptr, wu_ptr, rows_ptr, norm_ptr, eps, act_ptr, wd_ptr, wdd_ptr, count_ptr, xmask_ptr, y_ptr,
    part_ptr, cnt_ptr, sync_ptr, error_ptr,
    M, N, H,
    stride_hm, stride_hk, stride_gn, stride_gk, stride_un, stride_uk, stride_am, stride_an, stride_dn, stride_dk,
    stride_ddn, stride_ddk, stride_mm, stride_mk, stride_ym, stride_yn,
    SPLIT_K: tl.constexpr, DENSE: tl.constexpr, DENSE_WHEN_FULL: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, COMPILED: tl.constexpr, SYNC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NA: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_NB: tl.constexpr,
    BLOCK_KB: tl.constexpr, PDL: tl.constexpr,
):
    """y = h + down(act * xmask) over the first count[0] of the N listed neurons, act = silu(gate) * up of
    RMSNorm(h) (weight norm_ptr) over the listed rows (module docstring: the phases and their counters).
    h and y are [M, H]; act [M, N] is scratch; sync: the ticket counter, the programs finished, then each
    down split's count of gate|up tiles done (0 before the launch, and after it); error: what a wait found
    unfinished under the interpreter (:func:`~.triton_utils.wait_at_least`). COMPILED: not the interpreter (the
    prefetch and the pauses are inline assembly)."""
    tl.static_assert(BLOCK_KB % BLOCK_NA == 0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    up_tiles = m_tiles * tl.cdiv(N, BLOCK_NA)
    if PDL:
        # The program ID names the tile its ticket most likely will (the first programs start first): a gate|up
        # program's first weight tiles into L2 while the kernel before finishes.
        if tl.program_id(0) < up_tiles:
            _prefetch_row_tiles(tl.program_id(0), 0, wg_ptr, wu_ptr, rows_ptr, M, N, H, stride_gn, stride_gk,
                                stride_un, stride_uk, True, 1, BLOCK_M, BLOCK_NA, BLOCK_KA, 1)
    # The ticket after the wait: the kernel before may be a phased one, which puts these counters back to 0.
    dependent_launch(PDL)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    down_tiles = m_tiles * tl.cdiv(H, BLOCK_NB)
    k_end = _counted_end(count_ptr, N, True, DENSE)
    # Every split's share of the counted neurons starts on a multiple of it (0: nothing is counted).
    share = tl.cdiv(tl.cdiv(k_end, SPLIT_K), BLOCK_KB) * BLOCK_KB
    if ticket < up_tiles:
        _row_tile(ticket, 0, h_ptr, wg_ptr, wu_ptr, rows_ptr, act_ptr, h_ptr, part_ptr, cnt_ptr, norm_ptr, eps,
                  M, N, H, stride_hm, stride_hk, stride_gn, stride_gk, stride_un, stride_uk, stride_am, stride_an,
                  0, 0, True, 1, False, True, IEEE, UPCAST, BLOCK_M, BLOCK_NA, BLOCK_KA, 1)
        first = (ticket % tl.cdiv(N, BLOCK_NA)) * BLOCK_NA
        if first < k_end:  # a tile past the count is no split's: nothing waits for it
            tl.debug_barrier()  # the whole tile is written before its count releases it
            tl.atomic_add(sync_ptr + _SYNC_HEAD + first // share, 1, sem="release")
    else:
        pid, pid_k, k_lo, k_hi = _phase_col_tile(ticket - up_tiles, down_tiles, wd_ptr, wdd_ptr, rows_ptr, count_ptr,
                                                 k_end, M, H, N, stride_dn, stride_dk, stride_ddn, stride_ddk, DENSE,
                                                 DENSE_WHEN_FULL, SPLIT_K, BLOCK_M, BLOCK_NB, BLOCK_KB, COMPILED)
        expected = m_tiles * tl.cdiv(tl.maximum(k_hi - k_lo, 0), BLOCK_NA)
        if expected > 0:
            wait_at_least(sync_ptr + _SYNC_HEAD + pid_k, expected, error_ptr, COMPILED)
        _col_tile(pid, pid_k, act_ptr, wd_ptr, rows_ptr, y_ptr, count_ptr, xmask_ptr, h_ptr, part_ptr, cnt_ptr,
                  wdd_ptr, M, H, N, stride_am, stride_an, stride_dn, stride_dk, stride_ym, stride_yn, stride_mm,
                  stride_mk, stride_hm, stride_hk, stride_ddn, stride_ddk, SPLIT_K, True, True, True, DENSE,
                  DENSE_WHEN_FULL, IEEE, UPCAST, BLOCK_M, BLOCK_NB, BLOCK_KB, 1)
    finish_phases(sync_ptr, up_tiles + down_tiles * SPLIT_K, _SYNC_HEAD + SPLIT_K, SYNC)


def _check(h, w_gate, w_up, rows, norm_weight, w_down, count, x_mask, dense_weight) -> None:
    check_tensor("h", h, dim=2)
    m, hidden = h.shape
    if not 1 <= m <= DECODE_MAX_TOKENS:
        raise ValueError(f"h must have 1 to {DECODE_MAX_TOKENS} rows (a decode step's), got {m}")
    device, dtype = h.device, h.dtype
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        check_tensor(name, w, dim=2, dtypes=(dtype,), device=device)
        if w.shape[1] != hidden:
            raise ValueError(f"{name} must be [intermediate, {hidden}] (h's width), got {list(w.shape)}")
    inter = w_gate.shape[0]
    if w_up.shape[0] != inter:
        raise ValueError(f"w_up must have w_gate's {inter} rows, got {w_up.shape[0]}")
    check_tensor("w_down", w_down, dim=2, dtypes=(dtype,), device=device)
    if tuple(w_down.shape) != (hidden, inter):
        raise ValueError(f"w_down must be [{hidden}, {inter}] (h's width, the neurons), got {list(w_down.shape)}")
    check_tensor("rows", rows, dim=1, dtypes=(torch.int32,), device=device)
    check_tensor("count", count, dtypes=(torch.int32,), device=device)
    if count.numel() != 1:
        raise ValueError(f"count must hold one int32 (the listed neurons that count), got shape {list(count.shape)}")
    check_tensor("x_mask", x_mask, dim=2, dtypes=(dtype, torch.int32, torch.bool), device=device)
    if tuple(x_mask.shape) != (m, rows.numel()):
        raise ValueError(f"x_mask must be [{m}, {rows.numel()}] (h's rows, the listed neurons), got "
                         f"{list(x_mask.shape)}")
    check_norm_weight(norm_weight, h)
    if norm_weight is None:
        raise ValueError("norm_weight is required: the MLP's input norm runs inside gate|up")
    if dense_weight is not None and (dense_weight.shape != w_down.shape or dense_weight.dtype != dtype
                                     or dense_weight.device != device):
        raise ValueError(f"dense_weight must be w_down's matrix ({dtype} {list(w_down.shape)} on {device}), got "
                         f"{dense_weight.dtype} {list(dense_weight.shape)} on {dense_weight.device}")


def swiglu_mlp_phased(h: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float, w_down: torch.Tensor, count: torch.Tensor,
                      x_mask: torch.Tensor, dense: bool = False, dense_weight: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """A decode layer's MLP, its residual added, in one launch: what ``col_gathered_linear(swiglu_gathered(h,
    w_gate, w_up, rows, norm_weight=norm_weight, eps=eps), w_down, rows, count=count, x_mask=x_mask,
    residual=h, dense=dense, dense_weight=dense_weight)`` gives (module docstring).

    Args:
        h: ``[rows of the step (1 to 16), hidden]``, the residual stream (the MLP's input before its norm).
        w_gate, w_up: ``[intermediate, hidden]``; ``w_down``: ``[hidden, intermediate]``, any layout (a
            column-major copy for gathered columns); ``dense_weight``: ``w_down``'s matrix row-major, read
            when every listed neuron counts.
        rows: int32 ``[capacity]``: the union's neurons, then -1 in its free slots.
        norm_weight, eps: the post-attention RMSNorm.
        count: int32 ``[1]`` on the device: the listed neurons that count.
        x_mask: ``[rows of h, capacity]``, nonzero where the row's own plan keeps the neuron.
        dense: the layer is kept whole or skipped: ``rows`` is ``arange`` over its counted part.
        out: where to write the result (h's shape, dtype and device, contiguous); a new tensor if None.

    Returns:
        ``[rows of h, hidden]``: ``h`` plus the MLP's output.
    """
    _check(h, w_gate, w_up, rows, norm_weight, w_down, count, x_mask, dense_weight)
    if out is not None and (out.shape != h.shape or out.dtype != h.dtype or out.device != h.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {h.dtype} tensor of shape {list(h.shape)} on {h.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    m, hidden = h.shape
    n = rows.numel()
    y = torch.empty_like(h) if out is None else out
    act = torch.empty(m, max(n, 1), dtype=h.dtype, device=h.device)
    split = _split_k(m, hidden, n, h.device)
    tiles = _split_tickets(m, hidden)  # the down tiles' tickets, as the column gather's
    sync = next_power_of_2(_SYNC_HEAD.value + split)
    partials = _split_workspace(m, hidden, split, h.device)[0] if split > 1 else y
    ticks = counters(h.device, tiles + sync)  # the tiles' tickets, then the phases' counters
    wd = w_down if dense_weight is None else dense_weight
    # Under the interpreter a wait that finds its tiles unfinished is counted here, not spun on.
    errors = torch.zeros(1, dtype=torch.int32, device=h.device) if INTERPRET else ticks

    def launch(chosen: triton.Config) -> None:
        blocks = chosen.kwargs
        grid = (cdiv(m, blocks["BLOCK_M"]) * (cdiv(n, blocks["BLOCK_NA"]) + cdiv(hidden, blocks["BLOCK_NB"]) * split),)
        _phased_mlp_kernel[grid](
            h, w_gate, w_up, rows, norm_weight, eps, act, w_down, wd, count, x_mask, y, partials, ticks, ticks[tiles:],
            errors, m, n, hidden, h.stride(0), h.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0),
            w_up.stride(1), act.stride(0), act.stride(1), w_down.stride(0), w_down.stride(1), wd.stride(0),
            wd.stride(1), x_mask.stride(0), x_mask.stride(1), y.stride(0), y.stride(1),
            SPLIT_K=split, DENSE=dense, DENSE_WHEN_FULL=dense_weight is not None and not dense,
            **dot_flags(h.dtype), COMPILED=not INTERPRET, SYNC=sync, **chosen.all_kwargs(),
            **pdl_flags(h.device, "decode"),
        )

    configs = INTERPRETER_CONFIGS if INTERPRET else CONFIGS["decode"]
    tuning.launch_fixed("_phased_mlp_kernel", "decode", configs, KEY, [m, n, hidden], h.device, launch)
    if INTERPRET and errors.item():
        raise RuntimeError(f"{errors.item()} down programs of swiglu_mlp_phased found the gate|up tiles they wait "
                           "for unfinished: the phases' counts are wrong")
    return y
