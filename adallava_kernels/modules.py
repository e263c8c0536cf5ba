"""Drop-in ``nn.Module`` versions of the ops, driven by an ExecutionPlan layer."""

from __future__ import annotations

import torch
from torch import nn

from .ops.layout import prepare_column_gather
from .ops.masked_mlp import masked_mlp
from .plan import LayerPlan

__all__ = ["MaskedMLP"]


class MaskedMLP(nn.Module):
    """A transformers ``LlamaMLP`` that computes only the neurons its layer plan keeps.

    Holds the weights as the kernels read them: gate and up as given (shared
    with the source module), down as one column-major copy made here, so
    gathered columns are contiguous. Call :meth:`set_plan` once per request;
    ``forward(x)`` has ``LlamaMLP``'s signature, so the module can replace one.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *, backend: str = "auto"):
        super().__init__()
        self.gate_weight = nn.Parameter(w_gate, requires_grad=False)
        self.up_weight = nn.Parameter(w_up, requires_grad=False)
        self.down_weight = nn.Parameter(prepare_column_gather(w_down), requires_grad=False)
        self.backend = backend
        # The index of a full plan, kept so an unplanned forward allocates nothing.
        self.register_buffer(
            "all_neurons", torch.arange(w_gate.shape[0], dtype=torch.int32, device=w_gate.device), persistent=False
        )
        self._neurons: torch.Tensor | None = None

    @classmethod
    def from_hf(cls, mlp: nn.Module, *, backend: str = "auto") -> "MaskedMLP":
        """Wrap a transformers ``LlamaMLP`` (SwiGLU with SiLU, no biases)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(mlp, name, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"mlp.{name} must be an nn.Linear, got {type(linear).__name__}")
            if linear.bias is not None:
                raise ValueError(f"mlp.{name} has a bias; masked_mlp computes bias-free projections")
        act = getattr(mlp, "act_fn", None)
        if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
            raise ValueError(f"mlp.act_fn must be SiLU, got {type(act).__name__}")
        return cls(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data, backend=backend)

    def set_plan(self, layer: LayerPlan | None) -> None:
        """Run the neurons of ``layer`` from now on (``None``: all of them)."""
        if layer is not None and layer.neurons.numel() and int(layer.neurons[-1]) >= self.gate_weight.shape[0]:
            raise ValueError(
                f"layer plan {layer.index} addresses neuron {int(layer.neurons[-1])}, "
                f"but this MLP has {self.gate_weight.shape[0]}"
            )
        self._neurons = None if layer is None else layer.neurons.to(self.gate_weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neurons = self.all_neurons if self._neurons is None else self._neurons
        return masked_mlp(
            x, self.gate_weight, self.up_weight, self.down_weight, neurons, backend=self.backend, check_indices=False
        )
