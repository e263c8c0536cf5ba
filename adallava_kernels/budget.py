"""Latency budgets as AdaLLaVA quantises them, and the best plan for a budget given switch scores.

A budget ``l`` in [0.5, 1.0] is the share of the model's units a request may
run. The first ``prefix_layers`` layers always run, so the scheduler spends
``floor(total_units * l) - prefix_units`` units on the remaining layers:

- AdaLLaVA-L: one unit per layer;
- AdaLLaVA-H: ``num_heads // rank`` units per layer, one unit being ``rank``
  attention heads plus ``rank`` MLP neuron groups of one layer.

At inference AdaLLaVA takes the best plan (no Gumbel noise): the
highest-scoring units, without replacement, until the units are spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .plan import ExecutionPlan, neuron_groups
from .shape import ModelShape

__all__ = ["MIN_BUDGET", "MAX_BUDGET", "check_budget", "UnitScheme", "best_plan"]

MIN_BUDGET = 0.5
MAX_BUDGET = 1.0
SwitchKind = Literal["L", "H"]


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float, or raise ``ValueError`` unless it is in [0.5, 1.0]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not MIN_BUDGET <= budget <= MAX_BUDGET:
        raise ValueError(f"latency budget must be a number in [{MIN_BUDGET}, {MAX_BUDGET}], got {budget!r}")
    return float(budget)


@dataclass(frozen=True)
class UnitScheme:
    """How a switch kind divides a model into budget units."""

    kind: SwitchKind
    shape: ModelShape
    prefix_layers: int
    rank: int = 8

    def __post_init__(self) -> None:
        if self.kind not in ("L", "H"):
            raise ValueError(f"kind must be 'L' or 'H', got {self.kind!r}")
        if not 0 <= self.prefix_layers < self.shape.num_layers:
            raise ValueError(
                f"prefix_layers must be in [0, {self.shape.num_layers}), got {self.prefix_layers}"
            )
        if self.kind == "H" and (self.rank < 1 or self.shape.num_heads % self.rank != 0):
            raise ValueError(
                f"rank must divide num_heads ({self.shape.num_heads}) for AdaLLaVA-H, got {self.rank}"
            )

    @classmethod
    def default(cls, kind: SwitchKind, shape: ModelShape, rank: int = 8) -> "UnitScheme":
        """The paper's setting: the first half of the layers is the prefix."""
        return cls(kind, shape, shape.num_layers // 2, rank)

    @property
    def units_per_layer(self) -> int:
        return 1 if self.kind == "L" else self.shape.num_heads // self.rank

    @property
    def total_units(self) -> int:
        return self.shape.num_layers * self.units_per_layer

    @property
    def prefix_units(self) -> int:
        return self.prefix_layers * self.units_per_layer

    @property
    def switchable_layers(self) -> int:
        return self.shape.num_layers - self.prefix_layers

    def units_for_budget(self, budget: float) -> int:
        """Units the scheduler may switch on: ``floor(total * l) - prefix``, at least 0."""
        budget = check_budget(budget)
        # The epsilon keeps budgets such as 0.7 * 128 = 89.6 from rounding on a
        # representation error when the product is a whole number.
        return max(0, math.floor(self.total_units * budget + 1e-9) - self.prefix_units)


def _topk_indices(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist()) if k else []


def best_plan(scheme: UnitScheme, budget: float, scores: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> ExecutionPlan:
    """The highest-scoring plan that fits ``budget``.

    ``scores`` are the scheduler's logits over the switchable layers: for -L a
    tensor ``[switchable_layers]``; for -H a pair ``(head_scores,
    group_scores)``, each ``[switchable_layers, num_heads]``. For -H, each
    round takes the layer whose next unit (its best ``rank`` heads and best
    ``rank`` groups still off) scores highest on average.
    """
    units = scheme.units_for_budget(budget)
    shape = scheme.shape
    if scheme.kind == "L":
        return _best_layer_plan(scheme, units, _check_scores(scores, "scores", (scheme.switchable_layers,)))
    if not (isinstance(scores, tuple) and len(scores) == 2):
        raise ValueError("scores for AdaLLaVA-H must be a pair (head_scores, group_scores)")
    expected = (scheme.switchable_layers, shape.num_heads)
    head_scores = _check_scores(scores[0], "head_scores", expected)
    group_scores = _check_scores(scores[1], "group_scores", expected)
    return _best_head_plan(scheme, units, head_scores, group_scores)


def _check_scores(scores: object, name: str, expected: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {list(expected)}")
    if tuple(scores.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} must be finite")
    return scores.detach().float().cpu()


def _best_layer_plan(scheme: UnitScheme, units: int, scores: torch.Tensor) -> ExecutionPlan:
    mask = [1] * scheme.prefix_layers + [0] * scheme.switchable_layers
    for i in _topk_indices(scores, units):
        mask[scheme.prefix_layers + i] = 1
    return ExecutionPlan.from_layer_mask(mask, scheme.shape)


def _best_head_plan(
    scheme: UnitScheme, units: int, head_scores: torch.Tensor, group_scores: torch.Tensor
) -> ExecutionPlan:
    r = scheme.rank
    head_order = torch.argsort(head_scores, dim=1, descending=True, stable=True)
    group_order = torch.argsort(group_scores, dim=1, descending=True, stable=True)
    head_sorted = torch.gather(head_scores, 1, head_order)
    group_sorted = torch.gather(group_scores, 1, group_order)
    # Within a layer the next unit is always the best r of what is still off,
    # so unit k of a layer is the k-th slice of its sorted scores.
    unit_scores = (
        head_sorted.view(scheme.switchable_layers, -1, r).mean(-1)
        + group_sorted.view(scheme.switchable_layers, -1, r).mean(-1)
    ) / 2
    taken = [0] * scheme.switchable_layers
    for _ in range(units):
        candidates = [
            (unit_scores[layer, k].item(), -layer)
            for layer, k in enumerate(taken) if k < scheme.units_per_layer
        ]
        _, neg_layer = max(candidates)
        taken[-neg_layer] += 1

    shape = scheme.shape
    groups = neuron_groups(shape.intermediate_size, shape.num_heads)
    heads = [range(shape.num_heads)] * scheme.prefix_layers
    neurons = [range(shape.intermediate_size)] * scheme.prefix_layers
    for layer, k in enumerate(taken):
        heads.append(sorted(head_order[layer, : k * r].tolist()))
        chosen_groups = sorted(group_order[layer, : k * r].tolist())
        neurons.append([n for g in chosen_groups for n in groups[g]])
    return ExecutionPlan(shape, heads, neurons)
