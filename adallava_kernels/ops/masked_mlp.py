"""Neuron-masked SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` over the active neurons only.

The reference gathers the active rows of ``w_gate`` and ``w_up`` and the
active columns of ``w_down`` and multiplies by nothing else, so its FLOPs
fall with the active neurons; it copies the gathered weights on every call.
The Triton path reads the weights in place through the index list: gate and
up in one pass with SiLU-and-multiply fused, the activation written once at
width ``n_active``, then the column-gathered down projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_index, check_same_dtype, check_tensor, resolve_backend

__all__ = ["masked_mlp", "masked_mlp_reference", "masked_mlp_triton"]


def masked_mlp_triton(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, active_neurons: torch.Tensor
) -> torch.Tensor:
    """Triton path, without input checks (``masked_mlp`` checks)."""
    from .gathered_linear import col_gathered_linear, swiglu_gathered

    hidden_act = swiglu_gathered(x, w_gate, w_up, active_neurons)
    return col_gathered_linear(hidden_act, w_down, active_neurons)


def masked_mlp_reference(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, active_neurons: torch.Tensor
) -> torch.Tensor:
    """PyTorch reference, without input checks: the oracle for the kernels and the CPU backend."""
    idx = active_neurons.long()
    gate = F.linear(x, w_gate.index_select(0, idx))
    up = F.linear(x, w_up.index_select(0, idx))
    return F.linear(F.silu(gate) * up, w_down.index_select(1, idx))


def masked_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    active_neurons: torch.Tensor,
    *,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """SwiGLU MLP of a Llama decoder layer computed over ``active_neurons`` only.

    Equals a transformers ``LlamaMLP`` whose ``down_proj`` columns of the
    inactive neurons are zero; with no active neuron the output is zero.

    Args:
        x: ``[..., hidden]`` activations (fp32, fp16 or bf16).
        w_gate, w_up: ``[intermediate, hidden]`` (``nn.Linear`` layout), dtype of ``x``.
        w_down: ``[hidden, intermediate]``, dtype of ``x``; any strides, e.g. the
            column-major copy from ``prepare_column_gather`` that the Triton path reads faster.
        active_neurons: 1-D int32/int64 indices into ``intermediate``, sorted and
            unique, on the device of ``x``.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
        check_indices: check the values of ``active_neurons`` (one host sync on
            a GPU). Indices from an ``ExecutionPlan`` are already checked.

    Returns:
        ``[..., hidden]`` in the dtype of ``x``.
    """
    check_tensor("x", x, min_dim=1)
    device = x.device
    check_tensor("w_gate", w_gate, dim=2, device=device)
    check_tensor("w_up", w_up, dim=2, device=device)
    check_tensor("w_down", w_down, dim=2, device=device)
    check_same_dtype("x", x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    intermediate, hidden = w_gate.shape
    if x.shape[-1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[-1]}, but w_gate is {list(w_gate.shape)} ([intermediate, hidden])")
    if tuple(w_up.shape) != (intermediate, hidden):
        raise ValueError(f"w_up must have shape {[intermediate, hidden]} like w_gate, got {list(w_up.shape)}")
    if tuple(w_down.shape) != (hidden, intermediate):
        raise ValueError(f"w_down must have shape {[hidden, intermediate]}, got {list(w_down.shape)}")
    check_index("active_neurons", active_neurons, intermediate, device, check_values=check_indices)

    if resolve_backend("masked_mlp", backend, device, masked_mlp_triton) == "triton":
        return masked_mlp_triton(x, w_gate, w_up, w_down, active_neurons)
    return masked_mlp_reference(x, w_gate, w_up, w_down, active_neurons)
