"""pytest-benchmark entry points for the cases ``python -m bench`` times, for teams that track regressions that way.

    pytest bench --benchmark-only                     # CUDA when present (llava-7b, bf16), else CPU (tiny, fp32)
    pytest bench --benchmark-only --benchmark-json=out.json

The cases follow the sections of ``python -m bench``: the masked MLP and
attention, the KV cache's append and gather, the model's prefill and
``generate`` under every family's plans with the full plan and transformers
as references, and the latency section's requests (time to first token and
the whole request, per family and budget). An op or prefill records its
predicted FLOPs in ``extra_info``, so a tracked series can be divided by
them. These are not tests of correctness: ``tests/`` is.
"""

from __future__ import annotations

import pytest
import torch

from adallava_kernels import ExecutionPlan, cost, get_shape, masked_attention, masked_mlp
from adallava_kernels.ops.layout import prepare_column_gather

from . import attention as attention_bench
from . import kv_cache as kv_bench
from . import latency as latency_bench
from . import mlp as mlp_bench
from . import model as model_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPE = get_shape("llava-7b" if ON_GPU else "tiny")
TOKENS = 700 if ON_GPU else 64
BUDGETS = (0.5, 0.75, 1.0)


def _timed(fn):
    """``fn`` that waits for the GPU, so the benchmark measures the work and not the launch."""
    if not ON_GPU:
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced


def _randn(*shape, scale=1.0, generator):
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, DTYPE)


@pytest.mark.parametrize("keep", mlp_bench.KEEP_RATIOS)
def test_masked_mlp(benchmark, keep):
    g = torch.Generator().manual_seed(0)
    hidden, inter = SHAPE.hidden_size, SHAPE.intermediate_size
    x = _randn(TOKENS, hidden, generator=g)
    w_gate, w_up = (_randn(inter, hidden, scale=hidden**-0.5, generator=g) for _ in range(2))
    w_down = prepare_column_gather(_randn(hidden, inter, scale=inter**-0.5, generator=g))
    active = mlp_bench.kept_neurons(SHAPE, keep, g).to(DEVICE)
    benchmark.extra_info["flops"] = cost.masked_mlp_cost(SHAPE, TOKENS, active.numel()).flops
    benchmark(_timed(lambda: masked_mlp(x, w_gate, w_up, w_down, active, check_indices=False)))


@pytest.mark.parametrize("fraction", attention_bench.HEAD_FRACTIONS)
def test_masked_attention_prefill(benchmark, fraction):
    g = torch.Generator().manual_seed(0)
    s, d = SHAPE, SHAPE.head_dim
    x = _randn(1, TOKENS, s.hidden_size, generator=g)
    w_q = _randn(s.num_heads * d, s.hidden_size, scale=s.hidden_size**-0.5, generator=g)
    w_k, w_v = (_randn(s.num_kv_heads * d, s.hidden_size, scale=s.hidden_size**-0.5, generator=g) for _ in range(2))
    w_o = prepare_column_gather(_randn(s.hidden_size, s.num_heads * d, scale=(s.num_heads * d) ** -0.5, generator=g))
    angles = torch.rand(1, TOKENS, d // 2, generator=g) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(DEVICE, DTYPE), angles.sin().to(DEVICE, DTYPE)
    heads = attention_bench.kept_heads(s.num_heads, fraction, g).to(DEVICE)
    kv = len({int(h) // s.heads_per_kv_head for h in heads})
    benchmark.extra_info["flops"] = cost.masked_attention_cost(
        s, heads=heads.numel(), kv_heads=kv, q_tokens=TOKENS, kv_tokens=TOKENS).flops
    benchmark(_timed(lambda: masked_attention(x, w_q, w_k, w_v, w_o, heads, cos, sin, num_heads=s.num_heads,
                                              num_kv_heads=s.num_kv_heads, check_indices=False)))


@pytest.mark.parametrize("op", ["append 1", "append chunk", "gather"])
def test_kv_cache(benchmark, op):
    context, chunk = (700, 700) if ON_GPU else (128, 64)
    calls = list(kv_bench.bandwidth_calls(SHAPE, 1, context, chunk, DEVICE, DTYPE).values())
    fn, elements = calls[["append 1", "append chunk", "gather"].index(op)]
    benchmark.extra_info["bytes"] = 2 * elements * torch.finfo(DTYPE).bits // 8
    benchmark(_timed(fn))


def test_kv_pool_host_cycle(benchmark):
    """One request's host bookkeeping at LLaVA-7B whatever the device (a meta pool: no K/V): admitted with
    every page reserved under the full plan, replanned to half the KV heads, one step, freed
    (``python -m bench.kv_cache`` times each call alone)."""
    shape = get_shape("llava-7b")
    pool = kv_bench.LayerSkipKVCache(shape, num_pages=kv_bench.HOST_POOL_PAGES, device="meta", scratch_page=True)
    full, half = ExecutionPlan.full(shape), kv_bench.half_kv_plan(shape, neurons=False)

    def cycle():
        pool.add_sequence("s", full, kv_bench.HOST_MAX_TOKENS, reserve=True)
        pool.set_plan("s", half)
        pool.advance(["s"], 1)
        pool.free("s")

    benchmark(cycle)


# -- end to end: the model section's plans and references, and the latency section's requests --------------

PLANS = [(model_bench.FULL, "full", ExecutionPlan.full(SHAPE)), *model_bench.plans(SHAPE, list(BUDGETS), 2),
         (model_bench.DENSE, "dense", None)]
PLAN_IDS = [label.replace(" ", "-") for _, label, _ in PLANS]


@pytest.fixture(scope="module")
def models():
    """The -L and -H models on one set of weights, as the latency section builds them."""
    return latency_bench.shared_models(SHAPE, DEVICE, DTYPE)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SHAPE.vocab_size - 1, (1, TOKENS), generator=torch.Generator().manual_seed(1)).to(DEVICE)


@pytest.mark.parametrize("family, label, plan", PLANS, ids=PLAN_IDS)
def test_model_prefill(benchmark, models, ids, family, label, plan):
    benchmark.extra_info["flops"] = cost.prefill_flops(SHAPE, TOKENS, plan)
    benchmark(_timed(model_bench.prefill_call(models["L"], ids, plan, "auto")))


@pytest.mark.parametrize("new_tokens", [1, model_bench.DECODE_STEPS + 1])
@pytest.mark.parametrize("family, label, plan", PLANS, ids=PLAN_IDS)
def test_model_generate(benchmark, models, ids, family, label, plan, new_tokens):
    """A decode step is the difference of the two token counts' times over DECODE_STEPS, as the model section
    takes it."""
    benchmark.extra_info["decode_steps"] = new_tokens - 1
    if plan is None:
        benchmark(_timed(model_bench.dense_generate_call(models["L"], ids, new_tokens)))
    else:
        benchmark(_timed(model_bench.generate_call(models["L"], ids, new_tokens, "auto", plan=plan)))


REQUEST = latency_bench.GPU_REQUEST if ON_GPU else latency_bench.CPU_REQUEST
REQUESTS = [(f, b) for f in latency_bench.FAMILIES for b in BUDGETS] + [(model_bench.FULL, 1.0),
                                                                          (model_bench.DENSE, 1.0)]


@pytest.mark.parametrize("metric", ["ttft", "e2e"])
@pytest.mark.parametrize("family, budget", REQUESTS, ids=[f"{f}-{b:.2f}" for f, b in REQUESTS])
def test_request(benchmark, models, family, budget, metric):
    """A request of the latency section: time to first token (scheduler included) or the whole request."""
    from model.baselines import early_exit_plan

    prompt, new_tokens = REQUEST
    request_ids = torch.randint(0, SHAPE.vocab_size - 1, (1, prompt), generator=torch.Generator().manual_seed(0))
    request_ids = request_ids.to(DEVICE)
    n = 1 if metric == "ttft" else new_tokens
    benchmark.extra_info["new_tokens"] = n
    if family == model_bench.DENSE:
        call = model_bench.dense_generate_call(models["L"], request_ids, n)
    elif family in (model_bench.FULL, "early-exit"):
        plan = ExecutionPlan.full(SHAPE) if family == model_bench.FULL else early_exit_plan(SHAPE, budget)
        call = model_bench.generate_call(models["L"], request_ids, n, "auto", plan=plan, latency_budget=budget)
    else:
        call = model_bench.generate_call(models[family[-1]], request_ids, n, "auto", latency_budget=budget)
    benchmark(_timed(call))
