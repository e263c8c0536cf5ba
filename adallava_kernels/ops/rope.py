"""Rotary position embedding of the q and k heads of a stacked q|k|v projection, in place, in one pass.

A full attention layer (all heads on) projects q, k and v in one matmul over
the stacked weight; RoPE then rotates the q and k heads. In PyTorch that is
four launches and two intermediates the size of q|k; :func:`rope_` rotates
the first ``heads`` heads of the projection where they lie, reading and
writing each element once. (A partial layer rotates in the epilogue of its
gathered projection, ``ops.head_projection``.)

transformers' rule, ``x * cos + rotate_half(x) * sin``, equals
``x * cos + roll(x, d / 2) * signed_sin`` with ``signed_sin`` the sine with
its first half negated (a sign flip rounds nothing), which is how
:func:`rope` computes it.

- :func:`rope`, :func:`rope_sign`: PyTorch, the oracle and the CPU path;
- :func:`rope_triton_`: the Triton kernel launched directly (no
  ``torch.library`` dispatch), in place; ``torch.ops.adallava.rope_``,
  registered here, wraps it for tracing;
- :func:`rope_`: checked, with ``backend="auto" | "torch" | "triton"``.

The kernel computes each product in float32 and rounds it to the dtype, then
the sum, as PyTorch does in the dtype (the interpreter truncates where a GPU
rounds, an ulp of bf16 at most).
"""

from __future__ import annotations

import torch

from .common import cdiv, check_tensor, jit_where_available, next_power_of_2, resolve_backend
from .registry import register_op

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux x86-64 only; elsewhere the reference is the path.
    triton = tl = None

__all__ = ["TABLED_ROPE_TYPES", "rope", "rope_", "rope_sign", "rope_triton_", "rotary_tables"]

# Heads of one token per program: LLaVA-7B's 64 rotated q|k heads are 4 programs a token.
_BLOCK_HEADS = 16


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, with ``rotate_half(x) * sin == roll(x, d / 2) * signed_sin``
    where ``signed_sin`` is ``sin`` with its first half negated (exact: a sign flip rounds nothing)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


def rope_sign(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[-1] * (head_dim / 2) + [1] * (head_dim / 2)``: ``signed_sin = sin * rope_sign``."""
    sign = torch.ones(head_dim, dtype=dtype, device=device)
    sign[: head_dim // 2] = -1
    return sign


# Rope types whose frequencies do not depend on the sequence (transformers' ``rope_type``): a table of their
# rows is what the module gives a step at a time. A ``dynamic`` or ``longrope`` module rescales with the length.
TABLED_ROPE_TYPES = ("default", "linear", "llama3")


def rotary_tables(rotary, positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(cos, sin)`` ``[positions, head_dim]`` of positions ``0 .. positions - 1``, the rotary module's own
    output (transformers' ``rotary_emb(x, position_ids)``, in ``like``'s dtype and on its device), computed
    once so that a decode step reads its rows instead of computing them; each angle is one product of an
    inverse frequency and a position, as the module forms it a step at a time. ``None`` for a module whose
    ``rope_type`` is not in :data:`TABLED_ROPE_TYPES`."""
    if getattr(rotary, "rope_type", "default") not in TABLED_ROPE_TYPES:
        return None
    ids = torch.arange(positions, device=like.device)[None]
    cos, sin = rotary(like.new_empty(1, 1, 1), ids)
    return cos[0].contiguous(), sin[0].contiguous()



@jit_where_available
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, heads, seq, half,
    stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Token ``program_id(0)`` (batch-major), heads ``[program_id(1) * BLOCK_HEADS, + BLOCK_HEADS)``."""
    token = tl.program_id(0).to(tl.int64)
    b, t = token // seq, token % seq
    hs = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    mask = (hs < heads)[:, None] & col_mask[None, :]
    dtype = x_ptr.dtype.element_ty
    trig = b * stride_cb + t * stride_ct + cols
    cos1 = tl.load(cos_ptr + trig, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + trig + half, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + trig, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + trig + half, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    first = x_ptr + b * stride_xb + t * stride_xt + hs.to(tl.int64)[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    # Each product rounded to the dtype, then the sum, as the dtype's own ops round them.
    out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + half, out2.to(dtype), mask=mask)


def _check(x: object, cos: object, sin: object, heads: object) -> None:
    check_tensor("x", x, dim=4)
    batch, seq, total, d = x.shape
    if d % 2:
        raise ValueError(f"x must have an even head size (its last dim), got {list(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have unit stride along its head size, got strides {list(x.stride())}")
    if isinstance(heads, bool) or not isinstance(heads, int) or not 0 <= heads <= total:
        raise ValueError(f"heads must be an int in [0, {total}] (the heads of x to rotate), got {heads!r}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dim=3, dtypes=(x.dtype,), device=x.device)
        if t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq, d) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [{batch} or 1, {seq}, {d}] with unit stride along the last dim "
                             f"(the rotary module's), got {list(t.shape)}")
    if cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must share their strides, got {list(cos.stride())} and {list(sin.stride())}")


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    batch, seq, _, d = x.shape
    if batch * seq == 0 or heads == 0:
        return x
    half = d // 2
    _rope_kernel[(batch * seq, cdiv(heads, _BLOCK_HEADS))](
        x, cos, sin, heads, seq, half, x.stride(0), x.stride(1), x.stride(2),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1),
        BLOCK_HEADS=_BLOCK_HEADS, BLOCK_HALF=next_power_of_2(half),
    )
    return x


def rope_triton_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate heads ``[0, heads)`` of ``x`` in place with the Triton kernel, launched directly; checked like
    :func:`rope_`. Returns ``x``."""
    _check(x, cos, sin, heads)
    return _launch(x, cos, sin, heads)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, *, backend: str = "auto") -> torch.Tensor:
    """Rotate the first ``heads`` heads of ``x`` in place, as transformers' ``apply_rotary_pos_emb``.

    Args:
        x: ``[batch, seq, heads_total, head_dim]`` (fp32, fp16 or bf16; any strides but a unit one along
            ``head_dim``), e.g. a stacked q|k|v projection whose q and k heads come first.
        cos, sin: ``[batch or 1, seq, head_dim]`` in ``x``'s dtype, as transformers' rotary module returns.
        heads: how many leading heads to rotate (the rest, v, are left alone).
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Returns:
        ``x``, rotated.
    """
    _check(x, cos, sin, heads)
    chosen = resolve_backend("rope_", backend, x.device, None if triton is None else _rope_kernel)
    if chosen == "torch":
        part = x[:, :, :heads]
        part.copy_(rope(part, cos[:, :, None], (sin * rope_sign(x.shape[-1], x.dtype, x.device))[:, :, None]))
        return x
    if torch.compiler.is_compiling():
        torch.ops.adallava.rope_(x, cos, sin, heads)
        return x
    return _launch(x, cos, sin, heads)


# The kernel as an operator (what torch.compile traces, and what a decode step captured as a graph calls).
@register_op("rope_", mutates_args=("x",))
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    rope_triton_(x, cos, sin, heads)


@_rope_op.register_fake
def _(x, cos, sin, heads):
    return None
