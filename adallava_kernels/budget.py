"""Latency budgets as AdaLLaVA quantises them, and the best plan for a budget given switch scores.

A budget ``l`` in [0.5, 1.0] is the share of the model's units a request may
run. The first ``prefix_layers`` layers always run, so the scheduler spends
``floor(total_units * l) - prefix_units`` units on the remaining layers:

- AdaLLaVA-L: one unit per layer;
- AdaLLaVA-H: ``num_heads // rank`` units per layer, one unit being ``rank``
  attention heads plus ``rank`` MLP neuron groups of one layer.

At inference AdaLLaVA takes the best plan (no Gumbel noise), round by round
without replacement until the units are spent, as the reference
implementation's scheduler does: -L takes the best layer still off; -H takes
the single largest score still off among all heads and MLP groups of all
switchable layers, and that score's layer switches on its best ``rank``
heads and best ``rank`` MLP groups still off.

Equal units are equal FLOPs only for -L. An -H unit's cost depends on the
KV heads its query heads need (GQA), on the neurons of its groups, and on
whether it opens a sub-block (whose norm and residual add then run); so the
cost-aware mode (``best_plan(..., num_tokens=n)``, an option of this
project, not of AdaLLaVA) spends the budget in prefill FLOPs from
:mod:`adallava_kernels.cost` instead: a budget ``l`` buys ``l *
dense_layer_flops - prefix_layer_flops``, and units are taken in the same
order while the next one still fits.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .checks import check_int
from .cost import layer_ops
from .plan import ExecutionPlan, neuron_groups
from .shape import ModelShape, check_model_shape

__all__ = ["MIN_BUDGET", "MAX_BUDGET", "check_budget", "UnitScheme", "best_plan", "flops_budget", "layer_flops"]

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
        check_model_shape("shape", self.shape)
        check_int("prefix_layers", self.prefix_layers, 0)
        check_int("rank", self.rank, 1)
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
        check_model_shape("shape", shape)
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


def check_scheme(scheme: object) -> UnitScheme:
    """``scheme`` if it is a :class:`UnitScheme`, else ``ValueError`` naming ``scheme``."""
    if not isinstance(scheme, UnitScheme):
        raise ValueError(f"scheme must be a UnitScheme (UnitScheme.default(kind, shape)), got {type(scheme).__name__}")
    return scheme


def _topk_indices(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist()) if k else []


def layer_flops(shape: ModelShape, num_tokens: int, *, heads: int, kv_heads: int, neurons: int) -> float:
    """Prefill FLOPs of one decoder layer over ``num_tokens`` tokens with the given active units."""
    ops = layer_ops(shape, heads=heads, kv_heads=kv_heads, neurons=neurons, q_tokens=num_tokens, kv_tokens=num_tokens)
    return sum(op.flops for op in ops)


def flops_budget(scheme: UnitScheme, budget: float, num_tokens: int) -> float:
    """Prefill FLOPs the switchable layers may spend at ``budget``: ``l * dense - prefix`` (layers only).

    ``lm_head`` is left out: every plan runs it once, whatever the budget.
    """
    check_scheme(scheme)
    budget = check_budget(budget)
    check_int("num_tokens", num_tokens)
    s = scheme.shape
    dense = layer_flops(s, num_tokens, heads=s.num_heads, kv_heads=s.num_kv_heads, neurons=s.intermediate_size)
    return budget * s.num_layers * dense - scheme.prefix_layers * dense


def best_plan(
    scheme: UnitScheme,
    budget: float,
    scores: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    num_tokens: int | None = None,
) -> ExecutionPlan:
    """The highest-scoring plan that fits ``budget``.

    ``scores`` are the scheduler's logits over the switchable layers: for -L a
    tensor ``[switchable_layers]``; for -H a pair ``(head_scores,
    group_scores)``, each ``[switchable_layers, num_heads]``. For -H, each
    round takes the layer holding the largest score still off (heads and
    groups alike), which then switches on its best ``rank`` heads and best
    ``rank`` groups still off (AdaLLaVA's rule).

    Without ``num_tokens`` the budget is spent in equal units
    (:meth:`UnitScheme.units_for_budget`); with it, in prefill FLOPs over
    ``num_tokens`` tokens (:func:`flops_budget`): units are taken in score
    order, skipping any that no longer fits, until none fits.
    """
    check_scheme(scheme)
    budget = check_budget(budget)
    shape = scheme.shape
    if scheme.kind == "L":
        layer_scores = _check_scores(scores, "scores", (scheme.switchable_layers,))
        head_order = group_order = None
        unit_scores = layer_scores.view(-1, 1)
    else:
        if not (isinstance(scores, tuple) and len(scores) == 2):
            raise ValueError("scores for AdaLLaVA-H must be a pair (head_scores, group_scores)")
        expected = (scheme.switchable_layers, shape.num_heads)
        head_scores = _check_scores(scores[0], "head_scores", expected)
        group_scores = _check_scores(scores[1], "group_scores", expected)
        head_order, group_order, unit_scores = _head_units(scheme, head_scores, group_scores)
    if num_tokens is None:
        taken = _take_units(unit_scores, scheme.units_for_budget(budget), None)
    else:
        cost_of = _unit_costs(scheme, num_tokens, head_order, group_order)
        taken = _take_units(unit_scores, None, (flops_budget(scheme, budget, num_tokens), cost_of))
    return _plan_from_units(scheme, taken, head_order, group_order)


def _check_scores(scores: object, name: str, expected: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {list(expected)}")
    if tuple(scores.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} must be finite")
    return scores.detach().float().cpu()


def _head_units(scheme: UnitScheme, head_scores: torch.Tensor, group_scores: torch.Tensor):
    """Per layer, heads and groups in score order, and the score of each layer's k-th unit."""
    r = scheme.rank
    head_order = torch.argsort(head_scores, dim=1, descending=True, stable=True)
    group_order = torch.argsort(group_scores, dim=1, descending=True, stable=True)
    head_sorted = torch.gather(head_scores, 1, head_order)
    group_sorted = torch.gather(group_scores, 1, group_order)
    # Within a layer the next unit is always the best r heads and r groups still
    # off, so unit k is the k-th slice of the sorted scores, and the largest score
    # still off in the layer (the round's key) is the larger of the two slices' first.
    unit_scores = torch.maximum(
        head_sorted.view(scheme.switchable_layers, -1, r)[..., 0],
        group_sorted.view(scheme.switchable_layers, -1, r)[..., 0],
    )
    return head_order, group_order, unit_scores


def _take_units(unit_scores: torch.Tensor, units: int | None, flops: tuple | None) -> list[int]:
    """How many units each switchable layer takes, best next unit first.

    With ``units``, take that many. With ``flops = (budget, cost_of)``, take
    the best next unit whose marginal FLOPs ``cost_of(layer, k)`` still fit,
    until none does. Ties go to the lower layer.
    """
    layers, per_layer = unit_scores.shape
    scores = unit_scores.tolist()
    taken = [0] * layers
    left = None if flops is None else flops[0]
    # A heap of each layer's next unit, keyed (-score, layer): the best score first, ties to the lower
    # layer. A layer's next unit changes only when the layer takes one, and the FLOPs left only shrink,
    # so a unit that does not fit now never will: its layer leaves the heap.
    heap = [(-row[0], layer) for layer, row in enumerate(scores)] if per_layer else []
    heapq.heapify(heap)
    count = 0
    while heap and (units is None or count < units):
        _, layer = heapq.heappop(heap)
        k = taken[layer]
        if flops is not None:
            marginal = flops[1](layer, k)
            if marginal > left:
                continue
            left = left - marginal
        taken[layer], count = k + 1, count + 1
        if k + 1 < per_layer:
            heapq.heappush(heap, (-scores[layer][k + 1], layer))
    return taken


def _unit_costs(scheme: UnitScheme, num_tokens: int, head_order, group_order):
    """``cost_of(layer, k)``: prefill FLOPs that layer's unit ``k`` adds to its first ``k`` units."""
    shape = scheme.shape
    sizes = [len(g) for g in neuron_groups(shape.intermediate_size, shape.num_heads)]

    def flops_with(layer: int, units: int) -> float:
        if scheme.kind == "L":
            full = units > 0
            return layer_flops(
                shape, num_tokens, heads=shape.num_heads * full, kv_heads=shape.num_kv_heads * full,
                neurons=shape.intermediate_size * full,
            )
        heads = head_order[layer, : units * scheme.rank].tolist()
        groups = group_order[layer, : units * scheme.rank].tolist()
        return layer_flops(
            shape, num_tokens, heads=len(heads), kv_heads=len({h // shape.heads_per_kv_head for h in heads}),
            neurons=sum(sizes[g] for g in groups),
        )

    return lambda layer, k: flops_with(layer, k + 1) - flops_with(layer, k)


def _plan_from_units(scheme: UnitScheme, taken: list[int], head_order, group_order) -> ExecutionPlan:
    shape = scheme.shape
    if scheme.kind == "L":
        return ExecutionPlan.from_layer_mask([1] * scheme.prefix_layers + [int(k > 0) for k in taken], shape)
    # Layer i's units are its best k * rank heads and k * rank groups: the first ones in its orders.
    kept = np.array(taken)[:, None] * scheme.rank
    switches = np.ones((shape.num_layers, 2, shape.num_heads), dtype=bool)
    switches[scheme.prefix_layers:, 0] = _first_in_order(head_order, kept)
    switches[scheme.prefix_layers:, 1] = _first_in_order(group_order, kept)
    return ExecutionPlan.from_switches(switches, shape)


def _first_in_order(order: torch.Tensor, kept: np.ndarray) -> np.ndarray:
    """Bool ``[layers, n]``: True on each row's first ``kept[row]`` entries of ``order``, a permutation
    of each row (its inverse gives each entry's position in the order)."""
    return np.argsort(order.numpy(), axis=1) < kept
