"""masked_attention against transformers' LlamaAttention with the o_proj columns of inactive heads zeroed.

Both backends; the Triton one runs under TRITON_INTERPRET=1 on a CPU (set in conftest.py).
"""

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from adallava_kernels import (
    BackendUnavailableError,
    ContiguousKVCache,
    ExecutionPlan,
    MaskedAttention,
    ModelShape,
    TransformersCacheLayer,
    masked_attention,
)
from adallava_kernels.ops import common
from adallava_kernels.testing import assert_close

from _device import DEVICE, to_device
from _transformers import CACHE_KEYWORD

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]


def llama_config(hidden, heads, kv_heads, head_dim, attn="eager") -> LlamaConfig:
    config = LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=4 * hidden, num_hidden_layers=2, vocab_size=101, max_position_embeddings=512,
    )
    config._attn_implementation = attn
    return config


def hf_attention(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> LlamaAttention:
    """A LlamaAttention with random weights already rounded to ``dtype``, so the oracle sees what the op sees."""
    attn = LlamaAttention(config, layer_idx=0)
    with torch.no_grad():
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            linear.weight.normal_(std=linear.weight.shape[1] ** -0.5)
            linear.weight.copy_(linear.weight.to(dtype).float())
    return attn


def rotary(config, batch, positions, dtype=torch.float32):
    """cos, sin for ``positions`` ([batch, seq]) as LlamaRotaryEmbedding returns them."""
    x = torch.zeros(1, dtype=dtype)
    return LlamaRotaryEmbedding(config)(x, positions.expand(batch, -1))


def oracle(attn, x, active, positions, padding=None):
    """transformers' LlamaAttention in float64, o_proj columns of inactive heads zeroed, eager, causal + padding."""
    config = attn.config
    ref = copy.deepcopy(attn).double()
    keep = torch.zeros(config.num_attention_heads, dtype=torch.bool)
    keep[active.long()] = True
    with torch.no_grad():
        ref.o_proj.weight.view(config.hidden_size, config.num_attention_heads, -1)[:, ~keep] = 0
    batch, seq, _ = x.shape
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(batch, 1, seq, seq)
    if padding is not None:
        visible = visible & padding.bool()[:, None, None, :]
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    cos, sin = rotary(config, batch, positions, torch.float64)
    with torch.no_grad():
        return ref(x.double(), (cos, sin), mask)[0]


def weights(attn, dtype):
    return [m.weight.detach().to(dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]


def run(attn, x, active, dtype, positions, attention_mask=None, **kwargs):
    """The op on DEVICE, output back on the CPU."""
    config = attn.config
    cos, sin = rotary(config, x.shape[0], positions, dtype)
    return masked_attention(
        *to_device(x.to(dtype), *weights(attn, dtype), active, cos, sin),
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
        attention_mask=to_device(attention_mask)[0], **kwargs,
    ).cpu()


CONFIGS = {
    # MHA at a head_dim that is not a power of two (tiles are masked along d).
    "MHA-4x24": (96, 4, 4, 24),
    # GQA: 6 query heads over 2 KV heads.
    "GQA-6/2x16": (96, 6, 2, 16),
}
CASES = {
    # id: (config, batch, seq, active heads)
    "MHA-B2-S17-some": ("MHA-4x24", 2, 17, [1, 3]),
    "MHA-B1-S1-one": ("MHA-4x24", 1, 1, [2]),
    "MHA-B1-S123-all": ("MHA-4x24", 1, 123, [0, 1, 2, 3]),
    "GQA-B2-S17-one-kv-head-unused": ("GQA-6/2x16", 2, 17, [0, 2]),
    "GQA-B3-S45-mixed": ("GQA-6/2x16", 3, 45, [1, 3, 4]),
    "GQA-B1-S123-all": ("GQA-6/2x16", 1, 123, [0, 1, 2, 3, 4, 5]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_llama_attention_with_zeroed_columns(case, dtype, backend):
    config_id, batch, seq, heads = case
    attn = hf_attention(llama_config(*CONFIGS[config_id]), dtype)
    x = torch.randn(batch, seq, attn.config.hidden_size).to(dtype)
    active = torch.tensor(heads, dtype=torch.int32)
    positions = torch.arange(seq)[None]
    out = run(attn, x, active, dtype, positions, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, oracle(attn, x, active, positions))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_left_padding(dtype, backend):
    attn = hf_attention(llama_config(*CONFIGS["GQA-6/2x16"]), dtype)
    batch, seq = 3, 19
    padding = torch.ones(batch, seq, dtype=torch.long)
    padding[0, :5] = 0
    padding[2, :18] = 0  # one real token
    x = torch.randn(batch, seq, 96).to(dtype)
    active = torch.tensor([0, 4, 5])
    # transformers numbers the real tokens from 0 under left padding.
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    out = run(attn, x, active, dtype, positions, attention_mask=padding, backend=backend)
    expected = oracle(attn, x, active, positions, padding)
    real = padding.bool()
    assert_close(out[real], expected[real])
    # A padded query sees no key: its output is zero (transformers averages the masked keys instead).
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_active_head_gives_zero_and_stores_no_kv(dtype, backend):
    attn = hf_attention(llama_config(*CONFIGS["GQA-6/2x16"]), dtype)
    x = torch.randn(2, 5, 96).to(dtype)
    cache = ContiguousKVCache(2, 0, 16, 8, dtype=dtype, device=DEVICE)
    out = run(attn, x, torch.empty(0, dtype=torch.int32), dtype, torch.arange(5)[None], backend=backend,
              kv_cache=cache)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    assert cache.length == 5 and cache.keys.numel() == 0


def decode_steps(attn, x, active, dtype, backend, cache, prompt_len):
    """Prefill ``prompt_len`` tokens into ``cache``, then decode the rest of ``x`` one token at a time."""
    outs = []
    seq = x.shape[1]
    steps = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, seq)]
    for start, stop in steps:
        positions = torch.arange(start, stop)[None]
        outs.append(run(attn, x[:, start:stop], active, dtype, positions, backend=backend, kv_cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_then_decode_equals_full_prefill(dtype, backend):
    attn = hf_attention(llama_config(*CONFIGS["GQA-6/2x16"]), dtype)
    batch, seq, prompt = 2, 23, 17
    x = torch.randn(batch, seq, 96).to(dtype)
    active = torch.tensor([1, 2, 5])  # both KV heads, in an arbitrary map
    cache = ContiguousKVCache(batch, 2, 16, seq, dtype=dtype, device=DEVICE)
    stepped = decode_steps(attn, x, active, dtype, backend, cache, prompt)
    assert cache.length == seq
    full = run(attn, x, active, dtype, torch.arange(seq)[None], backend=backend)
    assert_close(stepped, full.double())
    assert_close(stepped, oracle(attn, x, active, torch.arange(seq)[None]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_a_transformers_cache_stores_only_active_kv_heads(backend):
    attn = hf_attention(llama_config(*CONFIGS["GQA-6/2x16"]))
    x = torch.randn(2, 9, 96)
    active = torch.tensor([3, 4])  # both in KV head 1
    cache = DynamicCache()
    stepped = decode_steps(attn, x, active, torch.float32, backend, TransformersCacheLayer(cache, 0), 6)
    keys = cache.layers[0].keys
    assert list(keys.shape) == [2, 1, 9, 16]
    assert_close(stepped, oracle(attn, x, active, torch.arange(9)[None]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_padding(backend):
    attn = hf_attention(llama_config(*CONFIGS["MHA-4x24"]))
    batch, seq, prompt = 2, 12, 9
    padding = torch.ones(batch, seq, dtype=torch.long)
    padding[1, :4] = 0
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    x = torch.randn(batch, seq, 96)
    active = torch.tensor([0, 3])
    cache = ContiguousKVCache(batch, 2, 24, seq, dtype=torch.float32, device=DEVICE)  # MHA: a KV head per head
    outs = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, seq)]:
        outs.append(run(attn, x[:, start:stop], active, torch.float32, positions[:, start:stop],
                        attention_mask=padding[:, :stop], kv_cache=cache, backend=backend))
    out = torch.cat(outs, dim=1)
    real = padding.bool()
    assert_close(out[real], oracle(attn, x, active, positions, padding)[real])


# --- bad input -----------------------------------------------------------------


def args(dtype=torch.float32):
    """Valid arguments for 6 heads over 2 KV heads, head_dim 16, hidden 96; batch 2, seq 5."""
    return {
        "x": torch.randn(2, 5, 96, dtype=dtype),
        "w_q": torch.randn(96, 96, dtype=dtype),
        "w_k": torch.randn(32, 96, dtype=dtype),
        "w_v": torch.randn(32, 96, dtype=dtype),
        "w_o": torch.randn(96, 96, dtype=dtype),
        "active_heads": torch.tensor([0, 4], dtype=torch.int32),
        "cos": torch.randn(2, 5, 16),
        "sin": torch.randn(2, 5, 16),
        "num_heads": 6,
        "num_kv_heads": 2,
    }


def call(**changes):
    return masked_attention(**(args() | changes))


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"x": torch.randn(10, 96)}, ValueError, "x must be 3-D"),
        ({"x": torch.randn(2, 5, 96).double()}, ValueError, "x must have dtype in"),
        ({"w_k": torch.randn(32, 96).half()}, ValueError, "w_k has dtype torch.float16, but x has torch.float32"),
        ({"w_q": torch.randn(95, 96)}, ValueError, r"w_q must have shape \[num_heads \* head_dim, hidden\]"),
        ({"w_v": torch.randn(48, 96)}, ValueError, r"w_v must have shape \[32, 96\]"),
        ({"w_o": torch.randn(96, 95)}, ValueError, r"w_o must have shape \[96, 96\]"),
        ({"num_kv_heads": 4}, ValueError, r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
        ({"num_heads": 0}, ValueError, "num_heads must be a positive int"),
        ({"num_heads": 32, "num_kv_heads": 2}, ValueError, "head_dim must be even"),
        ({"active_heads": torch.tensor([0, 6])}, ValueError, r"active_heads: index 6 out of range \[0, 6\)"),
        ({"active_heads": torch.tensor([2, 2])}, ValueError, "active_heads: index 2 is duplicated"),
        ({"active_heads": torch.tensor([3, 1])}, ValueError, "must be sorted ascending: 3 comes before 1"),
        ({"active_heads": [0, 1]}, TypeError, "active_heads must be a torch.Tensor"),
        ({"cos": torch.randn(2, 4, 16)}, ValueError, r"cos must have shape \[2 or 1, 5, 16\]"),
        ({"sin": torch.randn(3, 5, 16)}, ValueError, r"sin must have shape \[2 or 1, 5, 16\]"),
        ({"attention_mask": torch.ones(2, 6, dtype=torch.long)}, ValueError,
         r"attention_mask must be a \[batch, past \+ seq\] = \[2, 5\] padding mask"),
        ({"attention_mask": torch.ones(2, 5)}, ValueError, "attention_mask must have dtype in"),
        ({"kv_cache": DynamicCache()}, TypeError, "kv_cache must be a KVCacheLayer"),
        ({"w_o": torch.randn(96, 96, device="meta")}, ValueError, "w_o must be on cpu, got meta"),
        ({"cos": torch.randn(2, 5, 16, device="meta")}, ValueError, "cos must be on cpu, got meta"),
    ],
)
def test_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        call(**changes)


def test_rejected_calls_leave_the_cache_unchanged():
    cache = ContiguousKVCache(2, 2, 16, 7, dtype=torch.float32)
    call(kv_cache=cache)  # 5 tokens stored
    before = (cache.keys.clone(), cache.values.clone())
    with pytest.raises(ValueError, match=r"cache capacity exceeded: 5 stored \+ 5 new > capacity 7"):
        call(kv_cache=cache)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, past \+ seq\] = \[2, 10\]"):
        call(kv_cache=cache, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key must have shape \[2, 2, new_tokens, 16\]"):
        call(kv_cache=cache, active_heads=torch.tensor([0]))  # needs 1 KV head, the cache holds 2
    assert cache.length == 5
    assert torch.equal(cache.keys, before[0]) and torch.equal(cache.values, before[1])


def test_backend_convention(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="cuda")
    monkeypatch.setattr(common, "INTERPRETING", False)
    with pytest.raises(BackendUnavailableError, match="Triton kernels run on CUDA tensors"):
        call(backend="triton")
    same = args()
    assert torch.equal(masked_attention(**same, backend="auto"), masked_attention(**same, backend="torch"))


# --- the nn.Module drop-in -----------------------------------------------------

SHAPE = ModelShape(hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
                   intermediate_size=384, vocab_size=101)


def tiny_llama(attn="eager"):
    from transformers import LlamaForCausalLM

    config = llama_config(96, 6, 2, 16, attn)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:  # weights exactly representable in every test dtype
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            torch.nn.init.normal_(linear.weight, std=96**-0.5)
    return model


def zero_inactive_heads(model, plan):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            keep = torch.zeros(6, dtype=torch.bool)
            keep[list(plan.heads[i])] = True
            layer.self_attn.o_proj.weight.view(96, 6, 16)[:, ~keep] = 0
    return ref


def with_masked_attention(model, plan, backend):
    """A copy of ``model`` on DEVICE whose attention layers run ``plan`` through MaskedAttention."""
    model = copy.deepcopy(model).to(DEVICE)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = MaskedAttention.from_hf(layer.self_attn, backend=backend)
        layer.self_attn.set_plan(plan.layer(i))
    return model


PLAN = ExecutionPlan(SHAPE, heads=[[0, 1, 2, 3, 4, 5], [1, 4]], neurons=[range(384), range(384)])


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_drops_into_a_llama_model(backend, attn_impl):
    model = tiny_llama(attn_impl)
    ids = torch.randint(0, 101, (2, 11))
    padding = torch.ones(2, 11, dtype=torch.long)
    padding[1, :3] = 0
    masked = with_masked_attention(model, PLAN, backend)
    with torch.no_grad():
        expected = zero_inactive_heads(model, PLAN)(ids, attention_mask=padding).logits
        out = masked(*to_device(ids), attention_mask=to_device(padding)[0]).logits.cpu()
    real = padding.bool()
    assert_close(out[real], expected[real].double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_generate_matches_zeroed_model(backend):
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 7))
    plan = ExecutionPlan(SHAPE, heads=[range(6), [3, 5]], neurons=[range(384), range(384)])
    masked = with_masked_attention(model, plan, backend)
    reference = zero_inactive_heads(model, plan)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = DynamicCache()
    with torch.no_grad():
        tokens = masked.generate(*to_device(ids), **{CACHE_KEYWORD: cache}, **kwargs).cpu()
        assert torch.equal(tokens, reference.generate(ids, **kwargs))
    # Layer 1 keeps heads 3 and 5, both in KV head 1: its cache holds one KV head of two.
    # (12 positions: the last generated token is never fed back.)
    assert [list(layer.keys.shape) for layer in cache.layers] == [[2, 2, 12, 16], [2, 1, 12, 16]]


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_module_reads_the_cache_under_either_keyword(keyword):
    # transformers 5.24 passes the cache as cache=, earlier releases as past_key_values=: both must store K/V.
    attn = hf_attention(llama_config(96, 6, 2, 16))
    attn.layer_idx = 0
    module = MaskedAttention.from_hf(attn, backend="torch")
    module.set_plan(PLAN.layer(1))
    x = torch.randn(1, 5, 96)
    cos, sin = rotary(attn.config, 1, torch.arange(5)[None])
    cache = DynamicCache()
    with torch.no_grad():
        module(x[:, :4], (cos[:, :4], sin[:, :4]), **{keyword: cache})
        last = module(x[:, 4:], (cos[:, 4:], sin[:, 4:]), **{keyword: cache})[0]
    assert cache.get_seq_length(0) == 5
    assert list(cache.layers[0].keys.shape) == [1, 2, 5, 16]  # heads 1 and 4 read KV heads 0 and 1
    expected = oracle(attn, x, PLAN.layer(1).heads, torch.arange(5)[None])[:, 4:]
    assert_close(last, expected)


@pytest.mark.parametrize("keywords, error, match", [
    (dict(past_key_value="the old singular name"), TypeError, r"does not support: \['past_key_value'\]"),
    (dict(output_attentions=True), TypeError, r"does not support: \['output_attentions'\]"),
    (dict(cache=DynamicCache(), past_key_values=DynamicCache()), ValueError, "two different caches"),
], ids=["unknown-cache-name", "attention-weights", "two-caches"])
def test_module_refuses_keywords_it_would_drop(keywords, error, match):
    attn = hf_attention(llama_config(96, 6, 2, 16))
    attn.layer_idx = 0
    module = MaskedAttention.from_hf(attn, backend="torch")
    x = torch.randn(1, 3, 96)
    cos, sin = rotary(attn.config, 1, torch.arange(3)[None])
    with pytest.raises(error, match=match):
        module(x, (cos, sin), **keywords)


def test_module_plan_changes_and_rejects():
    attn = hf_attention(llama_config(96, 6, 2, 16))
    module = MaskedAttention.from_hf(attn, backend="torch")
    assert module.o_weight.stride() == (1, 96)  # column-major: gathered columns are contiguous
    x = torch.randn(1, 4, 96)
    cos, sin = rotary(attn.config, 1, torch.arange(4)[None])
    with torch.no_grad():
        module.set_plan(PLAN.layer(1))
        assert_close(module(x, (cos, sin))[0], oracle(attn, x, PLAN.layer(1).heads, torch.arange(4)[None]))
        module.set_plan(None)
        assert_close(module(x, (cos, sin))[0], oracle(attn, x, torch.arange(6), torch.arange(4)[None]))
    # A plan for another shape names both shapes, also when its heads would all be in range.
    bigger = ExecutionPlan.full(ModelShape(96, 1, 8, 2, 12, 384, 10))
    with pytest.raises(ValueError, match=r"layer plan 0 is for a model with 8 heads over 2 KV heads of dim 12, "
                                         r"384 MLP neurons, but this attention has 6 heads over 2 KV heads of dim 16"):
        module.set_plan(bigger.layer(0))
    other_kv = ExecutionPlan(ModelShape(96, 1, 6, 3, 16, 384, 10), [[0, 1]], [[]])
    with pytest.raises(ValueError, match="for a model with 6 heads over 3 KV heads of dim 16.*6 heads over 2 KV heads"):
        module.set_plan(other_kv.layer(0))
    attn.k_proj = torch.nn.Linear(96, 32, bias=True)
    with pytest.raises(ValueError, match="attn.k_proj has a bias"):
        MaskedAttention.from_hf(attn)
