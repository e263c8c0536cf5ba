"""Serving: many requests, each under its own plan, through one plan runtime.

Sixteen requests (``REQUESTS``), each with the plan AdaLLaVA's scheduler
would give it: the best -L or -H plan (alternating) for a budget spread over
[0.5, 1.0], over random switch logits of its own, so no two -H plans are
alike. Each request has a random prompt (``GPU_REQUEST``: 700 tokens and 64
new ones; on a CPU ``CPU_REQUEST``) and is served through one
:class:`~adallava_kernels.runtime.PlannedDecoder`:

- **one by one**: admit, prefill, form the decode batch (``batch ms``: its
  block tables and, with CUDA graphs, its plan bound as data),
  ``new_tokens - 1`` decode steps, free; the first step apart (on CUDA it binds the request's plan into a graph's
  buffers, or warms up and captures one for a step shape not seen yet), then
  each request's time per output token (TPOT)
  over the other steps, beside the full plan's and its plan's FLOPs ratio
  (a mean decode step's, from the cost model);
- **one batch**: all requests admitted and prefilled, then decoded together
  in one :class:`~adallava_kernels.runtime.DecodeBatch`: tokens per second,
  and the step's time against ``cost.batch_decode_cost`` (with CUDA graphs
  the plans are bound as data and each layer runs the rows' union; eager,
  rows whose plans agree on a layer read its weights once).

It reports what the plans cost the runtime's CUDA graphs: captures, the
wall seconds of their eager warm-up steps and of the recordings, replays.
Wall time only: each phase ends with a device synchronisation.
"""

from __future__ import annotations

import time

import torch

from adallava_kernels import ExecutionPlan, ModelShape, UnitScheme, best_plan, cost

from adallava_kernels.runtime import PlannedDecoder

from . import model as model_bench
from ._common import format_table, markdown_table, progress, sync
from .plans import random_scores

REQUESTS = 16
GPU_REQUEST = (700, 64)
CPU_REQUEST = (32, 8)
PAGE_SIZE = 16
FULL = "full"


def request_plans(shape: ModelShape, count: int = REQUESTS, seed: int = 0) -> list[tuple[str, ExecutionPlan]]:
    """``count`` (label, plan) pairs: -L and -H alternating, budgets evenly over [0.5, 1.0], each plan the best
    for its budget over random switch logits of its own (the scheduler's plan at inference)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        kind = "LH"[i % 2]
        budget = 0.5 + 0.5 * i / max(count - 1, 1)
        scheme = UnitScheme.default(kind, shape)
        out.append((f"{kind} {budget:.3f}", best_plan(scheme, budget, random_scores(scheme, generator))))
    return out


def _timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _decode(batch, token: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        _, token = batch.step(token)
    return token


def _serve_one(runner: PlannedDecoder, name: str, plan: ExecutionPlan, embeds: torch.Tensor, new_tokens: int,
               device: torch.device) -> dict:
    """One request alone, timed: its prefill, its first decode step (which binds the plan into a graph's
    buffers, or warms up and captures a graph for a step shape not seen yet) and the time per output token
    of the steps after it."""
    runner.admit(name, plan, embeds.shape[1] + new_tokens)
    try:
        logits, prefill_s = _timed(lambda: runner.prefill([name], embeds), device)
        batch, form_s = _timed(lambda: runner.decode([name]), device)
        token, first_s = _timed(lambda: _decode(batch, logits[:, -1].argmax(-1), 1), device)
        _, decode_s = _timed(lambda: _decode(batch, token, new_tokens - 2), device)
        batch.close()
    finally:
        runner.free(name)
    return {"prefill_s": prefill_s, "form_s": form_s, "first_step_s": first_s, "tpot_s": decode_s / (new_tokens - 2)}


def _serve_batch(runner: PlannedDecoder, requests: list[tuple[str, ExecutionPlan]], embeds: torch.Tensor,
                 new_tokens: int, device: torch.device) -> dict:
    """Every request admitted and prefilled, then decoded in one batch: the decode steps' time."""
    names = [f"batch-{i}" for i in range(len(requests))]
    for name, (_, plan), row in zip(names, requests, embeds):
        runner.admit(name, plan, embeds.shape[1] + new_tokens)
    try:
        tokens = torch.cat([runner.prefill([name], row[None])[:, -1].argmax(-1) for name, row in zip(names, embeds)])
        batch, form_s = _timed(lambda: runner.decode(names), device)
        _decode(batch, tokens, 1)  # the batch's first step: its graph's warm-up and capture
        steps = new_tokens - 2
        _, seconds = _timed(lambda: _decode(batch, tokens, steps), device)
        batch.close()
    finally:
        for name in names:
            runner.free(name)
    return {"steps": steps, "form_s": form_s, "step_s": seconds / steps,
            "tokens_per_s": len(requests) * steps / seconds}


def _graphs(runner: PlannedDecoder, before: dict) -> dict:
    """What the graphs cost since ``before`` (``{"enabled": False}`` without graphs)."""
    now = runner.graph_stats()
    if not now["enabled"]:
        return now
    return {key: now[key] - before.get(key, 0) for key in ("captures", "warmup_seconds", "capture_seconds", "replays")}


def run(shape: ModelShape, model_name: str, device: torch.device, dtype: torch.dtype, backend: str = "auto",
        request: tuple[int, int] | None = None, count: int = REQUESTS, seed: int = 0) -> dict:
    """The serving run: per request one-by-one rows, the batch's row, and the graphs' cost of each phase."""
    prompt, new_tokens = request or (GPU_REQUEST if device.type == "cuda" else CPU_REQUEST)
    if new_tokens < 3:
        raise ValueError(f"new_tokens must be at least 3 (a timed decode after the batch's first step), got {new_tokens}")
    model = model_bench.build(shape, device, dtype, seed)
    requests = [(FULL, ExecutionPlan.full(shape)), *request_plans(shape, count, seed)]
    pages = len(requests) * shape.num_layers * shape.num_kv_heads * -(-(prompt + new_tokens) // PAGE_SIZE)
    # As the AdaLLaVA model builds its runtime: the prefix layers always run whole (dense matmuls).
    switchable = range(UnitScheme.default("H", shape).prefix_layers, shape.num_layers)
    runner = PlannedDecoder.from_hf(model, num_pages=pages, page_size=PAGE_SIZE, backend=backend,
                                    partial_layers=switchable, max_graphs=len(requests) + 2)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size - 1, (len(requests), prompt), generator=generator).to(device)
    with torch.no_grad():
        embeds = runner.weights.embed[ids]
        _serve_one(runner, "warm-up", requests[0][1], embeds[:1], new_tokens, device)  # the kernels compile here
        stats = runner.graph_stats()
        rows = []
        for i, (label, plan) in enumerate(progress(requests, f"serve {model_name}")):
            measured = _serve_one(runner, f"alone-{i}", plan, embeds[i:i + 1], new_tokens, device)
            mean_context = prompt + new_tokens // 2
            ratio = cost.decode_flops(shape, mean_context, plan) / cost.decode_flops(shape, mean_context)
            rows.append({"label": label, "flops_ratio": ratio, **measured})
        one_by_one = _graphs(runner, stats)
        stats = runner.graph_stats()
        batch = _serve_batch(runner, requests[1:], embeds[1:], new_tokens, device)
        batch["graphs"] = _graphs(runner, stats)
        plans = [plan for _, plan in requests[1:]]
        predicted = cost.batch_decode_cost(shape, prompt + new_tokens // 2, plans, union=runner.graphs is not None)
        batch["flops"], batch["read_bytes"] = predicted.flops, model_bench.read_bytes(predicted)
    full_tpot = rows[0]["tpot_s"]
    for row in rows:
        row["tpot_vs_full"] = row["tpot_s"] / full_tpot
    return {"model": model_name, "prompt": prompt, "new_tokens": new_tokens, "requests": len(requests) - 1,
            "backend": runner.backend, "rows": rows, "one_by_one_graphs": one_by_one, "batch": batch}


COLUMNS = [
    ("label", "request (plan)", "s"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
    ("prefill_ms", "prefill ms", ".3f"),
    ("form_ms", "batch ms", ".3f"),
    ("first_ms", "first step ms", ".3f"),
    ("tpot_ms", "TPOT ms", ".3f"),
    ("tpot_vs_full", "TPOT / full", ".3f"),
    ("deviation", "/ FLOPs ratio", ".3f"),
]


def _cells(result: dict) -> list[dict]:
    return [{**r, "prefill_ms": r["prefill_s"] * 1e3, "form_ms": r["form_s"] * 1e3, "first_ms": r["first_step_s"] * 1e3,
             "tpot_ms": r["tpot_s"] * 1e3, "deviation": r["tpot_vs_full"] / r["flops_ratio"]} for r in result["rows"]]


def _batch_lines(result: dict) -> list[str]:
    batch = result["batch"]
    return [f"one batch of {result['requests']}: {batch['tokens_per_s']:.1f} tokens/s, "
            f"{batch['step_s'] * 1e3:.3f} ms a step ({cost.format_flops(batch['flops'])} predicted a step); "
            f"forming the batch (its tables, its plans bound) took {batch['form_s'] * 1e3:.3f} ms",
            f"graphs, one by one: {_graphs_text(result['one_by_one_graphs'])}",
            f"graphs, the batch: {_graphs_text(batch['graphs'])}"]


def table(result: dict) -> str:
    """Per request alone: its FLOPs ratio, prefill, TPOT, TPOT against the full plan's and against the ratio;
    then the batch and the graphs."""
    return "\n".join([format_table(_cells(result), COLUMNS), *_batch_lines(result)])


def markdown(result: dict) -> str:
    """The section in report.md: what was served, the table, the batch and the graphs."""
    head = (f"{result['requests']} requests of {result['prompt']} prompt tokens and {result['new_tokens']} new ones, "
            f"{result['model']}, kernels {result['backend']}; each alone (first decode step apart, TPOT over the "
            f"others), then all in one decode batch.")
    return "\n\n".join([head, markdown_table(_cells(result), COLUMNS), *(f"- {line}" for line in _batch_lines(result))])


def _graphs_text(graphs: dict) -> str:
    if not graphs.get("enabled", True):
        return "none (CUDA graphs are off: a CPU, or cuda_graphs=False)"
    return (f"{graphs['captures']} captures, {graphs['warmup_seconds']:.2f} s of warm-up steps, "
            f"{graphs['capture_seconds']:.2f} s recording, {graphs['replays']} replays")
