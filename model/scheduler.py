"""Latency encoder, scheduler and switch sampling.

The budget ``l`` is quantised to whole units (``UnitScheme.units_for_budget``)
and embedded as one extra token. After the prefix layers a linear scheduler
reads that token's hidden state and gives one logit per switch of the
remaining layers: -L ``[batch, switchable_layers]``; -H ``[batch,
switchable_layers, 2, num_heads]`` (row 0 heads, row 1 MLP groups).

Switches are taken without replacement until the budget's units are spent,
as the reference implementation does (``n_times_gumbel_softmax`` and its
head version in AdaLLaVA's ``scheduler/scheduler_utils.py``):

- -L: each round takes the best layer still off.
- -H: each round takes the single largest logit still off among all heads and
  MLP groups of all switchable layers; that logit's layer is the round's
  layer, and it switches on its best ``rank`` heads and its best ``rank``
  MLP groups still off.
- training: every choice is a hard Gumbel-softmax (temperature ``tau``) with
  the straight-through estimator, so the 0/1 switches carry gradients to the
  logits; the top-``rank`` choices of -H draw fresh noise.
- inference: no noise, the best plan: :func:`adallava_kernels.best_plan`
  (equal units as above, or prefill FLOPs with ``budget_cost="flops"``, an
  option of this project).

The deterministic baseline instead switches on every logit above 0 (a hard
sigmoid, straight-through) and learns the budget from a penalty.

Per batch: :func:`insert_latency_token` puts each sample's token after its
prompt; :func:`plan_from_logits` (inference) and :func:`sample_switches`
(training) turn the scheduler's logits into plans or switches.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from adallava_kernels import ExecutionPlan, UnitScheme, best_plan, check_budget, neuron_groups
from adallava_kernels.checks import check_instance

from .outputs import IGNORE_INDEX

__all__ = [
    "LatencyEncoder",
    "Scheduler",
    "budget_units",
    "check_budgets",
    "check_plans",
    "deterministic_switches",
    "gates_from_plan",
    "gates_from_switches",
    "insert_latency_token",
    "plan_from_logits",
    "plan_from_switches",
    "sample_head_switches",
    "sample_layer_switches",
    "sample_switches",
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

    The encoded value is ``v = units / (switchable_units + 1)``, so every
    budget that buys the same units gets the same token; the features are
    ``sin(2 pi v f_i)`` then ``cos(2 pi v f_i)`` with ``f_i = 1 / 10000 **
    (i / num_freqs)``, as the reference's ``latency_encoding``.
    """

    def __init__(self, hidden_size: int, scheme: UnitScheme, num_freqs: int = 128) -> None:
        super().__init__()
        self.scheme = scheme
        # Not a buffer: transformers' from_pretrained leaves non-persistent buffers uninitialised.
        self.num_freqs = num_freqs
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
        freqs = 1.0 / 10000 ** (torch.arange(self.num_freqs, dtype=torch.float32, device=weight.device) / self.num_freqs)
        angles = (self.level(budgets).to(weight.device) * (2 * math.pi))[:, None] * freqs
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


def _gumbel(shape: torch.Size, like: torch.Tensor, generator=None) -> torch.Tensor:
    """Gumbel(0, 1) noise of ``shape`` on ``like``'s device (drawn on the generator's device)."""
    device = like.device if generator is None else generator.device
    uniform = torch.rand(shape, device=device, generator=generator).to(like.device).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(uniform))


def _straight_through_top_k(logits: torch.Tensor, k: int, tau: float, noise: bool, generator=None) -> torch.Tensor:
    """Hard 0/1 of the top ``k`` of ``logits + gumbel`` over the last dim, with the gradient of
    ``softmax((logits + gumbel) / tau)`` (the reference's ``masked_gumbel_softmax(_topk)``)."""
    if noise:
        logits = logits + _gumbel(logits.shape, logits, generator)
    soft = F.softmax(logits / tau, dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0)
    return hard + (soft - soft.detach())  # exactly hard in the forward


def _active_rounds(units: torch.Tensor, round_index: int, like: torch.Tensor) -> torch.Tensor:
    """1 for the samples whose budget buys more than ``round_index`` units, as ``[batch, 1]``."""
    return (units.to(like.device) > round_index).to(like.dtype)[:, None]


def sample_layer_switches(
    logits: torch.Tensor, units: torch.Tensor, tau: float, *, noise: bool = True, generator=None
) -> torch.Tensor:
    """-L: ``units[b]`` layers per sample, one per round without replacement; ``[batch, layers]`` of 0/1.

    Noise: one ``[batch, layers]`` draw per round.
    """
    switches = torch.zeros_like(logits)
    for r in range(int(units.max()) if units.numel() else 0):
        masked = logits.masked_fill(switches.detach() > 0, _TAKEN)
        pick = _straight_through_top_k(masked, 1, tau, noise, generator)
        switches = switches + pick * _active_rounds(units, r, logits)
    return switches


def sample_head_switches(
    logits: torch.Tensor, units: torch.Tensor, rank: int, tau: float, *, noise: bool = True, generator=None
) -> torch.Tensor:
    """-H: ``units[b]`` rounds per sample; each switches ``rank`` heads and ``rank`` groups of one layer on.

    ``logits`` is ``[batch, layers, 2, heads]``; returns 0/1 switches of the same shape. A round
    picks the largest remaining logit over every head and group of every layer (its layer is the
    round's layer, straight-through), then that layer's top ``rank`` heads and top ``rank`` groups
    still off (straight-through, over the layer's logits). Noise: per round, one ``[batch, layers *
    2 * heads]`` draw for the pick, then one ``[batch, 2, heads]`` draw for the top ``rank``.
    """
    batch, layers, _, heads = logits.shape
    taken = torch.zeros_like(logits)
    for r in range(int(units.max()) if units.numel() else 0):
        remaining = logits.masked_fill(taken.detach() > 0, _TAKEN).flatten(1)
        pick = _straight_through_top_k(remaining, 1, tau, noise, generator)
        layer = pick.view(batch, layers, 2 * heads).sum(-1) * _active_rounds(units, r, logits)
        # The round's layer as a [batch, 2, heads] row, through the (one-hot) layer switch as the reference does.
        layer_logits = (logits * layer[:, :, None, None]).sum(1)
        layer_taken = (taken.detach() * layer.detach()[:, :, None, None]).sum(1)
        top = _straight_through_top_k(layer_logits.masked_fill(layer_taken > 0, _TAKEN), rank, tau, noise, generator)
        taken = taken + layer[:, :, None, None] * top[:, None]
    return taken


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


# -- a batch: its latency tokens, and its plans or switches --------------------------------------


def check_budgets(latency_budget, batch: int) -> list[float]:
    """One budget per sample from one number or one per sample, each checked against [0.5, 1.0]."""
    if isinstance(latency_budget, (str, bytes, bool)):
        raise TypeError(f"latency_budget must be a number or one number per sample, got {type(latency_budget).__name__}")
    try:
        values = torch.as_tensor(latency_budget, dtype=torch.float64).flatten().tolist()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"latency_budget must be a number or one number per sample, got "
                        f"{type(latency_budget).__name__}") from None
    if len(values) not in (1, batch):
        raise ValueError(f"latency_budget must be one number or one per sample ({batch}), got {len(values)}")
    return [check_budget(v) for v in (values * batch if len(values) == 1 else values)]


def check_inputs(input_ids, pixel_values, attention_mask) -> None:
    """The tensors of a planned call: ``input_ids`` ``[batch, prompt]``, images and a mask where given, else a
    ``TypeError`` or ``ValueError`` naming the argument (before anything is embedded or admitted)."""
    check_instance("input_ids", input_ids, torch.Tensor, "a torch.Tensor of token ids [batch, prompt]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt], got shape {list(input_ids.shape)}")
    if pixel_values is not None:
        check_instance("pixel_values", pixel_values, torch.Tensor, "a torch.Tensor of images or None")
    if attention_mask is not None:
        check_instance("attention_mask", attention_mask, torch.Tensor, "a torch.Tensor [batch, prompt] or None")


def check_plans(plan, batch: int, scheme: UnitScheme) -> list[ExecutionPlan] | None:
    """One plan per sample from one plan or one per sample (``None``: the scheduler plans), each for
    the scheme's model and running its prefix layers whole."""
    if plan is None:
        return None
    if isinstance(plan, (str, bytes)) or not isinstance(plan, (ExecutionPlan, Sequence)):
        raise TypeError(f"plan must be an ExecutionPlan or one per sample, got {type(plan).__name__}")
    plans = [plan] * batch if isinstance(plan, ExecutionPlan) else list(plan)
    if len(plans) != batch:
        raise ValueError(f"plan must be one ExecutionPlan or one per sample ({batch}), got {len(plans)}")
    for p in plans:
        if not isinstance(p, ExecutionPlan):
            raise ValueError(f"plan must hold ExecutionPlans, got {type(p).__name__}")
        p.check_shape(scheme.shape)
        if not all(p.layer_mask[: scheme.prefix_layers]) or any(
            len(p.heads[i]) < p.shape.num_heads or len(p.neurons[i]) < p.shape.intermediate_size
            for i in range(scheme.prefix_layers)
        ):
            raise ValueError(f"plan must run the {scheme.prefix_layers} prefix layers whole")
    return plans


def insert_latency_token(encoder: LatencyEncoder, embeds, mask2d, labels, budgets, position):
    """Put each sample's latency token after its prompt: before the first answer label, else after the
    last attended token, or at ``position``. Returns the new embeds, mask, labels and positions."""
    batch, seq = mask2d.shape
    if position is not None:
        where = torch.as_tensor(position, dtype=torch.long).flatten().expand(batch).tolist()
    else:
        where = []
        for b in range(batch):
            answer = [] if labels is None else (labels[b] != IGNORE_INDEX).nonzero().flatten().tolist()
            attended = mask2d[b].nonzero().flatten()
            where.append(answer[0] if answer else int(attended[-1]) + 1 if attended.numel() else seq)
    for b, w in enumerate(where):
        if not 0 <= w <= seq:
            raise ValueError(f"latency_position {w} for sample {b} is outside [0, {seq}]")
    tokens = encoder(budgets).to(embeds.dtype)
    one = mask2d.new_ones(1)
    rows = [(torch.cat([embeds[b, :w], tokens[b:b + 1], embeds[b, w:]]),
             torch.cat([mask2d[b, :w], one, mask2d[b, w:]])) for b, w in enumerate(where)]
    new_labels = None
    if labels is not None:
        ignore = labels.new_full((1,), IGNORE_INDEX)
        new_labels = torch.stack([torch.cat([labels[b, :w], ignore, labels[b, w:]]) for b, w in enumerate(where)])
    where = torch.tensor(where, dtype=torch.long, device=embeds.device)
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), new_labels, where


def plan_from_logits(scheduler: Scheduler, config, logits: torch.Tensor, budgets: Sequence[float],
                     mask2d: torch.Tensor) -> list[ExecutionPlan]:
    """Inference plans: the best plan under each budget, priced in equal units or (``budget_cost="flops"``)
    at each sample's prompt length (deterministic mode: the logits' signs)."""
    if config.scheduler_mode == "deterministic":
        return [plan_from_switches(s, config.scheme) for s in (logits > 0).float()]
    if config.budget_cost == "units":
        tokens = [None] * mask2d.shape[0]
    else:
        tokens = [int(n) for n in mask2d.sum(-1).tolist()]
    return [scheduler.best_plan(logits[b], budgets[b], tokens[b]) for b in range(len(budgets))]


def sample_switches(config, logits: torch.Tensor, budgets: Sequence[float], generator=None) -> torch.Tensor:
    """Training switches (0/1 values carrying straight-through gradients)."""
    scheme = config.scheme
    if config.scheduler_mode == "deterministic":
        return deterministic_switches(logits)
    units = budget_units(scheme, torch.tensor(budgets))
    tau = config.gumbel_tau
    if scheme.kind == "L":
        return sample_layer_switches(logits, units, tau, generator=generator)
    return sample_head_switches(logits, units, scheme.rank, tau, generator=generator)
