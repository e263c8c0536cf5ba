"""Every public function (the ``__all__`` of each package) checks its arguments as the tensor checks do: a wrong type
or value is a ``TypeError`` or ``ValueError`` that names the argument, never an ``AttributeError`` or a message
from deep inside."""

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adallava_kernels
import model as model_package
from adallava_kernels import (ContiguousKVCache, ExecutionPlan, LayerSkipKVCache, MaskedAttention, MaskedMLP,
                              ModelShape, PlannedDecoder, UnitScheme, apply_masked_kernels, best_plan, check_budget,
                              check_token_ids, cost, get_device, get_shape, masked_attention, masked_mlp, neuron_groups)
from adallava_kernels import budget, kv_cache, runtime
from model import fit_image_tokens

from _tiny_llava import tiny_inputs, tiny_model

TINY = get_shape("tiny")
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100)
# Values of the wrong type for any argument below; None only where None is not the default.
WRONG = (None, "x", object(), 2.5)


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def calls() -> dict:
    """Per public function: itself and arguments it accepts; each argument is then replaced by each of WRONG."""
    plan, hf = ExecutionPlan.full(TINY), llama()
    hf_plan = ExecutionPlan.full(ModelShape.from_hf_config(CONFIG))
    scheme = UnitScheme.default("H", TINY)
    x, w_gate, w_down = torch.randn(1, 3, 192), torch.randn(520, 192), torch.randn(192, 520)
    xa, w_q, w_kv = torch.randn(1, 5, 64), torch.randn(64, 64), torch.randn(32, 64)
    pool = LayerSkipKVCache(TINY, num_pages=64, page_size=16, dtype=torch.float32)
    pool.add_sequence("p", plan, 32)
    runner = PlannedDecoder.from_hf(hf, num_pages=32, page_size=16)
    batch = runner.decode(capacity=2, max_tokens=8)
    tiny, (ids, pixels) = tiny_model("H"), tiny_inputs(batch=1)
    return {
        "ExecutionPlan": (ExecutionPlan, dict(shape=TINY, heads=[range(8)] * 4, neurons=[range(520)] * 4)),
        "ExecutionPlan.full": (ExecutionPlan.full, dict(shape=TINY)),
        "ExecutionPlan.from_layer_mask": (ExecutionPlan.from_layer_mask, dict(mask=[1, 1, 0, 1], shape=TINY)),
        "ExecutionPlan.from_switches": (ExecutionPlan.from_switches, dict(switches=torch.ones(4, 2, 8), shape=TINY)),
        "ExecutionPlan.from_json": (ExecutionPlan.from_json, dict(text=plan.to_json())),
        "ExecutionPlan.layer": (plan.layer, dict(index=0)),
        "ExecutionPlan.check_shape": (plan.check_shape, dict(shape=TINY)),
        "get_shape": (get_shape, dict(name="tiny")),
        "ModelShape.from_hf_config": (ModelShape.from_hf_config, dict(config=CONFIG)),
        "UnitScheme": (UnitScheme, dict(kind="H", shape=TINY, prefix_layers=2, rank=8)),
        "UnitScheme.default": (UnitScheme.default, dict(kind="H", shape=TINY)),
        "best_plan": (best_plan, dict(scheme=scheme, budget=0.75, scores=(torch.randn(2, 8), torch.randn(2, 8)))),
        "budget.flops_budget": (budget.flops_budget, dict(scheme=scheme, budget=0.75, num_tokens=10)),
        "check_budget": (check_budget, dict(budget=0.75)),
        "check_token_ids": (check_token_ids, dict(name="ids", ids=torch.tensor([1]), vocab_size=10)),
        "get_device": (get_device, dict(name="H200")),
        "neuron_groups": (neuron_groups, dict(intermediate_size=520, num_groups=8)),
        "cost.prefill_flops": (cost.prefill_flops, dict(shape=TINY, num_tokens=10, plan=plan)),
        "cost.decode_flops": (cost.decode_flops, dict(shape=TINY, context_len=10, plan=plan)),
        "cost.prefill_cost": (cost.prefill_cost, dict(shape=TINY, num_tokens=10, plan=plan)),
        "cost.decode_cost": (cost.decode_cost, dict(shape=TINY, context_len=10, plan=plan)),
        "cost.batch_decode_cost": (cost.batch_decode_cost, dict(shape=TINY, context_len=10, plans=[plan])),
        "cost.kv_cache_bytes": (cost.kv_cache_bytes, dict(shape=TINY, num_tokens=10, plan=plan)),
        "cost.roofline": (cost.roofline, dict(breakdown=cost.decode_cost(TINY, 10), device="H200")),
        "cost.format_flops": (cost.format_flops, dict(flops=1e9)),
        "masked_mlp": (masked_mlp, dict(x=x, w_gate=w_gate, w_up=w_gate, w_down=w_down,
                                        active_neurons=plan.layer(0).neurons, backend="torch")),
        "masked_attention": (masked_attention, dict(x=xa, w_q=w_q, w_k=w_kv, w_v=w_kv, w_o=w_q,
                                                    active_heads=torch.arange(4, dtype=torch.int32),
                                                    cos=torch.ones(1, 5, 16), sin=torch.zeros(1, 5, 16),
                                                    num_heads=4, num_kv_heads=2)),
        "MaskedMLP.from_hf": (MaskedMLP.from_hf, dict(mlp=hf.model.layers[0].mlp)),
        "MaskedMLP.set_plan": (MaskedMLP.from_hf(hf.model.layers[0].mlp).set_plan, dict(layer=hf_plan.layer(0))),
        "MaskedAttention.from_hf": (MaskedAttention.from_hf, dict(attn=hf.model.layers[0].self_attn)),
        "MaskedAttention.set_plan": (MaskedAttention.from_hf(hf.model.layers[0].self_attn).set_plan,
                                     dict(layer=hf_plan.layer(0))),
        "apply_masked_kernels": (apply_masked_kernels, dict(model=llama(), backend="torch")),
        "LayerSkipKVCache": (LayerSkipKVCache, dict(shape=TINY, num_pages=8, page_size=16, dtype=torch.float32)),
        "LayerSkipKVCache.pages_for": (pool.pages_for, dict(plan=plan, max_tokens=8)),
        "LayerSkipKVCache.append": (pool.append, dict(seq_id="p", layer=0, key=torch.randn(2, 1, 24),
                                                      value=torch.randn(2, 1, 24))),
        "LayerSkipKVCache.layer_view": (pool.layer_view, dict(seq_ids=["p"], layer=0)),
        "ContiguousKVCache": (ContiguousKVCache, dict(batch_size=1, num_kv_heads=2, head_dim=24, capacity=8,
                                                      dtype=torch.float32)),
        "PlannedDecoder.from_hf": (PlannedDecoder.from_hf, dict(model=hf, num_pages=8, page_size=16, max_graphs=2)),
        "PlannedDecoder.pages_for": (runner.pages_for, dict(plan=hf_plan, max_tokens=8)),
        "PlannedDecoder.forward": (runner.forward, dict(inputs_embeds=runner.weights.embed[torch.tensor([[1, 2]])])),
        "PlannedDecoder.decode": (runner.decode, dict(seq_ids=[], capacity=2, max_tokens=8)),
        "DecodeBatch.join": (batch.join, dict(seq_ids=[], tokens=None)),
        "DecodeBatch.leave": (batch.leave, dict(seq_ids=[])),
        "AdaLlavaForConditionalGeneration.generate": (tiny.generate, dict(input_ids=ids, pixel_values=pixels,
                                                                          latency_budget=0.75, max_new_tokens=2,
                                                                          backend="torch")),
        "AdaLlavaForConditionalGeneration.forward": (tiny.forward, dict(input_ids=ids, pixel_values=pixels,
                                                                        latency_budget=0.75)),
        "fit_image_tokens": (fit_image_tokens, dict(input_ids=ids, attention_mask=None, counts=[16], image_token_id=127,
                                                    pad_token_id=0)),
    }


# Valid calls that refuse on purpose (an empty batch): only their wrong arguments are checked.
REFUSE_ANYWAY: set[str] = set()
# Arguments any value is valid for: a sequence id (any hashable), the name a message gives.
ANY_VALUE = {"seq_id", "name"}
# Arguments None is valid for though their default is not None (a layer's plan: all units; a request's: any).
NONE_IS_VALID = {("MaskedMLP.set_plan", "layer"), ("MaskedAttention.set_plan", "layer"),
                 ("PlannedDecoder.pages_for", "plan"), ("fit_image_tokens", "attention_mask")}
# Public names with no call of their own above, and why.
NOT_CALLED = {
    "BackendUnavailableError": "an exception", "PRESETS": "a dict", "DeviceSpec": "a frozen record of numbers",
    "KVCacheLayer": "an abstract interface", "LayerPlan": "built by ExecutionPlan.layer, checked where it is used",
    "ModelShape": "a frozen record, built from a config or a preset", "budget": "a module", "cost": "a module",
    "devices": "a module", "kv_cache": "a module", "DecodeBatch": "built by PlannedDecoder.decode",
    "TransformersCacheLayer": "built from a transformers Cache by MaskedAttention",
    "DecoderWeights": "built by PlannedDecoder.from_hf", "GraphCache": "built by PlannedDecoder",
    "GraphStats": "a record of counters", "LayerProgram": "built by the runtime's program cache",
    "LayerWeights": "built by DecoderWeights", "PagedCacheLayer": "built by LayerSkipKVCache.layer_view",
    "cache_ops": "a module", "transformers_cache": "a transformers Cache over the pool's sequences",
    "AdaGeneration": "a record generate returns", "AdaLlavaConfig": "transformers' config, checked in __init__",
    "AdaLlavaOutput": "a record forward returns", "AdaRequest": "a record start_request returns",
    "IGNORE_INDEX": "a constant", "BUCKETS": "a constant", "BatchSlots": "built by PlannedDecoder.decode",
    "LayerSlots": "views a BatchSlots makes", "Request": "a record the runner keeps per request",
    "RowPlan": "built by PlannedDecoder.row_plan from a checked plan", "SlotLayer": "built by PlannedDecoder",
    "bucket_of": "a number from a number of rows",
}
CALL_NAMES = ["ExecutionPlan", "ExecutionPlan.full", "ExecutionPlan.from_layer_mask", "ExecutionPlan.from_switches",
              "ExecutionPlan.from_json", "ExecutionPlan.layer", "ExecutionPlan.check_shape", "get_shape",
              "ModelShape.from_hf_config", "UnitScheme", "UnitScheme.default", "best_plan", "budget.flops_budget",
              "check_budget", "check_token_ids", "get_device", "neuron_groups", "cost.prefill_flops",
              "cost.decode_flops", "cost.prefill_cost", "cost.decode_cost", "cost.batch_decode_cost",
              "cost.kv_cache_bytes", "cost.roofline", "cost.format_flops", "masked_mlp", "masked_attention",
              "MaskedMLP.from_hf", "MaskedMLP.set_plan", "MaskedAttention.from_hf", "MaskedAttention.set_plan",
              "apply_masked_kernels", "LayerSkipKVCache", "LayerSkipKVCache.pages_for", "LayerSkipKVCache.append",
              "LayerSkipKVCache.layer_view", "ContiguousKVCache", "PlannedDecoder.from_hf", "PlannedDecoder.pages_for",
              "PlannedDecoder.forward", "PlannedDecoder.decode", "DecodeBatch.join", "DecodeBatch.leave",
              "AdaLlavaForConditionalGeneration.generate",
              "AdaLlavaForConditionalGeneration.forward", "fit_image_tokens"]


@pytest.fixture(scope="module")
def public_calls():
    return calls()


def test_every_public_name_is_called_or_says_why_not(public_calls):
    assert list(public_calls) == CALL_NAMES
    called = {name.split(".")[0] for name in CALL_NAMES}
    for package in (adallava_kernels, runtime, kv_cache, model_package):
        for name in package.__all__:
            assert name in called or name in NOT_CALLED, f"{package.__name__}.{name}: no call checks its arguments"
    for name, (function, kwargs) in public_calls.items():
        if name not in REFUSE_ANYWAY:
            function(**kwargs)


@pytest.mark.parametrize("name", CALL_NAMES)
def test_a_wrong_argument_is_named(public_calls, name):
    function, kwargs = public_calls[name]
    defaults = {p.name: p.default for p in inspect.signature(function).parameters.values()}
    for argument in kwargs:
        if argument in ANY_VALUE:
            continue
        for wrong in WRONG:
            if wrong is None and (defaults.get(argument, inspect.Parameter.empty) is None
                                  or (name, argument) in NONE_IS_VALID):
                continue
            if type(wrong) is type(kwargs[argument]):  # 2.5 for a float argument: a right type
                continue
            with pytest.raises((TypeError, ValueError)) as error:
                function(**{**kwargs, argument: wrong})
            message = str(error.value)
            assert argument in message or argument.replace("_", " ") in message, (name, argument, wrong, message)


def test_a_whole_plan_given_to_one_layer_says_to_pass_its_layer():
    hf = llama()
    plan = ExecutionPlan.full(ModelShape.from_hf_config(CONFIG))
    for module in (MaskedAttention.from_hf(hf.model.layers[0].self_attn), MaskedMLP.from_hf(hf.model.layers[0].mlp)):
        with pytest.raises(TypeError, match=r"layer must be one layer's LayerPlan or None, got an ExecutionPlan "
                                            r"\(the whole model's\): pass plan.layer\(i\) for layer i"):
            module.set_plan(plan)
        module.set_plan(plan.layer(0))


@pytest.mark.parametrize("argument", ["heads", "neurons"])
def test_a_plan_without_its_heads_or_neurons_names_them(argument):
    given = {"heads": [range(8)] * 4, "neurons": [range(520)] * 4} | {argument: None}
    with pytest.raises(TypeError, match=rf"{argument} must be a sequence of one index list per layer \(4\), got "
                                        r"NoneType"):
        ExecutionPlan(TINY, **given)
