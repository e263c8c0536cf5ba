"""Neuron-masked SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` over the active neurons only.

The reference gathers the active rows of ``w_gate`` and ``w_up`` and the
active columns of ``w_down`` and multiplies by nothing else, so its FLOPs
fall with the active neurons; it copies the gathered weights on every call.
The Triton path (:func:`masked_mlp_triton`) reads the weights in place
through the index list: gate and up in one pass with SiLU-and-multiply fused,
the activation written once at width ``n_active``, then the column-gathered
down projection.

:class:`MlpProgram` is one layer's MLP under one layer plan, resolved once
(the one planned MLP: ``MaskedMLP`` and the runtime's ``LayerProgram`` run
it): with every neuron on, dense matmuls over gate and up stacked
(:class:`MlpWeights`); with some off, the Triton path, or (``"torch"``)
dense matmuls over a copy of the plan's rows and columns gathered once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import check_index, check_same_dtype, check_tensor, resolve_backend
from .library import eager_launchers
from .silu_and_mul import silu_and_mul

# The Triton operators (registered by importing ops.library), launched without the dispatcher but under
# torch.compile.
_LAUNCH = eager_launchers()

__all__ = ["MlpProgram", "MlpWeights", "masked_mlp", "masked_mlp_reference", "masked_mlp_triton"]


def masked_mlp_triton(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, active_neurons: torch.Tensor
) -> torch.Tensor:
    """Triton path, without input checks (``masked_mlp`` checks; an :class:`MlpProgram` checked at plan time)."""
    hidden_act = _LAUNCH.swiglu_gathered(x, w_gate, w_up, active_neurons)
    return _LAUNCH.col_gathered_linear(hidden_act, w_down, active_neurons)


@dataclass(frozen=True)
class MlpWeights:
    """One SwiGLU MLP's weights as a planned MLP reads them (made once per model)."""

    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate_proj and up_proj stacked
    w_down: torch.Tensor  # [hidden, intermediate], any layout
    w_down_columns: torch.Tensor | None  # w_down column-major, for gathered columns (None: plans keep every neuron)

    @property
    def intermediate_size(self) -> int:
        return self.w_down.shape[1]

    @property
    def w_gate(self) -> torch.Tensor:
        return self.w_gate_up[: self.intermediate_size]

    @property
    def w_up(self) -> torch.Tensor:
        return self.w_gate_up[self.intermediate_size:]


class MlpProgram:
    """One MLP under one layer plan's ``neurons`` (int32, on the weights' device), resolved at plan time;
    ``backend`` is resolved (``"torch"`` or ``"triton"``)."""

    def __init__(self, weights: MlpWeights, neurons: torch.Tensor, backend: str) -> None:
        full = neurons.numel() == weights.intermediate_size
        self.backend = backend
        self.gathered = backend == "triton" and neurons.numel() > 0 and not full
        self.all_neurons = None  # a full plan's neuron list, for the fused decode pass on Triton
        if backend == "triton" and full:
            self.w_gate, self.w_up, self.all_neurons = weights.w_gate, weights.w_up, neurons
            hidden = weights.w_down.shape[0]
            self.w_down, self.hidden_rows = weights.w_down, torch.arange(hidden, dtype=torch.int32,
                                                                         device=weights.w_down.device)
        if self.gathered:
            self.w_gate, self.w_up, self.neurons = weights.w_gate, weights.w_up, neurons
            self.w_down_columns = weights.w_down if weights.w_down_columns is None else weights.w_down_columns
        elif full:
            self.w_gate_up_t, self.w_down_t = weights.w_gate_up.t(), weights.w_down.t()
        else:
            rows = torch.cat([neurons, neurons + weights.intermediate_size]).long()
            self.w_gate_up_t = weights.w_gate_up.index_select(0, rows).t()
            self.w_down_t = weights.w_down.index_select(1, neurons.long()).t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gathered:
            return masked_mlp_triton(x, self.w_gate, self.w_up, self.w_down_columns, self.neurons)
        return silu_and_mul(x @ self.w_gate_up_t, backend=self.backend) @ self.w_down_t

    def add_to(self, x: torch.Tensor, residual: torch.Tensor, *, decode: bool = False) -> torch.Tensor:
        """``residual + self(x)``, the residual add fused into the down projection. ``decode`` (a few tokens,
        Triton): gate and up with SiLU-and-multiply in one gathered pass, every neuron when the plan keeps
        them all, so a decode MLP is two launches whatever its plan."""
        if self.gathered:
            act = _LAUNCH.swiglu_gathered(x, self.w_gate, self.w_up, self.neurons)
            return _LAUNCH.col_gathered_linear(act, self.w_down_columns, self.neurons, None, None, residual)
        if decode and self.all_neurons is not None:
            act = _LAUNCH.swiglu_gathered(x, self.w_gate, self.w_up, self.all_neurons)
            # The dense down projection with the residual added, a GEMV over every row of w_down in one
            # launch (addmm's split-K GEMV takes two and a copy).
            return _LAUNCH.row_gathered_linear(act, self.w_down, self.hidden_rows, residual)
        act = silu_and_mul(x @ self.w_gate_up_t, backend=self.backend)
        return self.down_add(act, residual)

    def down_add(self, act: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + act @ w_down.T`` in one matmul over the dense ``down_proj`` (not a gathered plan)."""
        hidden = residual.shape[-1]
        return torch.addmm(residual.reshape(-1, hidden), act.reshape(-1, act.shape[-1]),
                           self.w_down_t).view(residual.shape)


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
