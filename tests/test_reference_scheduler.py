"""The scheduler's rounds against an independent re-implementation of AdaLLaVA's reference rules.

The reference (``scheduler/scheduler_utils.py`` of the AdaLLaVA code base) spends ``n`` units in
rounds without replacement. -L: each round the largest remaining layer logit. -H: each round the
single largest remaining logit among all heads and MLP groups of all switchable layers; its layer
then takes its top-r heads and top-r groups still off. In training every choice is a hard
Gumbel-softmax at temperature tau (straight-through); at inference there is no noise.
"""

import math

import pytest
import torch

from adallava_kernels import ModelShape, UnitScheme, best_plan, neuron_groups
from model import scheduler as scheduler_module
from model.scheduler import sample_head_switches, sample_layer_switches

CASES = 200


def reference_units(scheme: UnitScheme, budget: float) -> int:
    return max(0, math.floor(scheme.total_units * budget) - scheme.prefix_units)


def reference_head_rounds(logits: list[list[list[float]]], n: int, r: int) -> set[tuple[int, int, int]]:
    """Inference -H rule on nested lists ``[layer][row][unit]``: the (layer, row, unit) switched on."""
    on: set[tuple[int, int, int]] = set()
    entries = [(v, (l, row, u)) for l, layer in enumerate(logits) for row, values in enumerate(layer)
               for u, v in enumerate(values)]
    for _ in range(n):
        best = max((e for e in entries if e[1] not in on), key=lambda e: e[0])
        layer = best[1][0]
        for row in range(2):
            left = [(v, u) for u, v in enumerate(logits[layer][row]) if (layer, row, u) not in on]
            for _, u in sorted(left, reverse=True)[:r]:
                on.add((layer, row, u))
    return on


def reference_layer_rounds(logits: list[float], n: int) -> set[int]:
    on: set[int] = set()
    for _ in range(n):
        on.add(max((v, i) for i, v in enumerate(logits) if i not in on)[1])
    return on


def random_head_scheme(g: torch.Generator) -> UnitScheme:
    heads = [4, 6, 8][int(torch.randint(3, (1,), generator=g))]
    ranks = [r for r in range(1, heads + 1) if heads % r == 0]
    rank = ranks[int(torch.randint(len(ranks), (1,), generator=g))]
    layers = int(torch.randint(2, 7, (1,), generator=g))
    prefix = int(torch.randint(0, layers, (1,), generator=g))
    shape = ModelShape(hidden_size=heads * 8, num_layers=layers, num_heads=heads, num_kv_heads=heads // 2,
                       head_dim=8, intermediate_size=10 * heads + 3, vocab_size=32)
    return UnitScheme("H", shape, prefix, rank)


def plan_units(plan, scheme: UnitScheme) -> set[tuple[int, int, int]]:
    """The (switchable layer, row, unit) a plan runs: row 0 heads, row 1 MLP groups (whole groups only)."""
    shape = scheme.shape
    groups = neuron_groups(shape.intermediate_size, shape.num_heads)
    units = set()
    for i in range(scheme.switchable_layers):
        layer = scheme.prefix_layers + i
        on = [q for q, group in enumerate(groups) if set(group) <= set(plan.neurons[layer])]
        assert sorted(n for q in on for n in groups[q]) == list(plan.neurons[layer])
        units |= {(i, 0, h) for h in plan.heads[layer]} | {(i, 1, q) for q in on}
    return units


def test_head_plans_equal_the_reference_rule():
    g = torch.Generator().manual_seed(0)
    for case in range(CASES):
        scheme = random_head_scheme(g)
        logits = torch.randn(scheme.switchable_layers, 2, scheme.shape.num_heads, generator=g)
        budget = 0.5 + 0.5 * float(torch.rand(1, generator=g))
        n = reference_units(scheme, budget)
        expected = reference_head_rounds(logits.tolist(), n, scheme.rank)
        assert len(expected) == 2 * scheme.rank * n
        plan = best_plan(scheme, budget, (logits[:, 0], logits[:, 1]))
        assert plan_units(plan, scheme) == expected, case
        switches = sample_head_switches(logits[None], torch.tensor([n]), scheme.rank, 5.0, noise=False)[0]
        assert {tuple(x) for x in switches.nonzero().tolist()} == expected, case


def test_layer_plans_equal_the_reference_rule():
    g = torch.Generator().manual_seed(1)
    for case in range(CASES):
        layers = int(torch.randint(2, 40, (1,), generator=g))
        prefix = int(torch.randint(0, layers, (1,), generator=g))
        shape = ModelShape(hidden_size=16, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=8,
                           intermediate_size=24, vocab_size=32)
        scheme = UnitScheme("L", shape, prefix)
        logits = torch.randn(layers - prefix, generator=g)
        budget = 0.5 + 0.5 * float(torch.rand(1, generator=g))
        n = reference_units(scheme, budget)
        expected = {prefix + i for i in reference_layer_rounds(logits.tolist(), n)}
        plan = best_plan(scheme, budget, logits)
        assert {i for i in range(prefix, layers) if plan.layer_mask[i]} == expected, case
        switches = sample_layer_switches(logits[None], torch.tensor([n]), 5.0, noise=False)[0]
        assert {prefix + i for i in switches.nonzero().flatten().tolist()} == expected


def _reference_st_choice(logits, taken, noise, tau, k):
    """The reference's masked Gumbel-softmax(-top-k), hard and straight-through."""
    z = ((logits + noise) / tau).masked_fill(taken, float("-inf"))
    soft = z.softmax(-1)
    hard = torch.zeros_like(z).scatter(-1, z.topk(k).indices, 1.0)
    return hard - soft.detach() + soft


def reference_head_training(logits, n, r, tau, noises):
    """One sample's -H training rounds (``logits [S, 2, H]``), with the given Gumbel draws per round."""
    layers, _, heads = logits.shape
    flat = logits.reshape(layers, 2 * heads)
    taken = torch.zeros_like(flat)
    for round_index in range(n):
        pick_noise, top_noise = noises[round_index]
        pick = _reference_st_choice(flat.reshape(-1), taken.reshape(-1) > 0, pick_noise, tau, 1)
        layer_mask = pick.view(layers, 2 * heads).sum(1)
        own_taken = (taken * layer_mask.detach()[:, None]).sum(0).view(2, heads) > 0
        own_logits = (flat * layer_mask[:, None]).sum(0).view(2, heads)
        rows = [_reference_st_choice(own_logits[i], own_taken[i], top_noise[i], tau, r) for i in range(2)]
        taken = taken + layer_mask[:, None] * torch.stack(rows).view(1, -1)
    return taken.view(layers, 2, heads)


def reference_layer_training(logits, n, tau, noises):
    taken = torch.zeros_like(logits)
    for round_index in range(n):
        taken = taken + _reference_st_choice(logits, taken > 0, noises[round_index], tau, 1)
    return taken


class RecordedNoise:
    """Gumbel draws handed out in order, standing in for ``model.scheduler._gumbel``."""

    def __init__(self, g: torch.Generator):
        self.g, self.draws = g, []

    def __call__(self, shape, like, generator=None):
        u = torch.rand(shape, generator=self.g).clamp(1e-6, 1 - 1e-6)
        self.draws.append(-torch.log(-torch.log(u)))
        return self.draws[-1]


@pytest.mark.parametrize("seed", range(4))
def test_head_training_rounds_equal_the_reference_with_the_same_noise(seed, monkeypatch):
    g = torch.Generator().manual_seed(100 + seed)
    batch, layers, heads, r, tau = 3, 3, 6, 2, 5.0
    logits = torch.randn(batch, layers, 2, heads, generator=g, requires_grad=True)
    units = torch.tensor([1, 4, 9])[torch.randperm(3, generator=g)]
    noise = RecordedNoise(g)
    monkeypatch.setattr(scheduler_module, "_gumbel", noise)
    ours = sample_head_switches(logits, units, r, tau)
    weight = torch.randn(ours.shape, generator=g)
    (grad,) = torch.autograd.grad((ours * weight).sum(), logits)
    pairs = list(zip(noise.draws[0::2], noise.draws[1::2]))  # per round: the pick, then the top r
    for b in range(batch):
        ref_logits = logits[b].detach().clone().requires_grad_(True)
        ref = reference_head_training(ref_logits, int(units[b]), r, tau, [(p[b], t[b]) for p, t in pairs])
        assert torch.equal(ours[b].detach(), ref.detach())
        (ref_grad,) = torch.autograd.grad((ref * weight[b]).sum(), ref_logits)
        torch.testing.assert_close(grad[b], ref_grad)


@pytest.mark.parametrize("seed", range(4))
def test_layer_training_rounds_equal_the_reference_with_the_same_noise(seed, monkeypatch):
    g = torch.Generator().manual_seed(200 + seed)
    logits = torch.randn(3, 8, generator=g, requires_grad=True)
    units = torch.tensor([1, 3, 8])
    noise = RecordedNoise(g)
    monkeypatch.setattr(scheduler_module, "_gumbel", noise)
    ours = sample_layer_switches(logits, units, 5.0)
    weight = torch.randn(ours.shape, generator=g)
    (grad,) = torch.autograd.grad((ours * weight).sum(), logits)
    for b in range(3):
        ref_logits = logits[b].detach().clone().requires_grad_(True)
        ref = reference_layer_training(ref_logits, int(units[b]), 5.0, [d[b] for d in noise.draws])
        assert torch.equal(ours[b].detach(), ref.detach())
        (ref_grad,) = torch.autograd.grad((ref * weight[b]).sum(), ref_logits)
        torch.testing.assert_close(grad[b], ref_grad)
