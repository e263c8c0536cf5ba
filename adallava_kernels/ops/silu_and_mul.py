"""SwiGLU's activation in one pass: ``silu(gate) * up`` of a stacked ``[..., 2 * n]`` gate|up projection.

A full MLP layer (all neurons on) projects gate and up in one matmul over the
stacked ``gate|up`` weight; what follows is elementwise. In PyTorch that is
three launches (a SiLU, two slices' multiply) and an intermediate the size of
the gate; :func:`silu_and_mul` reads each element of the projection once and
writes the activation once. (A partial MLP layer fuses this into its gathered
gate|up kernel, ``ops.gathered_linear.swiglu_gathered``.)

- :func:`silu_and_mul_reference`: PyTorch, the oracle and the CPU path
  (transformers' ``act_fn(gate) * up``);
- :func:`silu_and_mul_triton`: the Triton kernel launched directly (no
  ``torch.library`` dispatch), with an optional ``out=`` buffer;
  ``torch.ops.adallava.silu_and_mul``, registered here, wraps it for tracing;
- :func:`silu_and_mul`: checked, with ``backend="auto" | "torch" | "triton"``.

The kernel computes in float32 and rounds once to the input dtype, where
PyTorch rounds the SiLU and then the product: the two differ by at most an
ulp of the dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import cdiv, check_tensor, jit_where_available, resolve_backend
from .registry import register_op

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux x86-64 only; elsewhere the reference is the path.
    triton = tl = None

__all__ = ["silu_and_mul", "silu_and_mul_reference", "silu_and_mul_triton"]

# Elements of a row per program: a 4096-neuron half is 4 programs, 11008 is 11.
_BLOCK = 1024



@jit_where_available
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, n, stride_in, stride_out, BLOCK: tl.constexpr):
    """Row ``program_id(0)``, columns ``[program_id(1) * BLOCK, + BLOCK)`` of the activation."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :n]) * gate_up[..., n:]``, without input checks."""
    n = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :n]) * gate_up[..., n:]


def _check(gate_up: object) -> None:
    check_tensor("gate_up", gate_up, min_dim=1)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must stack gate and up along its last dim (an even size), got {list(gate_up.shape)}")


def _output(out: torch.Tensor | None, shape: list[int], gate_up: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    if not (isinstance(out, torch.Tensor) and list(out.shape) == shape and out.dtype == gate_up.dtype
            and out.device == gate_up.device and out.is_contiguous()):
        got = f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a contiguous {gate_up.dtype} tensor of shape {shape} on {gate_up.device}, "
                         f"got {got}")
    return out


def _launch(gate_up: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    n = gate_up.shape[-1] // 2
    out = _output(out, [*gate_up.shape[:-1], n], gate_up)
    rows = gate_up.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] and n:
        _silu_and_mul_kernel[(rows.shape[0], cdiv(n, _BLOCK))](
            rows, out, n, rows.stride(0), n, BLOCK=_BLOCK)
    return out


def silu_and_mul_triton(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton activation of ``gate_up`` ``[..., 2 * n]`` -> ``[..., n]``, launched directly; checked like
    :func:`silu_and_mul`. ``out``: a contiguous buffer of the result's shape and dtype (new when ``None``)."""
    _check(gate_up)
    return _launch(gate_up, out)


def silu_and_mul(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[..., 2 * n]`` (gate first, as the stacked ``gate|up`` weight
    projects them), any leading shape, fp32, fp16 or bf16 -> ``[..., n]`` in its dtype.

    ``backend``: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``. The Triton path
    launches directly in eager mode and goes through ``torch.ops.adallava.silu_and_mul`` under
    ``torch.compile``.
    """
    _check(gate_up)
    chosen = resolve_backend("silu_and_mul", backend, gate_up.device, None if triton is None else _silu_and_mul_kernel)
    if chosen == "torch":
        return silu_and_mul_reference(gate_up)
    if torch.compiler.is_compiling():
        return torch.ops.adallava.silu_and_mul(gate_up)
    return _launch(gate_up, None)


# The kernel as an operator (what torch.compile traces, and what a decode step captured as a graph calls).
@register_op("silu_and_mul", mutates_args=())
def _silu_and_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_triton(gate_up)


@_silu_and_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
