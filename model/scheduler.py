"""Latency encoder, scheduler and switch sampling.

The budget ``l`` is quantised to whole units (``UnitScheme.units_for_budget``)
and embedded as one extra token. After the prefix layers a linear scheduler
reads that token's hidden state and gives one logit per switch of the
remaining layers: -L ``[batch, switchable_layers]``; -H ``[batch,
switchable_layers, 2, num_heads]`` (row 0 heads, row 1 MLP groups).

Switches are taken without replacement until the budget's units are spent:

- training: rounds of hard Gumbel-softmax with the straight-through estimator,
  so the 0/1 switches carry gradients to the logits. -L picks one layer per
  round. -H picks one layer per round (Gumbel-softmax over each layer's next
  unit score: the mean logit of its best ``rank`` heads and ``rank`` groups
  still off), then switches those heads and groups on (straight-through over
  a softmax of the layer's remaining logits).
- inference: no noise, the best plan: :func:`adallava_kernels.best_plan`
  (equal units, or prefill FLOPs with ``budget_cost="flops"``).

The deterministic baseline instead switches on every logit above 0 (a hard
sigmoid, straight-through) and learns the budget from a penalty.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from adallava_kernels import ExecutionPlan, UnitScheme, best_plan, check_budget, neuron_groups

__all__ = [
    "LatencyEncoder",
    "Scheduler",
    "budget_units",
    "deterministic_switches",
    "gates_from_plan",
    "gates_from_switches",
    "plan_from_switches",
    "sample_head_switches",
    "sample_layer_switches",
    "switch_latency",
]

# Logits of switches already on: finite, so a round over a full layer gives
# zero probability rather than NaN.
_TAKEN = -1e9


def budget_units(scheme: UnitScheme, budgets: torch.Tensor | float) -> torch.Tensor:
    """Units each budget buys, as a long tensor ``[batch]`` (every budget checked against [0.5, 1.0])."""
    values = torch.as_tensor(budgets, dtype=torch.float64).flatten().tolist()
    return torch.tensor([scheme.units_for_budget(check_budget(v)) for v in values], dtype=torch.long)


class LatencyEncoder(nn.Module):
    """The budget's units as one token: sine and cosine features, then LayerNorm, Linear, GELU, Linear.

    The encoded value is ``units / (switchable_units + 1)``, so every budget
    that buys the same units gets the same token.
    """

    def __init__(self, hidden_size: int, scheme: UnitScheme, num_freqs: int = 128) -> None:
        super().__init__()
        self.scheme = scheme
        freqs = 1.0 / 10000 ** (torch.arange(num_freqs, dtype=torch.float32) / num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        self.net = nn.Sequential(
            nn.LayerNorm(2 * num_freqs), nn.Linear(2 * num_freqs, hidden_size), nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def level(self, budgets: torch.Tensor | float) -> torch.Tensor:
        """The encoded value of each budget, ``[batch]`` float32."""
        switchable = self.scheme.switchable_layers * self.scheme.units_per_layer
        return budget_units(self.scheme, budgets).float() / (switchable + 1)

    def forward(self, budgets: torch.Tensor | float) -> torch.Tensor:
        """``[batch, hidden]`` latency tokens, in the dtype of the encoder's weights."""
        weight = self.net[1].weight
        angles = self.level(budgets).to(weight.device)[:, None] * self.freqs
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return self.net(features.to(weight.dtype))


class Scheduler(nn.Module):
    """A linear layer from the latency token's hidden state to the switch logits (float32)."""

    def __init__(self, hidden_size: int, scheme: UnitScheme) -> None:
        super().__init__()
        self.scheme = scheme
        per_layer = 1 if scheme.kind == "L" else 2 * scheme.shape.num_heads
        self.proj = nn.Linear(hidden_size, scheme.switchable_layers * per_layer)

    def forward(self, latency_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.proj(latency_hidden.to(self.proj.weight.dtype)).float()
        if self.scheme.kind == "L":
            return logits
        return logits.view(-1, self.scheme.switchable_layers, 2, self.scheme.shape.num_heads)

    def best_plan(self, logits: torch.Tensor, budget: float, num_tokens: int | None = None) -> ExecutionPlan:
        """The inference plan of one sample's logits (no noise)."""
        scores = logits if self.scheme.kind == "L" else (logits[:, 0], logits[:, 1])
        return best_plan(self.scheme, budget, scores, num_tokens=num_tokens)


def _straight_through_one_hot(logits: torch.Tensor, tau: float, noise: bool, generator=None) -> torch.Tensor:
    """Hard one-hot of ``argmax(logits + gumbel)`` over the last dim, with the gradient of the soft sample."""
    if noise:
        device = logits.device if generator is None else generator.device
        uniform = torch.rand(logits.shape, device=device, generator=generator).to(logits.device).clamp_(1e-10, 1 - 1e-7)
        logits = logits - torch.log(-torch.log(uniform))
    soft = F.softmax(logits / tau, dim=-1)
    hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly hard in the forward


def _active_rounds(units: torch.Tensor, round_index: int, like: torch.Tensor) -> torch.Tensor:
    """1 for the samples whose budget buys more than ``round_index`` units, as ``[batch, 1]``."""
    return (units.to(like.device) > round_index).to(like.dtype)[:, None]


def sample_layer_switches(
    logits: torch.Tensor, units: torch.Tensor, tau: float, *, noise: bool = True, generator=None
) -> torch.Tensor:
    """-L: ``units[b]`` layers per sample, one per round without replacement; ``[batch, layers]`` of 0/1."""
    switches = torch.zeros_like(logits)
    for r in range(int(units.max()) if units.numel() else 0):
        masked = logits.masked_fill(switches.detach() > 0, _TAKEN)
        pick = _straight_through_one_hot(masked, tau, noise, generator)
        switches = switches + pick * _active_rounds(units, r, logits)
    return switches


def _top_remaining(logits: torch.Tensor, taken: torch.Tensor, rank: int, tau: float):
    """Per layer, the best ``rank`` entries still off: straight-through mask and their mean logit."""
    masked = logits.masked_fill(taken.detach() > 0, _TAKEN)
    values, index = masked.topk(rank, dim=-1)
    hard = torch.zeros_like(logits).scatter_(-1, index, 1.0)
    soft = rank * F.softmax(masked / tau, dim=-1)
    return hard + (soft - soft.detach()), values.mean(-1)


def sample_head_switches(
    logits: torch.Tensor, units: torch.Tensor, rank: int, tau: float, *, noise: bool = True, generator=None
) -> torch.Tensor:
    """-H: ``units[b]`` rounds per sample; each switches ``rank`` heads and ``rank`` groups of one layer on.

    ``logits`` is ``[batch, layers, 2, heads]``; returns 0/1 switches of the same shape.
    """
    heads_on = torch.zeros_like(logits[:, :, 0])
    groups_on = torch.zeros_like(heads_on)
    for r in range(int(units.max()) if units.numel() else 0):
        head_pick, head_score = _top_remaining(logits[:, :, 0], heads_on, rank, tau)
        group_pick, group_score = _top_remaining(logits[:, :, 1], groups_on, rank, tau)
        full = heads_on.detach().sum(-1) >= heads_on.shape[-1]
        layer_score = ((head_score + group_score) / 2).masked_fill(full, _TAKEN)
        layer = _straight_through_one_hot(layer_score, tau, noise, generator) * _active_rounds(units, r, logits)
        heads_on = heads_on + layer[..., None] * head_pick
        groups_on = groups_on + layer[..., None] * group_pick
    return torch.stack([heads_on, groups_on], dim=2)


def deterministic_switches(logits: torch.Tensor) -> torch.Tensor:
    """The deterministic baseline: on where the logit is positive (straight-through sigmoid)."""
    soft = torch.sigmoid(logits)
    return (logits > 0).to(soft.dtype) + (soft - soft.detach())


def switch_latency(switches: torch.Tensor, scheme: UnitScheme) -> torch.Tensor:
    """Share of the model's units a switch tensor runs, ``[batch]``, differentiable (the prefix included)."""
    if scheme.kind == "L":
        on_units = switches.sum(-1)
    else:
        on_units = switches.sum(dim=(-1, -2)) / (2 * scheme.rank)
        on_units = on_units.sum(-1)
    return (scheme.prefix_units + on_units) / scheme.total_units


def plan_from_switches(switches: torch.Tensor, scheme: UnitScheme) -> ExecutionPlan:
    """The plan of one sample's 0/1 switches (``[layers]`` for -L, ``[layers, 2, heads]`` for -H)."""
    shape = scheme.shape
    on = (switches.detach() > 0.5).cpu()
    if scheme.kind == "L":
        return ExecutionPlan.from_layer_mask([1] * scheme.prefix_layers + on.int().tolist(), shape)
    prefix = torch.ones(scheme.prefix_layers, 2, shape.num_heads, dtype=torch.bool)
    return ExecutionPlan.from_switches(torch.cat([prefix, on]), shape)


def _group_of_neuron(intermediate_size: int, num_groups: int) -> torch.Tensor:
    owner = torch.empty(intermediate_size, dtype=torch.long)
    for g, neurons in enumerate(neuron_groups(intermediate_size, num_groups)):
        owner[neurons.start:neurons.stop] = g
    return owner


def gates_from_switches(switches: torch.Tensor, scheme: UnitScheme) -> dict[int, tuple]:
    """Per switchable layer: ``(layer_gate [batch] or None, head_gate [batch, heads] or None,
    neuron_gate [batch, intermediate] or None)`` multiplying that layer's outputs."""
    gates = {}
    owner = None if scheme.kind == "L" else _group_of_neuron(scheme.shape.intermediate_size, scheme.shape.num_heads)
    for i in range(scheme.switchable_layers):
        layer = scheme.prefix_layers + i
        if scheme.kind == "L":
            gates[layer] = (switches[:, i], None, None)
        else:
            gates[layer] = (None, switches[:, i, 0], switches[:, i, 1][:, owner.to(switches.device)])
    return gates


def gates_from_plan(plans: list[ExecutionPlan], scheme: UnitScheme, device, dtype) -> dict[int, tuple]:
    """The 0/1 gates of one plan per sample over the switchable layers (the masked reference)."""
    shape = scheme.shape
    gates = {}
    for layer in range(scheme.prefix_layers, shape.num_layers):
        heads = torch.zeros(len(plans), shape.num_heads, dtype=dtype)
        neurons = torch.zeros(len(plans), shape.intermediate_size, dtype=dtype)
        for b, plan in enumerate(plans):
            heads[b, list(plan.heads[layer])] = 1
            neurons[b, list(plan.neurons[layer])] = 1
        gates[layer] = (None, heads.to(device), neurons.to(device))
    return gates
