"""Predicted cost of the plans AdaLLaVA-L and -H keep at each budget.

Scores stand in for a trained scheduler's logits (seeded random); the number
of units a budget buys, and so the FLOPs, do not depend on them.
"""

from __future__ import annotations

import torch

from adallava_kernels import ExecutionPlan, ModelShape, UnitScheme, best_plan, cost
from adallava_kernels.devices import DeviceSpec

from ._common import flops_text, format_table


def random_scores(scheme: UnitScheme, generator: torch.Generator):
    layers = scheme.switchable_layers
    if scheme.kind == "L":
        return torch.randn(layers, generator=generator)
    heads = scheme.shape.num_heads
    return torch.randn(layers, heads, generator=generator), torch.randn(layers, heads, generator=generator)


def run(
    shape: ModelShape, budgets: list[float], device: DeviceSpec, num_tokens: int, context_len: int, seed: int = 0
) -> list[dict]:
    full = ExecutionPlan.full(shape)
    full_prefill = cost.prefill_cost(shape, num_tokens, full)
    full_decode = cost.decode_cost(shape, context_len, full)
    full_prefill_s = cost.roofline(full_prefill, device).total_seconds
    full_decode_s = cost.roofline(full_decode, device).total_seconds
    rows = []
    for kind in ("L", "H"):
        scheme = UnitScheme.default(kind, shape)
        generator = torch.Generator().manual_seed(seed)
        for budget in budgets:
            plan = best_plan(scheme, budget, random_scores(scheme, generator))
            prefill = cost.prefill_cost(shape, num_tokens, plan)
            decode = cost.decode_cost(shape, context_len, plan)
            prefill_s = cost.roofline(prefill, device).total_seconds
            decode_s = cost.roofline(decode, device).total_seconds
            rows.append({
                "kind": f"AdaLLaVA-{kind}",
                "budget": budget,
                "units": scheme.units_for_budget(budget),
                "layers_on": sum(plan.layer_mask),
                "heads_on": sum(map(len, plan.heads)),
                "neurons_on": sum(map(len, plan.neurons)),
                "prefill_flops": prefill.flops,
                "prefill_flops_ratio": prefill.flops / full_prefill.flops,
                "prefill_roofline_s": prefill_s,
                "prefill_roofline_ratio": prefill_s / full_prefill_s,
                "decode_flops": decode.flops,
                "decode_roofline_s": decode_s,
                "decode_roofline_ratio": decode_s / full_decode_s,
                "kv_bytes": cost.kv_cache_bytes(shape, context_len, plan),
                "plan": plan.to_json(),
            })
    return rows


COLUMNS = [
    ("kind", "plan", "s"),
    ("budget", "budget", ".2f"),
    ("units", "units", "d"),
    ("layers_on", "layers", "d"),
    ("heads_on", "heads", "d"),
    ("prefill_flops_text", "prefill FLOPs", "s"),
    ("prefill_flops_ratio", "FLOPs ratio", ".3f"),
    ("prefill_roofline_s", "prefill roofline s", ".4g"),
    ("prefill_roofline_ratio", "ratio", ".3f"),
    ("decode_roofline_s", "decode roofline s", ".4g"),
    ("decode_roofline_ratio", "ratio", ".3f"),
    ("kv_bytes", "KV bytes", ".4g"),
]


def merged(rows: list[dict]) -> tuple[list[dict], bool]:
    """The rows with each -H row that keeps exactly the -L plan of the same budget folded into that -L row
    (kind ``AdaLLaVA-L = -H``), and whether any was folded."""
    l_plans = {r["budget"]: r["plan"] for r in rows if r["kind"] == "AdaLLaVA-L"}
    same = {r["budget"] for r in rows if r["kind"] == "AdaLLaVA-H" and l_plans.get(r["budget"]) == r["plan"]}
    out = []
    for r in rows:
        if r["budget"] in same:
            if r["kind"] == "AdaLLaVA-H":
                continue
            r = r | {"kind": "AdaLLaVA-L = -H"}
        out.append(r)
    return out, bool(same)


def why_merged(shape: ModelShape) -> str:
    """Why AdaLLaVA-H can keep the -L plans: with one -H unit per layer, a unit is the whole layer."""
    scheme = UnitScheme.default("H", shape)
    if scheme.units_per_layer == 1:
        return (f"AdaLLaVA-L = -H: the two keep the same plan at that budget; with {shape.num_heads} heads and "
                f"-H units of {scheme.rank} heads and {scheme.rank} MLP groups, each -H unit is a whole layer")
    return "AdaLLaVA-L = -H: the two keep the same plan at that budget"


def table(rows: list[dict]) -> str:
    """The plans, with -H rows identical to the -L rows of the same budget shown once."""
    return format_table([r | {"prefill_flops_text": flops_text(r["prefill_flops"])} for r in merged(rows)[0]], COLUMNS)
