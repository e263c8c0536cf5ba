"""pytest-benchmark entry points for the cases ``python -m bench`` times, for teams that track regressions that way.

    pytest bench --benchmark-only                     # CUDA when present (llava-7b, bf16), else CPU (tiny, fp32)
    pytest bench --benchmark-only --benchmark-json=out.json

Each case records its predicted FLOPs in ``extra_info``, so a tracked series
can be divided by them. These are not tests of correctness: ``tests/`` is.
"""

from __future__ import annotations

import pytest
import torch

from adallava_kernels import UnitScheme, best_plan, cost, get_shape, masked_attention, masked_mlp
from adallava_kernels.ops.layout import prepare_column_gather

from . import attention as attention_bench
from . import mlp as mlp_bench
from . import model as model_bench
from .plans import random_scores

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
    w_gate, w_up = _randn(inter, hidden, scale=hidden**-0.5, generator=g), _randn(inter, hidden, scale=hidden**-0.5, generator=g)
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
    kv = len({int(h) // s.group_size for h in heads})
    benchmark.extra_info["flops"] = cost.masked_attention_cost(
        s, heads=heads.numel(), kv_heads=kv, q_tokens=TOKENS, kv_tokens=TOKENS).flops
    benchmark(_timed(lambda: masked_attention(x, w_q, w_k, w_v, w_o, heads, cos, sin, num_heads=s.num_heads,
                                              num_kv_heads=s.num_kv_heads, check_indices=False)))


@pytest.fixture(scope="module")
def model():
    return model_bench.build(SHAPE, DEVICE, DTYPE)


@pytest.mark.parametrize("kind", ["L", "H"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_model_prefill(benchmark, model, kind, budget):
    scheme = UnitScheme.default(kind, SHAPE)
    plan = best_plan(scheme, budget, random_scores(scheme, torch.Generator().manual_seed(0)))
    ids = torch.randint(0, SHAPE.vocab_size - 1, (1, TOKENS), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    benchmark.extra_info["flops"] = cost.prefill_flops(SHAPE, TOKENS, plan)
    with torch.no_grad():
        benchmark(_timed(lambda: model(input_ids=ids, plan=plan, backend="auto", logits_to_keep=1)))
