"""The two ends of a decode step: each row's inputs before the layers, its greedy token after them.

Around its layers, a decode step computed with torch ops launches about twenty small kernels (the rotary
angles' product, cat, cos and sin, the casts, the argmax, the copies to the batch's buffers), each a fixed
cost in the captured graph whatever its size. Two kernels do that work:

- :func:`step_inputs`: each row's rotary ``cos`` and ``sin`` at its position ``lengths - starts``, read
  from tables of every position the batch can reach (:func:`~.rope.rotary_tables`: the model's own rotary
  module, run once per table), and ``lengths + 1``;
- :func:`greedy_`: each row's greedy token, as ``torch.argmax`` picks it (the first maximum; a NaN before
  any number, the first NaN), written to the step's outputs and to the next step's input; the logits
  copied to the batch's buffer; each live row's length advanced by one.
"""

from __future__ import annotations

import torch

from .common import check_tensor, jit_where_available, next_power_of_2

try:
    import triton.language as tl
except ImportError:  # the references below are the torch step's own ops, which need no Triton
    tl = None

__all__ = ["greedy_", "greedy_reference_", "step_inputs", "step_inputs_reference"]

# The vocabulary a greedy program reads per iteration: 16 bf16 values a thread at 8 warps (two 16-byte loads).
_BLOCK_V = 4096
_GREEDY_WARPS = 8



@jit_where_available
def _step_inputs_kernel(lengths_ptr, starts_ptr, cos_table_ptr, sin_table_ptr, cos_ptr, sin_ptr, after_ptr,
                        positions, head_dim, stride_table, BLOCK_D: tl.constexpr):
    """Row ``program_id(0)``: cos/sin rows of its position, and its length plus one."""
    row = tl.program_id(0)
    length = tl.load(lengths_ptr + row)
    # Only a free slot's state can fall outside the table (a live row's position is below its max_tokens,
    # which the table covers): it reads an edge row, and nothing reads what it gets.
    position = tl.minimum(tl.maximum(length - tl.load(starts_ptr + row), 0), positions - 1)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < head_dim
    source = position.to(tl.int64) * stride_table + cols
    target = row.to(tl.int64) * head_dim + cols
    tl.store(cos_ptr + target, tl.load(cos_table_ptr + source, mask=inside), mask=inside)
    tl.store(sin_ptr + target, tl.load(sin_table_ptr + source, mask=inside), mask=inside)
    tl.store(after_ptr + row, length + 1)


@jit_where_available
def _greedy_kernel(logits_ptr, copy_ptr, live_ptr, lengths_ptr, next_ptr, tokens_ptr, vocab,
                   stride_logits, stride_copy, BLOCK_V: tl.constexpr):
    """Row ``program_id(0)``: its logits copied, its argmax to next and tokens, its length plus its live flag."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    best = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), 0)
    best_at = tl.min(tl.zeros((BLOCK_V,), tl.int32), 0)
    first_nan = best_at + vocab
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        inside = cols < vocab
        x = tl.load(logits_ptr + row * stride_logits + cols, mask=inside, other=float("-inf"))
        tl.store(copy_ptr + row * stride_copy + cols, x, mask=inside)
        x = x.to(tl.float32)
        nan = inside & (x != x)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan, cols, vocab), 0))
        x = tl.where(nan, float("-inf"), x)
        top = tl.max(x, 0)
        # The first column at the block's maximum; a later block replaces it only with a larger value.
        top_at = tl.min(tl.where(inside & (x == top), cols, vocab), 0)
        better = top > best
        best_at = tl.where(better, top_at, best_at)
        best = tl.where(better, top, best)
    token = tl.where(first_nan < vocab, first_nan, best_at).to(tl.int64)
    tl.store(next_ptr + row, token)
    tl.store(tokens_ptr + row, token)
    tl.store(lengths_ptr + row, tl.load(lengths_ptr + row) + tl.load(live_ptr + row))


def _check_step_inputs(lengths, starts, cos_table, sin_table) -> None:
    check_tensor("lengths", lengths, dim=1, dtypes=(torch.int32,))
    device = lengths.device
    check_tensor("starts", starts, dim=1, dtypes=(torch.int32,), device=device)
    if starts.shape != lengths.shape:
        raise ValueError(f"starts must have the shape of lengths {list(lengths.shape)}, got {list(starts.shape)}")
    check_tensor("cos_table", cos_table, dim=2, device=device)
    check_tensor("sin_table", sin_table, dim=2, dtypes=(cos_table.dtype,), device=device)
    if sin_table.shape != cos_table.shape or cos_table.shape[0] == 0:
        raise ValueError(f"cos_table and sin_table must be [positions >= 1, head_dim] alike, got "
                         f"{list(cos_table.shape)} and {list(sin_table.shape)}")
    for name, t in (("cos_table", cos_table), ("sin_table", sin_table)):
        if t.stride(1) != 1 or t.stride(0) != cos_table.stride(0):
            raise ValueError(f"{name} must be row-major like cos_table, got strides {list(t.stride())}")


def launch_step_inputs(lengths, starts, cos_table, sin_table):
    rows, (positions, head_dim) = lengths.shape[0], cos_table.shape
    cos = cos_table.new_empty(rows, 1, head_dim)
    sin = cos_table.new_empty(rows, 1, head_dim)
    after = torch.empty_like(lengths)
    if rows:
        _step_inputs_kernel[(rows,)](lengths, starts, cos_table, sin_table, cos, sin, after, positions, head_dim,
                                     cos_table.stride(0), BLOCK_D=next_power_of_2(head_dim))
    return cos, sin, after


def step_inputs(lengths: torch.Tensor, starts: torch.Tensor, cos_table: torch.Tensor,
                sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's per-row inputs in one launch.

    Args:
        lengths, starts: ``[rows]`` int32: positions stored, and the first one attended (the left padding).
        cos_table, sin_table: ``[positions, head_dim]`` (:func:`~.rope.rotary_tables`), row-major, covering every
            position ``lengths - starts`` a live row can be at.

    Returns:
        ``cos``, ``sin`` ``[rows, 1, head_dim]`` (the rotary module's rows at position ``lengths - starts``)
        and ``lengths + 1`` ``[rows]`` int32.
    """
    _check_step_inputs(lengths, starts, cos_table, sin_table)
    return launch_step_inputs(lengths, starts, cos_table, sin_table)


def step_inputs_reference(lengths, starts, cos_table, sin_table):
    """PyTorch reference of :func:`step_inputs` (the oracle of its tests)."""
    position = (lengths - starts).long().clamp(0, cos_table.shape[0] - 1)
    return cos_table[position][:, None], sin_table[position][:, None], lengths + 1


def _check_greedy(logits, live, logits_out, next_tokens, tokens, lengths) -> None:
    check_tensor("logits", logits, dim=2)
    rows, device = logits.shape[0], logits.device
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along the vocabulary, got strides {list(logits.stride())}")
    check_tensor("logits_out", logits_out, dim=2, dtypes=(logits.dtype,), device=device)
    if logits_out.shape != logits.shape or logits_out.stride(1) != 1:
        raise ValueError(f"logits_out must be {list(logits.shape)} with unit stride along the vocabulary, got "
                         f"{list(logits_out.shape)} with strides {list(logits_out.stride())}")
    for name, t, dtype in (("live", live, torch.int32), ("lengths", lengths, torch.int32),
                           ("next_tokens", next_tokens, torch.int64), ("tokens", tokens, torch.int64)):
        check_tensor(name, t, dim=1, dtypes=(dtype,), device=device)
        if t.shape[0] != rows or (rows and t.stride(0) != 1):
            raise ValueError(f"{name} must be [{rows}] (a row of logits each), contiguous; got {list(t.shape)}")


def launch_greedy(logits, live, logits_out, next_tokens, tokens, lengths) -> None:
    rows, vocab = logits.shape
    if rows:
        _greedy_kernel[(rows,)](logits, logits_out, live, lengths, next_tokens, tokens, vocab, logits.stride(0),
                                logits_out.stride(0), BLOCK_V=min(_BLOCK_V, next_power_of_2(max(vocab, 1))),
                                num_warps=_GREEDY_WARPS)


def greedy_(logits: torch.Tensor, live: torch.Tensor, logits_out: torch.Tensor, next_tokens: torch.Tensor,
            tokens: torch.Tensor, lengths: torch.Tensor) -> None:
    """The end of a decode step in one launch, in place: per row of ``logits`` ``[rows, vocab]``, its
    greedy token (``torch.argmax``'s: the first maximum, or the first NaN where there is one) to
    ``next_tokens`` and ``tokens`` (int64), its logits copied to ``logits_out`` (same shape and dtype), and
    ``lengths`` (int32) plus ``live`` (int32, 1 for a live row, 0 for a free slot)."""
    _check_greedy(logits, live, logits_out, next_tokens, tokens, lengths)
    launch_greedy(logits, live, logits_out, next_tokens, tokens, lengths)


def greedy_reference_(logits, live, logits_out, next_tokens, tokens, lengths) -> None:
    """PyTorch reference of :func:`greedy_`: the torch ops a step ran before it."""
    logits_out.copy_(logits)
    token = logits.argmax(-1)
    next_tokens.copy_(token)
    tokens.copy_(token)
    lengths.add_(live)
