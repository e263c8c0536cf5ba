"""Layer-skip KV cache: memory per sequence and sequences per pool by budget, and append/read bandwidth.

Memory: for AdaLLaVA-L and -H plans at each budget, one sequence of
``tokens`` positions is written into a :class:`LayerSkipKVCache` and into a
transformers ``DynamicCache`` (every layer, every KV head); the bytes each
holds are measured, and ``sequences_per_pool`` is how many such sequences a
pool of ``pool_gib`` holds. The cost model's prediction is stored next to the
measured bytes.

Bandwidth: ``kv_append`` of one decode token and of a prefill chunk for a
batch of sequences, and ``kv_gather`` of their contexts, against a plain
``copy_`` of the same bytes on the same device.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import DynamicCache

from adallava_kernels import ExecutionPlan, ModelShape, UnitScheme, best_plan, cost
from adallava_kernels.kv_cache import LayerSkipKVCache
from adallava_kernels.shape import get_shape

from ._common import TIMING_COLUMNS, format_table, markdown_table, timing_cells
from .plans import random_scores
from .timing import OPS, TimingBudget, measure_copy, measure_op

PAGE_SIZE = 16


def _fill_layer_skip(shape, plan, tokens, device, dtype, generator) -> LayerSkipKVCache:
    kept = sum(len(plan.kv_heads(layer)) for layer in range(shape.num_layers))
    pages = max(1, kept * -(-tokens // PAGE_SIZE))
    cache = LayerSkipKVCache(shape, num_pages=pages, page_size=PAGE_SIZE, dtype=dtype, device=device)
    cache.add_sequence(0, plan, tokens)
    for layer in range(shape.num_layers):
        heads = len(plan.kv_heads(layer))
        kv = torch.randn(heads, tokens, shape.head_dim, generator=generator).to(device, dtype)
        cache.append(0, layer, kv, kv)
    return cache


def _dynamic_cache_bytes(shape, tokens, device, dtype, generator) -> int:
    cache = DynamicCache()
    kv = torch.randn(1, shape.num_kv_heads, tokens, shape.head_dim, generator=generator).to(device, dtype)
    for layer in range(shape.num_layers):
        cache.update(kv, kv, layer)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def memory_rows(model: str, shape: ModelShape, budgets, tokens: int, pool_gib: float, device, dtype,
                seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    pool = int(pool_gib * 2**30)
    element = torch.finfo(dtype).bits // 8
    dynamic = _dynamic_cache_bytes(shape, tokens, device, dtype, generator)
    rows = [{
        "model": model, "cache": "DynamicCache", "kind": "dense", "budget": 1.0, "tokens": tokens,
        "bytes": dynamic, "predicted_bytes": cost.kv_cache_bytes(shape, tokens, kv_bytes=element),
        "sequences_per_pool": pool // dynamic, "vs_dynamic": 1.0,
    }]
    for kind in ("L", "H"):
        scheme = UnitScheme.default(kind, shape)
        for budget in budgets:
            plan = best_plan(scheme, budget, random_scores(scheme, generator))
            cache = _fill_layer_skip(shape, plan, tokens, device, dtype, generator)
            used = cache.sequence_bytes(0)
            rows.append({
                "model": model, "cache": "LayerSkipKVCache", "kind": f"AdaLLaVA-{kind}", "budget": budget,
                "tokens": tokens, "bytes": used,
                "predicted_bytes": cost.kv_cache_bytes(shape, tokens, plan, kv_bytes=element, page_size=PAGE_SIZE),
                "sequences_per_pool": pool // used if used else None, "vs_dynamic": used / dynamic,
            })
            del cache
    return rows


def bandwidth_calls(shape: ModelShape, batch: int, context: int, chunk: int, device, dtype) -> dict[str, tuple]:
    """The extension ops on one full layer of ``batch`` sequences, as ``{name: (call, elements moved)}``:
    ``kv_append`` of 1 and of ``chunk`` tokens at position ``context``, and ``kv_gather`` of ``context``
    positions."""
    heads, d = shape.num_kv_heads, shape.head_dim
    length = context + chunk
    cache = LayerSkipKVCache(shape, num_pages=batch * heads * -(-length // PAGE_SIZE), page_size=PAGE_SIZE,
                             dtype=dtype, device=device)
    ids = list(range(batch))
    for s in ids:
        cache.add_sequence(s, ExecutionPlan.full(shape), length)
    fill = torch.randn(heads, length, d).to(device, dtype)
    cache.append_batch(ids, 0, [fill] * batch, [fill] * batch)  # takes every page the timed calls write
    table = torch.cat([cache.page_table(s, 0) for s in ids])
    rows = batch * heads
    starts = torch.full((rows,), context, dtype=torch.int32, device=device)

    def append(tokens):
        new = torch.randn(rows, tokens, d).to(device, dtype)
        return lambda: cache.ops.kv_append(cache.k_pages, cache.v_pages, new, new, table, starts)

    calls = {f"append {tokens} token(s)": (append(tokens), 2 * rows * tokens * d) for tokens in (1, chunk)}
    calls[f"gather {context} positions"] = (lambda: cache.ops.kv_gather(cache.k_pages, cache.v_pages, table, context),
                                            2 * rows * context * d)
    return calls


def bandwidth_rows(model: str, shape: ModelShape, batch: int, context: int, chunk: int, device, dtype,
                   budget: TimingBudget = OPS) -> list[dict]:
    """Bandwidth of each of :func:`bandwidth_calls` against a ``copy_`` of the same bytes."""
    return [_bandwidth_row(model, name, fn, elements, device, dtype, budget)
            for name, (fn, elements) in bandwidth_calls(shape, batch, context, chunk, device, dtype).items()]


def _bandwidth_row(model, name, fn, elements, device, dtype, budget) -> dict:
    element = torch.finfo(dtype).bits // 8
    timing = measure_op(fn, device, budget)
    copy_s = measure_copy(elements, device, dtype, budget).median_s
    # Read and written once each.
    moved = 2 * elements * element
    seconds = timing.median_s
    return {
        "model": model, "op": name, "bytes": moved, **timing.fields(), "gbps": moved / seconds / 1e9,
        "copy_gbps": moved / copy_s / 1e9, "vs_copy": copy_s / seconds,
    }


MEMORY_COLUMNS = [
    ("model", "model", "s"), ("cache", "cache", "s"), ("kind", "plan", "s"), ("budget", "budget", ".2f"),
    ("tokens", "tokens", "d"), ("mib", "MiB / sequence", ".2f"), ("predicted_mib", "predicted MiB", ".2f"),
    ("sequences_per_pool", "sequences / pool", "d"), ("vs_dynamic", "vs DynamicCache", ".3f"),
]
BANDWIDTH_COLUMNS = [
    ("model", "model", "s"), ("op", "op", "s"), *TIMING_COLUMNS, ("gbps", "GB/s", ".1f"),
    ("copy_gbps", "copy_ GB/s", ".1f"), ("vs_copy", "of copy_", ".2f"),
]


def _memory_cells(rows: list[dict]) -> list[dict]:
    return [r | {"mib": r["bytes"] / 2**20, "predicted_mib": r["predicted_bytes"] / 2**20,
                 "sequences_per_pool": r["sequences_per_pool"] or 0} for r in rows]


def memory_table(rows: list[dict]) -> str:
    return format_table(_memory_cells(rows), MEMORY_COLUMNS)


def bandwidth_table(rows: list[dict]) -> str:
    return format_table([r | timing_cells(r) for r in rows], BANDWIDTH_COLUMNS)


def markdown(section: dict) -> str:
    """The section in report.md: the bytes one sequence takes per plan, then the append and gather bandwidth."""
    shape = section.get("shape", {})
    memory = (f"One sequence of {section['memory'][0]['tokens']} positions in pages of {section.get('page_size')}, "
              f"a pool of {section.get('pool_gib', 0):g} GiB, {shape.get('num_layers')} layers of "
              f"{shape.get('num_kv_heads')} KV heads:" if section.get("memory") else "")
    return "\n\n".join(part for part in (
        memory, markdown_table(_memory_cells(section.get("memory", [])), MEMORY_COLUMNS),
        markdown_table([r | timing_cells(r) for r in section.get("bandwidth", [])], BANDWIDTH_COLUMNS)) if part)


# --- host bookkeeping: what admitting, replanning, stepping and freeing a request costs the CPU -----------

HOST_POOL_PAGES = 400_000
HOST_MAX_TOKENS = 800


def half_kv_plan(shape: ModelShape, *, neurons: bool = True) -> ExecutionPlan:
    """Every layer with the query heads of the first half of the KV heads: half the pages. The pool reads no
    neuron; without them (``neurons=False``) the plan is built in a millisecond instead of 40 (350k indices)."""
    kept = range(shape.num_kv_heads // 2 * shape.heads_per_kv_head)
    mlp = range(shape.intermediate_size) if neurons else ()
    return ExecutionPlan(shape, [kept] * shape.num_layers, [mlp] * shape.num_layers)


def _median_us(samples: list[float]) -> float:
    return float(np.median(samples)) * 1e6


def host_rows(shape: ModelShape | None = None, *, num_pages: int = HOST_POOL_PAGES,
              max_tokens: int = HOST_MAX_TOKENS, repeats: int = 200, fresh_plans: int = 20,
              device: str = "meta") -> list[dict]:
    """Median host seconds of the pool's per-request calls at ``shape`` (default LLaVA-1.5-7B), as the runtime
    makes them: ``add_sequence(reserve=True)`` under the full plan, ``set_plan`` to half the KV heads,
    ``model_tables`` at the request's width, ``advance`` of one sequence by one token, ``free``; and
    ``set_plan`` to a plan object the pool has not seen (``fresh_plans`` of them: a planner's new plan, whose
    layout the pool derives). The pool is on ``device`` (``meta`` by default: the bookkeeping is real, the
    ``num_pages`` pages take no memory) and holds three other full requests. Each call is timed alone with
    ``time.perf_counter`` (they change the pool, so they cannot be repeated in a block)."""
    shape = get_shape("llava-7b") if shape is None else shape
    cache = LayerSkipKVCache(shape, num_pages=num_pages, page_size=PAGE_SIZE, device=device, scratch_page=True)
    full, half = ExecutionPlan.full(shape), half_kv_plan(shape)
    for i in range(3):  # a pool that other requests share
        cache.add_sequence(f"other{i}", full, max_tokens, reserve=True)
    width = -(-max_tokens // PAGE_SIZE)
    calls = {
        "add_sequence(reserve=True)": lambda: cache.add_sequence("s", full, max_tokens, reserve=True),
        "set_plan(half KV heads)": lambda: cache.set_plan("s", half),
        f"model_tables(width {width})": lambda: cache.model_tables("s", width),
        "advance(1 seq, 1 token)": lambda: cache.advance(["s"], 1),
        "free": lambda: cache.free("s"),
    }
    samples = {name: [] for name in calls}
    for i in range(repeats + 3):  # the first 3: warm-up
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= 3:
                samples[name].append(time.perf_counter() - start)
    fresh = "set_plan(half KV heads, a new plan object)"
    samples[fresh] = []
    # Built beforehand: building one in the loop would time the caches it evicts, not the pool.
    plans = [half_kv_plan(shape, neurons=False) for _ in range(fresh_plans)]
    for plan in plans:
        cache.add_sequence("s", full, max_tokens, reserve=True)
        start = time.perf_counter()
        cache.set_plan("s", plan)
        samples[fresh].append(time.perf_counter() - start)
        cache.free("s")
    pages = cache.pages_for(full, max_tokens)
    return [{"op": name, "median_us": _median_us(times), "repeats": len(times), "pages": pages,
             "pool_pages": num_pages, "device": device, "threads": torch.get_num_threads()}
            for name, times in samples.items()]


HOST_COLUMNS = [("op", "op", "s"), ("median_us", "median us", ".1f"), ("repeats", "repeats", "d"),
                ("pages", "pages / full request", "d"), ("pool_pages", "pool pages", "d"), ("device", "pool on", "s"),
                ("threads", "threads", "d")]


def host_table(rows: list[dict]) -> str:
    return format_table(rows, HOST_COLUMNS)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.kv_cache``: the pool's host time per request call at LLaVA-1.5-7B, on one thread."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.kv_cache", description=main.__doc__)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls of each op (default 200)")
    parser.add_argument("--device", default="meta",
                        help="where the pool's K/V would live (default meta: bookkeeping only, no K/V)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive count, got {args.repeats}")
    torch.set_num_threads(1)
    print(host_table(host_rows(repeats=args.repeats, device=args.device)))


if __name__ == "__main__":
    main()
