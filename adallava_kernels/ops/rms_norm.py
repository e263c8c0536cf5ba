"""transformers' ``LlamaRMSNorm``, fused with the residual add that precedes it in a decoder layer.

A Llama decoder layer adds a sub-block's output to the residual stream and
normalises the sum for the next sub-block. :func:`fused_add_rms_norm` does
both in one pass over the row::

    new_residual = x + residual                              # in x's dtype, as torch rounds it
    h = new_residual.float()
    normed = weight * (h * rsqrt(mean(h**2) + eps)).to(x.dtype)

that is, ``LlamaRMSNorm(x + residual)``: normalised in float32, rounded to
the input dtype, then scaled by the weight in that dtype. It returns
``(normed, new_residual)``; with ``residual=None`` (a decoder's first
sub-block, which has nothing to add) ``new_residual`` is ``x`` itself, so a
layer loop reads ``h, residual = fused_add_rms_norm(out, residual, w, eps)``
throughout. :func:`rms_norm` is the norm alone.

- :func:`rms_norm_reference`, :func:`fused_add_rms_norm_reference`: PyTorch,
  the oracle and the CPU path;
- :func:`rms_norm_triton`, :func:`fused_add_rms_norm_triton`: the Triton
  kernel launched directly (no ``torch.library`` dispatch: the cheaper call
  in eager mode), with optional ``out=`` buffers; ``torch.ops.adallava.rms_norm``
  and ``fused_add_rms_norm``, registered here, wrap them for tracing;
- :func:`rms_norm`, :func:`fused_add_rms_norm`: checked, with
  ``backend="auto" | "torch" | "triton"``; their Triton path launches
  directly, and goes through the registered op under ``torch.compile``.

One program per row holds the whole row: it reads ``x`` and ``residual``
once and writes ``new_residual`` and ``normed`` once. The kernel has no
autotune list: the row fixes the block, and the warps follow from it.
"""

from __future__ import annotations

import math

import torch

from .common import INTERPRETING, check_same_dtype, check_tensor, jit_where_available, next_power_of_2, resolve_backend
from .registry import register_op

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux x86-64 only; elsewhere the reference is the path.
    triton = tl = None

__all__ = [
    "MAX_HIDDEN",
    "rms_norm",
    "fused_add_rms_norm",
    "rms_norm_reference",
    "fused_add_rms_norm_reference",
    "rms_norm_triton",
    "fused_add_rms_norm_triton",
]

# The kernel keeps a row in registers: past this the row spills, and a
# row-split kernel would be needed (no Llama comes close: LLaVA-13B is 5120).
MAX_HIDDEN = 65536
# Elements of a row per thread: a 4096-wide row gets 8 warps, 8192 gets 16.
_ELEMENTS_PER_THREAD = 16



@jit_where_available
def _round_to_bf16(x):
    """float32 to bfloat16, rounded to nearest even by hand: Triton's interpreter truncates (finite x only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit_where_available
def _round(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        return _round_to_bf16(x)
    return x.to(dtype)


@jit_where_available
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, eps,
    stride_x, stride_residual, stride_out, stride_residual_out,
    HAS_RESIDUAL: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row ``program_id(0)``: with HAS_RESIDUAL, ``residual_out = x + residual`` and the norm of that;
    else the norm of ``x``. Every load precedes every store, so the outputs may be the inputs."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # torch adds two 16-bit tensors in float32 and rounds once: the same here matches it bit for bit.
        x = _round(x.to(tl.float32) + residual.to(tl.float32), dtype, ROUND_BF16)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    # Masked lanes hold zeros: they add nothing to the sum of squares.
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    # LlamaRMSNorm rounds the normalised row to the dtype before scaling it, and
    # torch multiplies two 16-bit tensors in float32 with one rounding.
    normed = _round(h * rstd, dtype, ROUND_BF16).to(tl.float32)
    out = _round(weight.to(tl.float32) * normed, dtype, ROUND_BF16)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


@jit_where_available
def normed_tile(a, norm_ptrs, mask, squares, UPCAST: tl.constexpr):
    """One K tile of x ``[rows, BLOCK_K]`` entering a projection through the norm: ``x * weight`` (rounded
    to x's dtype, the operand of the dot), and ``squares`` ``[rows]`` plus the tile's sum of squares.

    A projection of RMSNorm(x) is ``rsqrt(mean(x**2) + eps) * (x * weight) @ W.T``: the row's scale is
    one number, so it goes on the fp32 accumulator after the reduction (:func:`rms_scale`), and the norm
    needs no pass of its own over the row. ``norm_ptrs`` and ``mask`` have x's tile shape (every row the
    weight's same elements): the weight then loads as x does, whole vectors into the loop's pipeline,
    where a ``[BLOCK_K]`` or ``[1, BLOCK_K]`` load is one element a thread, waited for in every iteration.
    One rounding to the dtype where ``LlamaRMSNorm`` has two (normalised row, then weight times it): the
    result differs from the unfused layer by that rounding."""
    h = a.to(tl.float32)
    squares += tl.sum(h * h, axis=1)
    weight = tl.load(norm_ptrs, mask=mask, other=0.0).to(tl.float32)
    scaled = h * weight
    if UPCAST:  # the interpreter truncates float32 to bfloat16: round to nearest by hand
        if a.dtype == tl.bfloat16:
            return _round_to_bf16(scaled), squares
    return scaled.to(a.dtype), squares


@jit_where_available
def rms_scale(squares, hidden, eps):
    """``rsqrt(mean(x**2) + eps)`` of each row from its sum of squares over ``hidden`` elements."""
    return tl.rsqrt(squares / hidden + eps)


# -- reference ---------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm`` with ``weight``, without input checks: the oracle and the CPU path.

    Bit for bit transformers' module for float32, float16 and bfloat16 inputs.
    float64 inputs are normalised in float64 (transformers would drop to
    float32), which makes this the float64 oracle of the tests.
    """
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm_reference(x + residual), x + residual)``, without input checks."""
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps), new_residual


# -- checks ------------------------------------------------------------------


def check_norm_weight(norm_weight: torch.Tensor | None, x: torch.Tensor) -> None:
    """A norm fused into a projection of ``x`` takes a contiguous weight ``[hidden]`` of ``x``'s dtype and device."""
    if norm_weight is None:
        return
    hidden = x.shape[-1]
    if (norm_weight.shape != (hidden,) or norm_weight.dtype != x.dtype or norm_weight.device != x.device
            or not norm_weight.is_contiguous()):
        raise ValueError(f"norm_weight must be a contiguous {x.dtype} tensor of shape [{hidden}] on {x.device} "
                         f"(x's last dim), got {norm_weight.dtype} {list(norm_weight.shape)} on {norm_weight.device}")


def _check_inputs(x: object, residual: object, weight: object, eps: object) -> None:
    """What both backends require; the messages name the argument and the rule."""
    check_tensor("x", x, min_dim=1)
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError(f"x must have a hidden size (last dim) of at least 1, got shape {list(x.shape)}")
    if residual is not None:
        check_tensor("residual", residual, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {list(x.shape)}, got {list(residual.shape)}")
        check_same_dtype("x", x, residual=residual)
    check_tensor("weight", weight, device=x.device)
    if tuple(weight.shape) != (hidden,):
        raise ValueError(f"weight must have shape [hidden] = [{hidden}] (the last dim of x), got {list(weight.shape)}")
    check_same_dtype("x", x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def _check_hidden(hidden: int) -> None:
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"the Triton RMSNorm holds a row in registers, up to hidden size {MAX_HIDDEN}; got {hidden} "
            f"(use backend='torch')"
        )


def _output(name: str, out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not (isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
            and out.device == x.device and out.is_contiguous()):
        got = f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{name} must be a contiguous {x.dtype} tensor of the shape of x {list(x.shape)} on {x.device}, got {got}"
        )
    return out


# -- Triton launch -----------------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, hidden]`` with unit stride along hidden: a view where its strides allow, else one copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_warps(block: int) -> int:
    return min(32, max(4, block // (32 * _ELEMENTS_PER_THREAD)))


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    out: torch.Tensor, residual_out: torch.Tensor | None,
) -> None:
    if x.numel() == 0:
        return
    hidden = x.shape[-1]
    x2 = _as_rows(x)
    residual2 = x2 if residual is None else _as_rows(residual)
    out2 = out.view(-1, hidden)
    residual_out2 = out2 if residual_out is None else residual_out.view(-1, hidden)
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, residual2, weight.contiguous(), out2, residual_out2,
        hidden, float(eps),
        x2.stride(0), residual2.stride(0), out2.stride(0), residual_out2.stride(0),
        HAS_RESIDUAL=residual is not None, ROUND_BF16=INTERPRETING and x.dtype == torch.bfloat16,
        BLOCK=block, num_warps=_num_warps(block),
    )


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    out = _output("out", out, x)
    _launch(x, None, weight, eps, out, None)
    return out


def _fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    out: torch.Tensor | None, residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _output("out", out, x)
    residual_out = _output("residual_out", residual_out, x)
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton RMSNorm of ``x`` ``[..., hidden]``, launched directly; checked like :func:`rms_norm`.

    ``out``: a contiguous buffer of the shape and dtype of ``x`` to write
    into (it may be ``x`` itself); a new tensor when ``None``.
    """
    _check_inputs(x, None, weight, eps)
    _check_hidden(x.shape[-1])
    return _rms_norm_triton(x, weight, eps, out)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton ``(normed, x + residual)``, launched directly; checked like :func:`fused_add_rms_norm`.

    ``out``, ``residual_out``: contiguous buffers of the shape and dtype of
    ``x`` for ``normed`` and the new residual; either may be one of the
    inputs (``residual_out=residual`` updates the residual stream in place).
    """
    if residual is None:
        raise ValueError("residual must be a tensor; for the norm alone call rms_norm_triton")
    _check_inputs(x, residual, weight, eps)
    _check_hidden(x.shape[-1])
    return _fused_add_rms_norm_triton(x, residual, weight, eps, out, residual_out)


# -- public ------------------------------------------------------------------


def _backend(backend: str, device: torch.device) -> str:
    return resolve_backend("rms_norm", backend, device, None if triton is None else _rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` of ``x`` with ``weight``.

    Args:
        x: ``[..., hidden]`` (fp32, fp16 or bf16), any strides.
        weight: ``[hidden]``, dtype and device of ``x``.
        eps: added to the mean square, ``> 0``.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Returns:
        ``[..., hidden]`` in the dtype of ``x``.
    """
    _check_inputs(x, None, weight, eps)
    if _backend(backend, x.device) == "torch":
        return rms_norm_reference(x, weight, eps)
    _check_hidden(x.shape[-1])
    if torch.compiler.is_compiling():
        return torch.ops.adallava.rms_norm(x, weight, eps)
    return _rms_norm_triton(x, weight, eps, None)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LlamaRMSNorm(x + residual), x + residual)`` in one pass.

    Args:
        x: ``[..., hidden]`` (fp32, fp16 or bf16), any strides: a sub-block's output.
        residual: the residual stream, the shape, dtype and device of ``x``; or
            ``None``, which returns ``(rms_norm(x), x)`` (``x`` itself, not a copy).
        weight: ``[hidden]``, dtype and device of ``x``.
        eps: added to the mean square, ``> 0``.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Returns:
        ``(normed, new_residual)``, both ``[..., hidden]`` in the dtype of ``x``;
        ``new_residual`` equals ``x + residual`` bit for bit.
    """
    if residual is None:
        return rms_norm(x, weight, eps, backend=backend), x
    _check_inputs(x, residual, weight, eps)
    if _backend(backend, x.device) == "torch":
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    _check_hidden(x.shape[-1])
    if torch.compiler.is_compiling():
        return torch.ops.adallava.fused_add_rms_norm(x, residual, weight, eps)
    return _fused_add_rms_norm_triton(x, residual, weight, eps, None, None)


# The kernels as operators (what torch.compile traces, and what a decode step captured as a graph calls).
@register_op("rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_triton(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@register_op("fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_rms_norm_triton(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)
