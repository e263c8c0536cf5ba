"""End to end: a random-weight AdaLLaVA decoder of the chosen shape under many plans, timed against its FLOPs.

Plans: AdaLLaVA-L and -H at each budget (seeded random scores stand in for
a trained scheduler), the early-exit baseline at each budget, and random
plans (random layer masks and random head and MLP-group subsets). Each runs
through the kernels (``forward(plan=..., backend=...)``, logits of the last
position only, as the cost model counts ``lm_head``). Two references, not
judged: the full plan through the kernels (every ratio is taken to it) and
transformers' own Llava forward and ``generate`` on the same weights.

Every timed call is a zero-argument callable handed to ``bench.timing``,
which returns its wall time (median, IQR) and GPU time. Prefill is
``forward(plan=..., backend=...)``: the plan runtime without a KV cache, CUDA
events around each call. A decode step of the library is one
``DecodeBatch.step`` of a request prefilled through the runtime
(:func:`runtime_decode_step`): a CUDA graph replay on CUDA (captured in the
warm-up), an eager step on a CPU; its GPU time is the profiler's device
records of the step. Each repetition is a real next step, so the context
grows by a few dozen positions over the timing; the step is priced at the
mean context. transformers' decode step, the reference, is
``(generate(k + 1 tokens) - generate(1 token)) / k`` (:func:`decode_step`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Callable

import torch

from adallava_kernels import ExecutionPlan, ModelShape, UnitScheme, best_plan, cost
from adallava_kernels.devices import DeviceSpec
from adallava_kernels.plan import neuron_groups

from . import timing
from ._common import TIMING_COLUMNS, flops_text, format_table, progress, row_iqr, timing_cells
from .plans import random_scores

GPU_TOKENS = 700
CPU_TOKENS = 64
DECODE_STEPS = 8
RANDOM_PLANS = 6
DENSE = "dense (transformers)"
FULL = "full plan"


def build(shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int = 0, switch_kind: str = "L"):
    """An AdaLLaVA model whose language model has ``shape`` and random weights (a minimal vision tower).

    ``switch_kind`` picks the scheduler (-L or -H); the decoder's weights
    depend on ``seed`` only, as they are drawn before the scheduler's.
    """
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
    config = AdaLlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab_size - 1,
                            switch_kind=switch_kind)
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


def plans(shape: ModelShape, budgets: list[float], random_count: int = RANDOM_PLANS, seed: int = 0, *,
          early_exit: bool = True, random_kinds: tuple[str, ...] = ("L", "H")):
    """``(family, label, plan)`` for every plan the model bench runs: -L and -H at each budget, the early-exit
    baseline (``early_exit``) and ``random_count`` random plans, alternating over ``random_kinds``."""
    from model.baselines import early_exit_plan

    out = []
    for kind in ("L", "H"):
        scheme = UnitScheme.default(kind, shape)
        generator = torch.Generator().manual_seed(seed)
        out += [(f"AdaLLaVA-{kind}", f"{kind} {b:.2f}", best_plan(scheme, b, random_scores(scheme, generator)))
                for b in budgets]
    if early_exit:
        out += [("early-exit", f"exit {b:.2f}", early_exit_plan(shape, b)) for b in budgets]
    rng = random.Random(seed)
    out += [(f"random-{k}", f"random-{k} {i}", _random_plan(shape, k, rng))
            for i in range(random_count) for k in random_kinds][:random_count]
    return out


def prefill_call(model, ids: torch.Tensor, plan: ExecutionPlan | None, backend: str) -> Callable[[], object]:
    """The prefill of ``ids`` under ``plan`` through the kernels (``None``: transformers' forward), last logits only."""
    def call():
        with torch.no_grad():
            if plan is None:
                return model(input_ids=ids, logits_to_keep=1)
            return model(input_ids=ids, plan=plan, backend=backend, logits_to_keep=1)
    return call


def generate_call(model, ids: torch.Tensor, new_tokens: int, backend: str, *, plan: ExecutionPlan | None = None,
                  latency_budget: float = 1.0) -> Callable[[], object]:
    """A request of ``new_tokens`` greedy tokens under ``latency_budget`` and ``plan`` (``None``: the scheduler's)."""
    def call():
        return model.generate(ids, latency_budget=latency_budget, plan=plan, max_new_tokens=new_tokens,
                              backend=backend)
    return call


def dense_generate_call(model, ids: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    """transformers' own greedy ``generate`` on the same weights, made to produce exactly ``new_tokens``."""
    mask = torch.ones_like(ids)
    eos = model.generation_config.eos_token_id

    def call():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=eos)
    return call


def decode_step(measure: Callable[[Callable[[], object]], timing.Timing], call_of: Callable[[int], Callable],
                steps: int) -> timing.Timing:
    """One decode step: ``(call_of(steps + 1) - call_of(1)) / steps``, ``call_of(n)`` generating ``n`` tokens."""
    return timing.per_step(measure(call_of(1)), measure(call_of(steps + 1)), steps)


# Calls of a decode step in one CPU repetition at most, so that the positions a timing takes are bounded
# (timing.max_calls); a block of 10 steps of a small model still takes far longer than the timer's overhead.
DECODE_CALLS_PER_REP = 10


def decode_room(device: torch.device, budget: timing.TimingBudget) -> int:
    """Decode steps one timed decode can take: warm-up, repetitions and profiled calls (each stores a position)."""
    return timing.max_calls(budget, device, DECODE_CALLS_PER_REP)


def runtime_decode_step(model, ids: torch.Tensor, plan: ExecutionPlan, backend: str, device: torch.device,
                        budget: timing.TimingBudget) -> tuple[timing.Timing, int]:
    """Time one decode step of ``plan`` through the runtime: a request is prefilled, then each repetition
    is one ``DecodeBatch.step`` (a graph replay on CUDA). Returns the timing and the steps taken."""
    # The prefill's last token is not stored: room for n steps is n + 1 new tokens.
    request = model.start_request(ids, latency_budget=1.0, plan=plan, max_new_tokens=decode_room(device, budget) + 1,
                                  backend=backend)
    batch = request.runtime.decode(request.seq_ids)
    token = request.logits[:, -1].argmax(-1)
    taken = 0

    def step():
        nonlocal taken
        taken += 1
        return batch.step(token)

    try:
        return timing.measure(step, device, budget, most_per_rep=DECODE_CALLS_PER_REP), taken
    finally:
        batch.close()
        request.free()


def mean_decode_flops(shape: ModelShape, prompt: int, steps: int, plan: ExecutionPlan | None) -> float:
    """Mean FLOPs of decode steps 2..steps+1 after a prefill of ``prompt`` positions."""
    return sum(cost.decode_flops(shape, prompt + s, plan) for s in range(1, steps + 1)) / steps


def read_bytes(breakdown: cost.CostBreakdown) -> float:
    """Bytes a forward must read: weights, activations and the KV cache (what bounds a decode step)."""
    return sum(op.weight_bytes + op.act_load_bytes + op.kv_load_bytes for op in breakdown.ops())


@dataclasses.dataclass
class Bench:
    """What every timed plan of one model shares: the model, the prompt, and how a call is timed and priced."""

    shape: ModelShape
    model_name: str
    model: object
    ids: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    roofline_device: DeviceSpec
    backend: str
    budget: timing.TimingBudget

    @property
    def tokens(self) -> int:
        return self.ids.shape[1]

    def measure(self, fn: Callable[[], object]) -> timing.Timing:
        return timing.measure(fn, self.device, self.budget)


def setup(shape: ModelShape, model_name: str, device: torch.device, dtype: torch.dtype, roofline_device: DeviceSpec,
          tokens: int, backend: str = "auto", budget: timing.TimingBudget = timing.END_TO_END, seed: int = 0) -> Bench:
    """A random-weight model of ``shape`` and a prompt of ``tokens`` random ids, for :func:`plan_rows`."""
    model = build(shape, device, dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size - 1, (1, tokens), generator=generator).to(device)
    return Bench(shape, model_name, model, ids, device, dtype, roofline_device, backend, budget)


def _row(bench: Bench, stage: str, family: str, label: str, plan: ExecutionPlan | None, measured: timing.Timing,
         flops: float, breakdown: cost.CostBreakdown) -> dict:
    return {
        "model": bench.model_name, "stage": stage, "family": family, "label": label,
        "layers_on": bench.shape.num_layers if plan is None else sum(plan.layer_mask),
        "flops": flops, "read_bytes": read_bytes(breakdown), **measured.fields(),
        "roofline_s": cost.roofline(breakdown, bench.roofline_device).total_seconds,
        "plan": None if plan is None else plan.to_json(),
    }


def _stages(bench: Bench, family: str, label: str, plan: ExecutionPlan | None, prompt: int,
            prefill_fn: Callable[[], object], decode: Callable[[], tuple[timing.Timing, int]]) -> list[dict]:
    """Prefill and one decode step of a plan; ``prompt``: positions before the first decode step;
    ``decode()`` gives the step's timing and how many steps it took."""
    precision = cost.Precision(*(torch.finfo(bench.dtype).bits / 8,) * 3)
    prefill = cost.prefill_cost(bench.shape, bench.tokens, plan, precision=precision)
    measured, steps = decode()
    step = cost.decode_cost(bench.shape, prompt + steps // 2 + 1, plan, precision=precision)
    return [_row(bench, "prefill", family, label, plan, bench.measure(prefill_fn), prefill.flops, prefill),
            _row(bench, "decode", family, label, plan, measured, mean_decode_flops(bench.shape, prompt, steps, plan),
                 step)]


def plan_rows(bench: Bench, family: str, label: str, plan: ExecutionPlan) -> list[dict]:
    """The prefill and decode rows of ``plan`` through the kernels (the decode step through the runtime)."""
    # Our prompt ends with the latency token: one position more than the ids.
    prefill = prefill_call(bench.model, bench.ids, plan, bench.backend)
    return _stages(bench, family, label, plan, bench.tokens + 1, prefill,
                   lambda: runtime_decode_step(bench.model, bench.ids, plan, bench.backend, bench.device, bench.budget))


def dense_rows(bench: Bench, decode_steps: int) -> list[dict]:
    """transformers' own forward and decode step on the same weights, the reference."""
    # transformers' generate has no latency token.
    prefill = prefill_call(bench.model, bench.ids, None, bench.backend)
    return _stages(bench, DENSE, "dense", None, bench.tokens, prefill,
                   lambda: (decode_step(bench.measure, lambda n: dense_generate_call(bench.model, bench.ids, n),
                                        decode_steps), decode_steps))


def run(shape: ModelShape, model_name: str, budgets: list[float], device: torch.device, dtype: torch.dtype,
        roofline_device: DeviceSpec, tokens: int, backend: str = "auto",
        budget: timing.TimingBudget = timing.END_TO_END, decode_steps: int = DECODE_STEPS,
        random_count: int = RANDOM_PLANS, seed: int = 0) -> tuple[list[dict], dict]:
    """Rows of measured and predicted prefill and decode time, one per plan and stage, and the references';
    and what the runtime's CUDA graphs cost (``PlannedDecoder.graph_stats``)."""
    bench = setup(shape, model_name, device, dtype, roofline_device, tokens, backend, budget, seed)
    rows = dense_rows(bench, decode_steps)
    cases = [(FULL, "full", ExecutionPlan.full(shape)), *plans(shape, budgets, random_count, seed)]
    for family, label, plan in progress(cases, f"model {model_name}"):
        rows += plan_rows(bench, family, label, plan)
    return rows, bench.model.runtime(backend).graph_stats()


def series_name(backend: str) -> str:
    """The library's end-to-end series in the validation report."""
    return f"adallava_kernels ({backend}), all plans"


def report_rows(rows: list[dict], backend: str) -> list[dict]:
    """The kernel plans' rows in the validation report's form (transformers' model is a reference point)."""
    return [
        {"op": f"model {r['model']} {r['stage']}", "series": series_name(backend), "label": r["label"],
         "flops": r["flops"], "seconds": r["median_s"], "iqr_seconds": row_iqr(r), "gpu_seconds": r["gpu_s"],
         "unstable": r["unstable"], "predicted_seconds": r["roofline_s"]}
        for r in rows if r["family"] != DENSE
    ]


COLUMNS = [
    ("stage", "stage", "s"),
    ("family", "plan", "s"),
    ("label", "label", "s"),
    ("layers_on", "layers", "d"),
    ("flops_text", "FLOPs", "s"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
    *TIMING_COLUMNS,
    ("time_ratio", "wall ratio", ".3f"),
    ("gpu_ratio", "GPU ratio", "s"),
    ("roofline_ms", "roofline ms", ".4g"),
]


def _ratio(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else value / ref


def table(rows: list[dict]) -> str:
    """Rows with FLOPs, wall and GPU time relative to the full plan of the same stage."""
    full = {r["stage"]: r for r in rows if r["family"] == FULL}
    shown = []
    for r in rows:
        ref = full.get(r["stage"])
        gpu_ratio = _ratio(r["gpu_s"], ref and ref["gpu_s"])
        shown.append(r | timing_cells(r) | {
            "flops_text": flops_text(r["flops"]), "roofline_ms": r["roofline_s"] * 1e3,
            "flops_ratio": r["flops"] / ref["flops"] if ref else math.nan,
            "time_ratio": r["median_s"] / ref["median_s"] if ref else math.nan,
            "gpu_ratio": "-" if gpu_ratio is None else f"{gpu_ratio:.3f}",
        })
    return format_table(shown, COLUMNS)
