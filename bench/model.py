"""End to end: a random-weight AdaLLaVA decoder of the chosen shape under many plans, timed against its FLOPs.

Plans: AdaLLaVA-L and -H at each budget (seeded random scores stand in for
a trained scheduler), the early-exit baseline at each budget, and random
plans (random layer masks and random head and MLP-group subsets). Each runs
through the kernels (``forward(plan=..., backend=...)``, logits of the last
position only, as the cost model counts ``lm_head``); the dense model is
transformers' own Llava forward on the same weights. Decode is timed as
``(generate(k + 1 tokens) - generate(1 token)) / k`` over the layer-skip KV
cache, and priced as the mean of those ``k`` steps' FLOPs.
"""

from __future__ import annotations

import math
import random

import torch

from adallava_kernels import ExecutionPlan, ModelShape, UnitScheme, best_plan, cost
from adallava_kernels.devices import DeviceSpec
from adallava_kernels.plan import neuron_groups

from ._common import format_table, median_seconds, progress
from .plans import random_scores

GPU_TOKENS = 700
CPU_TOKENS = 64
DECODE_STEPS = 8
RANDOM_PLANS = 6


def build(shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """An AdaLLaVA model whose language model has ``shape`` and random weights (a minimal vision tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from model import AdaLlavaConfig, AdaLlavaForConditionalGeneration

    text = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        max_position_embeddings=16384,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                              image_size=16, patch_size=8)
    config = AdaLlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab_size - 1)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # builds the weights in place instead of in float32 first
    try:
        with torch.device(device):
            model = AdaLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _random_plan(shape: ModelShape, kind: str, rng: random.Random) -> ExecutionPlan:
    prefix = shape.num_layers // 2
    heads = [range(shape.num_heads)] * prefix
    neurons = [range(shape.intermediate_size)] * prefix
    groups = neuron_groups(shape.intermediate_size, shape.num_heads)
    for _ in range(prefix, shape.num_layers):
        if kind == "L":
            on = rng.random() < 0.5
            heads.append(range(shape.num_heads) if on else [])
            neurons.append(range(shape.intermediate_size) if on else [])
        else:
            heads.append(sorted(rng.sample(range(shape.num_heads), rng.randint(0, shape.num_heads))))
            chosen = sorted(rng.sample(range(shape.num_heads), rng.randint(0, shape.num_heads)))
            neurons.append([n for g in chosen for n in groups[g]])
    return ExecutionPlan(shape, heads, neurons)


def plans(shape: ModelShape, budgets: list[float], random_count: int = RANDOM_PLANS, seed: int = 0):
    """``(family, label, plan)`` for every plan the model bench runs."""
    from model.baselines import early_exit_plan

    out = []
    for kind in ("L", "H"):
        scheme = UnitScheme.default(kind, shape)
        generator = torch.Generator().manual_seed(seed)
        out += [(f"AdaLLaVA-{kind}", f"{kind} {b:.2f}", best_plan(scheme, b, random_scores(scheme, generator)))
                for b in budgets]
    out += [("early-exit", f"exit {b:.2f}", early_exit_plan(shape, b)) for b in budgets]
    rng = random.Random(seed)
    out += [(f"random-{k}", f"random-{k} {i}", _random_plan(shape, k, rng))
            for i in range(random_count) for k in ("L", "H")][:random_count]
    return out


def _decode_flops(shape: ModelShape, prompt: int, steps: int, plan: ExecutionPlan | None) -> float:
    """Mean FLOPs of decode steps 2..steps+1 after a prefill of ``prompt`` positions."""
    return sum(cost.decode_flops(shape, prompt + s, plan) for s in range(1, steps + 1)) / steps


def run(shape: ModelShape, model_name: str, budgets: list[float], device: torch.device, dtype: torch.dtype,
        roofline_device: DeviceSpec, tokens: int, backend: str = "auto", min_run_time: float = 0.2,
        decode_steps: int = DECODE_STEPS, random_count: int = RANDOM_PLANS, seed: int = 0) -> list[dict]:
    """Rows of measured and predicted prefill and decode time, one per plan and stage, and the dense model's."""
    model = build(shape, device, dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size - 1, (1, tokens), generator=generator).to(device)
    precision = cost.Precision(*(torch.finfo(dtype).bits / 8,) * 3)
    # generate puts the latency token after the prompt: one more position than the prompt.
    prompt = tokens + 1

    def row(stage, family, label, plan, seconds, flops, breakdown):
        return {
            "model": model_name, "stage": stage, "family": family, "label": label,
            "layers_on": shape.num_layers if plan is None else sum(plan.layer_mask),
            "flops": flops, "seconds": seconds,
            "roofline_s": cost.roofline(breakdown, roofline_device).total_seconds,
            "plan": None if plan is None else plan.to_json(),
        }

    with torch.no_grad():
        dense_s = median_seconds(lambda: model(input_ids=ids, logits_to_keep=1), device, min_run_time)
    dense = cost.prefill_cost(shape, tokens, None, precision=precision)
    rows = [row("prefill", "dense (transformers)", "dense", None, dense_s, dense.flops, dense)]
    for family, label, plan in progress(plans(shape, budgets, random_count, seed), f"model {model_name}"):
        with torch.no_grad():
            seconds = median_seconds(
                lambda: model(input_ids=ids, plan=plan, backend=backend, logits_to_keep=1), device, min_run_time)
        prefill = cost.prefill_cost(shape, tokens, plan, precision=precision)
        rows.append(row("prefill", family, label, plan, seconds, prefill.flops, prefill))

        def generate(n):
            return lambda: model.generate(ids, latency_budget=1.0, plan=plan, max_new_tokens=n, backend=backend)

        one = median_seconds(generate(1), device, min_run_time)
        more = median_seconds(generate(decode_steps + 1), device, min_run_time)
        step = cost.decode_cost(shape, prompt + decode_steps // 2 + 1, plan, precision=precision)
        rows.append(row("decode", family, label, plan, max(more - one, 1e-9) / decode_steps,
                        _decode_flops(shape, prompt, decode_steps, plan), step))
    return rows


def report_rows(rows: list[dict]) -> list[dict]:
    """The kernel plans' rows in the validation report's form (the dense model is a single reference point)."""
    return [
        {"op": f"model {r['model']} {r['stage']}", "series": "kernels, all plans", "label": r["label"],
         "flops": r["flops"], "seconds": r["seconds"], "predicted_seconds": r["roofline_s"]}
        for r in rows if r["family"] != "dense (transformers)"
    ]


COLUMNS = [
    ("stage", "stage", "s"),
    ("family", "plan", "s"),
    ("label", "label", "s"),
    ("layers_on", "layers", "d"),
    ("tflop", "TFLOP", ".4g"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
    ("ms", "measured ms", ".3f"),
    ("time_ratio", "time ratio", ".3f"),
    ("roofline_ms", "roofline ms", ".4g"),
]


def table(rows: list[dict]) -> str:
    """Rows with FLOPs and time relative to the full plan of the same stage (budget 1.0 of AdaLLaVA-L)."""
    full = {r["stage"]: r for r in rows if r["label"] == "L 1.00"}
    shown = []
    for r in rows:
        ref = full.get(r["stage"])
        shown.append(r | {
            "tflop": r["flops"] / 1e12, "ms": r["seconds"] * 1e3, "roofline_ms": r["roofline_s"] * 1e3,
            "flops_ratio": r["flops"] / ref["flops"] if ref else math.nan,
            "time_ratio": r["seconds"] / ref["seconds"] if ref else math.nan,
        })
    return format_table(shown, COLUMNS)
