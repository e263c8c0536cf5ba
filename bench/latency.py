"""Request latency per budget: what an AdaLLaVA user sets a budget for.

For each budget and plan family, one request of ``prompt`` tokens and
``new_tokens`` greedy tokens through ``generate(..., latency_budget=l)``:

- time to first token (TTFT): ``generate(..., max_new_tokens=1)``, the prefill
  with the scheduler planning after the prefix layers (the latency token and
  the KV pool's allocation included, as a request pays them);
- end-to-end latency (E2E): ``generate(..., max_new_tokens=new_tokens)``;
- time per output token (TPOT): ``(E2E - TTFT) / (new_tokens - 1)``.

Families: AdaLLaVA-L and AdaLLaVA-H (each a model whose scheduler plans for
the budget; the two share the decoder's weights) and early exit (the
baseline's plan for the budget, no scheduler). References, not judged: the
full plan through the kernels and transformers' own dense ``generate`` on the
same weights. The ideal of a metric is the full plan's time times the
FLOPs ratio the row's plan predicts for it (``flops_ratios``: the prefill's
for TTFT, the mean decode step's for TPOT, the whole request's for E2E),
not the budget: the units a budget buys can come to another share of the
FLOPs (0.501 at budget 0.7 for tiny). On CUDA a request is 700 prompt
tokens and 64 new ones; on a CPU 64 and 8, so that the whole benchmark
stays within minutes.
"""

from __future__ import annotations

import functools
import math

import torch

from adallava_kernels import ExecutionPlan, ModelShape, cost

from . import model as model_bench
from . import timing
from ._common import format_table, ideal_ratio, markdown_table, progress, row_iqr

GPU_REQUEST = (700, 64)
CPU_REQUEST = (64, 8)
FAMILIES = ("AdaLLaVA-L", "AdaLLaVA-H", "early-exit")
FULL = model_bench.FULL
DENSE = model_bench.DENSE
METRICS = ("ttft", "tpot", "e2e")
METRIC_NAMES = {"ttft": "time to first token", "tpot": "time per output token", "e2e": "end-to-end latency"}


def request_timings(measure, call_of, new_tokens: int) -> dict[str, timing.Timing]:
    """TTFT, TPOT and E2E of one request; ``call_of(n)`` makes the request with ``n`` new tokens."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time an output token, got {new_tokens}")
    ttft, e2e = measure(call_of(1)), measure(call_of(new_tokens))
    return {"ttft": ttft, "tpot": timing.per_step(ttft, e2e, new_tokens - 1), "e2e": e2e}


def request_flops(shape: ModelShape, prompt: int, new_tokens: int, plan: ExecutionPlan) -> dict[str, float]:
    """FLOPs of a request under ``plan`` per metric: the prefill (``ttft``; the latency token makes ``prompt + 1``
    positions), the mean decode step (``tpot``) and the whole request (``e2e``)."""
    prefill = cost.prefill_flops(shape, prompt + 1, plan)
    step = model_bench.mean_decode_flops(shape, prompt + 1, new_tokens - 1, plan)
    return {"ttft": prefill, "tpot": step, "e2e": prefill + (new_tokens - 1) * step}


def shared_models(shape: ModelShape, device, dtype, seed: int = 0) -> dict[str, object]:
    """An -L and an -H model on the same decoder weights (the -H one holds only its scheduler of its own)."""
    models = {"L": model_bench.build(shape, device, dtype, seed, "L")}
    h = model_bench.build(shape, device, dtype, seed, "H")
    # One copy of the weights: the -H model runs the -L model's decoder and head.
    h.model.language_model = models["L"].model.language_model
    h.lm_head = models["L"].lm_head
    models["H"] = h
    return models


def run(shape: ModelShape, model_name: str, budgets: list[float], device: torch.device, dtype: torch.dtype,
        prompt: int, new_tokens: int, backend: str = "auto", budget: timing.TimingBudget = timing.END_TO_END,
        seed: int = 0) -> list[dict]:
    """One row per (family, budget), then the full plan's and transformers' rows."""
    from model.baselines import early_exit_plan

    models = shared_models(shape, device, dtype, seed)
    ids = torch.randint(0, shape.vocab_size - 1, (1, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    measure = functools.partial(timing.measure, device=device, budget=budget)
    full_flops = request_flops(shape, prompt, new_tokens, ExecutionPlan.full(shape))

    def row(family, level, plan, timings):
        flops = full_flops if plan is None else request_flops(shape, prompt, new_tokens, plan)
        ratios = {metric: flops[metric] / full_flops[metric] for metric in METRICS}
        return {
            "model": model_name, "family": family, "budget": level, "prompt_tokens": prompt,
            "new_tokens": new_tokens, "layers_on": shape.num_layers if plan is None else sum(plan.layer_mask),
            "flops_ratio": ratios["ttft"], "flops_ratios": ratios,
            "plan": None if plan is None else plan.to_json(),
            **{metric: t.fields() for metric, t in timings.items()},
        }

    def request(model, level, plan=None):
        return lambda n: model_bench.generate_call(model, ids, n, backend, plan=plan, latency_budget=level)

    cases = [(family, level) for family in FAMILIES for level in budgets]
    rows = []
    for family, level in progress(cases, f"latency {model_name}"):
        if family == "early-exit":
            model, given = models["L"], early_exit_plan(shape, level)
            plan = given
        else:
            # The scheduler plans inside every timed call; this call (greedy, eval mode, so the same plan
            # each time) records which plan that is.
            model, given = models[family[-1]], None
            plan = model_bench.generate_call(model, ids, 1, backend, latency_budget=level)().plans[0]
        rows.append(row(family, level, plan, request_timings(measure, request(model, level, given), new_tokens)))
    full = ExecutionPlan.full(shape)
    rows.append(row(FULL, 1.0, full, request_timings(measure, request(models["L"], 1.0, full), new_tokens)))
    rows.append(row(DENSE, 1.0, None, request_timings(
        measure, lambda n: model_bench.dense_generate_call(models["L"], ids, n), new_tokens)))
    return rows


def comparisons(rows: list[dict]) -> list[dict]:
    """Each row's metrics against the full plan's, transformers' and the ideal ``FLOPs ratio * full``."""
    refs = {r["family"]: r for r in rows if r["family"] in (FULL, DENSE)}
    out = []
    for r in rows:
        shown = dict(r)
        for metric in METRICS:
            seconds = r[metric]["median_s"]
            full = refs.get(FULL, {}).get(metric, {}).get("median_s")
            dense = refs.get(DENSE, {}).get(metric, {}).get("median_s")
            shown[f"{metric}_ms"] = seconds * 1e3
            shown[f"{metric}_vs_full"] = seconds / full if full else math.nan
            shown[f"{metric}_vs_dense"] = seconds / dense if dense else math.nan
            shown[f"{metric}_vs_ideal"] = seconds / (ideal_ratio(r, metric) * full) if full else math.nan
            shown[f"{metric}_flops_ratio"] = ideal_ratio(r, metric)
        shown["unstable"] = ",".join(m for m in METRICS if r[m]["unstable"]) or "-"
        gpu = r["e2e"]["gpu_s"]
        shown["e2e_gpu_ms"] = "-" if gpu is None else f"{gpu * 1e3:.2f}"
        host = r["e2e"]["host_share"]
        shown["e2e_host"] = "-" if host is None else f"{host:.0%}"
        out.append(shown)
    return out


COLUMNS = [
    ("family", "family", "s"), ("budget", "budget", ".2f"), ("layers_on", "layers", "d"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
    ("ttft_ms", "TTFT ms", ".3f"), ("ttft_vs_full", "/ full", ".3f"), ("ttft_vs_dense", "/ dense", ".3f"),
    ("tpot_ms", "TPOT ms", ".3f"), ("tpot_vs_full", "/ full", ".3f"), ("tpot_vs_dense", "/ dense", ".3f"),
    ("e2e_ms", "E2E ms", ".2f"), ("e2e_vs_full", "/ full", ".3f"), ("e2e_vs_dense", "/ dense", ".3f"),
    ("e2e_flops_ratio", "E2E FLOPs ratio", ".3f"), ("e2e_vs_ideal", "/ ideal", ".3f"),
    ("e2e_gpu_ms", "E2E GPU ms", "s"), ("e2e_host", "host", "s"),
    ("unstable", "IQR > 5%", "s"),
]


def table(rows: list[dict]) -> str:
    """The latency table: ``/ full`` and ``/ dense`` divide by the references, ``/ ideal`` by the request's FLOPs
    ratio times the full plan's."""
    return format_table(comparisons(rows), COLUMNS)


def markdown(rows: list[dict]) -> str:
    return markdown_table(comparisons(rows), COLUMNS)


def _against_full(row: dict, full: dict) -> str:
    """One family's end-to-end latency as a share of the full plan's, beside its ideal, and whether the timing
    resolved the difference."""
    e2e, ref = row["e2e"], full["e2e"]
    text = f"{e2e['median_s'] / ref['median_s']:.2f} ({row['family']}, ideal {ideal_ratio(row, 'e2e'):.3f}"
    if timing.within_spread(e2e["median_s"], row_iqr(e2e), ref["median_s"], row_iqr(ref)):
        text += "; within the IQRs of the full plan's: no difference resolved"
    return text + ")"


def summary(rows: list[dict]) -> str | None:
    """A clause for the report's summary: each family's end-to-end latency at the lowest budget, as a share of
    the full plan's, next to the ideal (its request's FLOPs ratio), and where the difference is inside the
    measured spread."""
    planned = [r for r in rows if r["family"] not in (FULL, DENSE)]
    full = next((r for r in rows if r["family"] == FULL), None)
    if not planned or full is None:
        return None
    lowest = min(r["budget"] for r in planned)
    parts = ", ".join(_against_full(r, full) for r in planned if r["budget"] == lowest)
    return f"a request at budget {lowest:.2f} takes {parts} of the full plan's end-to-end latency"
