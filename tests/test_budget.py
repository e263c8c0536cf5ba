import pytest
import torch
from _shapes import GQA6

from adallava_kernels import UnitScheme, best_plan, check_budget, cost, get_shape, neuron_groups

S7 = get_shape("llava-7b")


@pytest.mark.parametrize("budget", [0.49, 1.01, -1, float("nan"), "0.7", True, None])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match=r"latency budget must be a number in \[0.5, 1.0\]"):
        check_budget(budget)


@pytest.mark.parametrize(
    "kind, budget, units",
    [("L", 0.5, 0), ("L", 0.6, 3), ("L", 0.85, 11), ("L", 1.0, 16),
     ("H", 0.5, 0), ("H", 0.6, 12), ("H", 0.7, 25), ("H", 0.85, 44), ("H", 1.0, 64)],
)
def test_units_for_budget(kind, budget, units):
    # floor(total * l) - prefix: -L 32 and 16, -H 128 and 64
    assert UnitScheme.default(kind, S7).units_for_budget(budget) == units


def test_scheme_validation():
    with pytest.raises(ValueError, match="kind must be"):
        UnitScheme("X", S7, 16)
    with pytest.raises(ValueError, match="prefix_layers"):
        UnitScheme("L", S7, 32)
    with pytest.raises(ValueError, match="rank must divide num_heads"):
        UnitScheme("H", S7, 16, rank=5)


def test_layer_plan_keeps_prefix_and_best_layers():
    scores = torch.arange(16, dtype=torch.float32)  # later layers score higher
    plan = best_plan(UnitScheme.default("L", S7), 0.6, scores)
    assert plan.layer_mask == (True,) * 16 + (False,) * 13 + (True,) * 3


def test_head_plan_takes_best_heads_and_groups():
    shape = GQA6  # 4 layers, 6 heads
    scheme = UnitScheme("H", shape, prefix_layers=2, rank=3)  # 2 units per layer
    head_scores = torch.tensor([[0.0, 5, 4, 3, 2, 1], [9, 8, 7, 0, 0, 0]])
    group_scores = torch.tensor([[1.0, 1, 1, 0, 0, 0], [0, 0, 0, 9, 9, 9]])
    plan = best_plan(scheme, 0.75, (head_scores, group_scores))  # floor(8 * 0.75) - 4 = 2 units
    assert plan.heads[:2] == (tuple(range(6)),) * 2
    # Round 1: the largest score (9) is in layer 3; round 2: layer 3's best left is 0, layer 2's is 5.
    assert plan.heads[3] == (0, 1, 2) and plan.heads[2] == (1, 2, 3)
    groups = neuron_groups(520, 6)  # 87, 87, 87, 87, 86, 86 neurons
    assert plan.neurons[3] == tuple(range(groups[3].start, 520))
    assert plan.neurons[2] == tuple(range(groups[3].start))


def test_head_plan_round_goes_to_the_single_largest_score_not_the_best_mean():
    scheme = UnitScheme("H", GQA6, prefix_layers=2, rank=3)
    head_scores = torch.tensor([[10.0, 0, 0, 0, 0, 0], [5, 5, 5, 0, 0, 0]])
    group_scores = torch.tensor([[0.0, 0, 0, 0, 0, 0], [5, 5, 5, 0, 0, 0]])
    plan = best_plan(scheme, 0.625, (head_scores, group_scores))  # floor(8 * 0.625) - 4 = 1 unit
    # Layer 3's unit has the better mean (5 against 10/3 and 0), but layer 2 holds the largest score.
    assert plan.heads[2] == (0, 1, 2) and plan.heads[3] == ()


@pytest.mark.parametrize("kind", ["L", "H"])
def test_plans_never_exceed_the_budget_share(kind):
    scheme = UnitScheme.default(kind, S7)
    g = torch.Generator().manual_seed(1)
    full = cost.prefill_flops(S7, 700)
    for budget in torch.linspace(0.5, 1.0, 23).tolist():
        scores = torch.randn(16, generator=g) if kind == "L" else (torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g))
        plan = best_plan(scheme, budget, scores)
        assert plan.layer_mask[:16] == (True,) * 16
        units_used = sum(plan.layer_mask[16:]) if kind == "L" else sum(map(len, plan.heads[16:])) // 8
        assert units_used == scheme.units_for_budget(budget)
        # Units are equal shares of the layers, so FLOPs (without lm_head) follow.
        share = (16 * scheme.units_per_layer + units_used) / scheme.total_units
        assert cost.prefill_flops(S7, 700, plan) / full <= share + 1e-3


def test_bad_scores():
    with pytest.raises(ValueError, match=r"scores must have shape \[16\]"):
        best_plan(UnitScheme.default("L", S7), 0.7, torch.zeros(15))
    with pytest.raises(ValueError, match="pair"):
        best_plan(UnitScheme.default("H", S7), 0.7, torch.zeros(16, 32))
    with pytest.raises(ValueError, match="group_scores must be finite"):
        best_plan(UnitScheme.default("H", S7), 0.7, (torch.zeros(16, 32), torch.full((16, 32), float("nan"))))


def _next_unit_costs(scheme, plan, scores, num_tokens):
    """Marginal prefill FLOPs of the unit each switchable layer would take next (written independently)."""
    from adallava_kernels.budget import layer_flops

    shape, r = scheme.shape, scheme.rank
    sizes = [len(g) for g in neuron_groups(shape.intermediate_size, shape.num_heads)]

    def flops(heads, groups):
        kv = len({h // shape.heads_per_kv_head for h in heads})
        return layer_flops(shape, num_tokens, heads=len(heads), kv_heads=kv, neurons=sum(sizes[g] for g in groups))

    out = []
    for i, layer in enumerate(range(scheme.prefix_layers, shape.num_layers)):
        if scheme.kind == "L":
            if not plan.layer_mask[layer]:
                out.append(flops(range(shape.num_heads), range(shape.num_heads)))
            continue
        k = len(plan.heads[layer]) // r
        if k == shape.num_heads // r:
            continue
        heads = sorted(range(shape.num_heads), key=lambda h: -scores[0][i, h].item())
        groups = sorted(range(shape.num_heads), key=lambda h: -scores[1][i, h].item())
        assert sorted(heads[: k * r]) == list(plan.heads[layer])
        out.append(flops(heads[: (k + 1) * r], groups[: (k + 1) * r]) - flops(heads[: k * r], groups[: k * r]))
    return out


@pytest.mark.parametrize("kind, shape", [("L", S7), ("H", S7), ("H", GQA6)])
def test_cost_aware_plans_fit_and_use_the_flops_budget(kind, shape):
    from adallava_kernels.budget import flops_budget

    rank = 8 if shape is S7 else 3
    scheme = UnitScheme("H" if kind == "H" else "L", shape, shape.num_layers // 2, rank)
    g = torch.Generator().manual_seed(2)
    n = scheme.switchable_layers
    tokens = 650
    for budget in (torch.rand(60, generator=g) * 0.5 + 0.5).tolist() + [0.5, 1.0]:
        scores = torch.randn(n, generator=g) if kind == "L" else (
            torch.randn(n, shape.num_heads, generator=g), torch.randn(n, shape.num_heads, generator=g))
        plan = best_plan(scheme, budget, scores, num_tokens=tokens)
        prefix_and_head = cost.prefill_flops(shape, tokens, ExecutionPlan_prefix(scheme))
        spent = cost.prefill_flops(shape, tokens, plan) - prefix_and_head
        allowed = flops_budget(scheme, budget, tokens)
        assert spent <= allowed * (1 + 1e-12) + 1e-6
        # Nothing more fits: every unit still off costs more than what is left.
        left = allowed - spent
        assert all(c > left for c in _next_unit_costs(scheme, plan, scores, tokens))


def ExecutionPlan_prefix(scheme):
    from adallava_kernels import ExecutionPlan

    s = scheme.shape
    return ExecutionPlan.from_layer_mask([1] * scheme.prefix_layers + [0] * scheme.switchable_layers, s)


def test_cost_aware_layer_plan_equals_unit_plan():
    # Every -L unit costs one layer, so both modes buy the same layers.
    scheme = UnitScheme.default("L", S7)
    g = torch.Generator().manual_seed(3)
    for budget in torch.linspace(0.5, 1.0, 11).tolist():
        scores = torch.randn(16, generator=g)
        assert best_plan(scheme, budget, scores, num_tokens=333) == best_plan(scheme, budget, scores)


def test_flops_budget_checks_tokens():
    from adallava_kernels.budget import flops_budget

    with pytest.raises(ValueError, match="num_tokens must be an int >= 1"):
        flops_budget(UnitScheme.default("L", S7), 0.7, 0)
    with pytest.raises(ValueError, match="latency budget"):
        best_plan(UnitScheme.default("L", S7), 0.4, torch.zeros(16), num_tokens=5)
