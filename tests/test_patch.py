"""apply_masked_kernels: one call patches a transformers Llama or Llava instance (never the process), the
patched model computes what transformers computes, and it still saves a checkpoint transformers loads."""

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from adallava_kernels import ExecutionPlan, MaskedAttention, MaskedMLP, ModelShape, apply_masked_kernels

from _tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, tiny_inputs, tiny_llava_config


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=100, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def zeroed(model: LlamaForCausalLM, plan: ExecutionPlan) -> LlamaForCausalLM:
    """transformers' model with the o_proj columns of inactive heads and the down_proj columns of
    inactive neurons zeroed (what a plan computes)."""
    ref = copy.deepcopy(model)
    d = model.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            heads = torch.ones(model.config.num_attention_heads, dtype=torch.bool)
            heads[list(plan.heads[i])] = False
            layer.self_attn.o_proj.weight[:, heads.repeat_interleave(d)] = 0
            neurons = torch.ones(model.config.intermediate_size, dtype=torch.bool)
            neurons[list(plan.neurons[i])] = False
            layer.mlp.down_proj.weight[:, neurons] = 0
    return ref


def test_patched_llama_equals_transformers_and_runs_a_plan():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    patched = apply_masked_kernels(copy.deepcopy(model), backend="torch")
    assert all(isinstance(l.self_attn, MaskedAttention) and isinstance(l.mlp, MaskedMLP) for l in patched.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, expected, atol=1e-5, rtol=1e-5)
        shape = ModelShape.from_hf_config(model.config)
        plan = ExecutionPlan(shape, [range(8), [1, 4, 6], []], [range(100), range(0, 100, 3), []])
        apply_masked_kernels(patched, plan=plan)
        torch.testing.assert_close(patched(ids).logits, zeroed(model, plan)(ids).logits, atol=1e-5, rtol=1e-5)


def test_patched_llama_generates_as_transformers():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    patched = apply_masked_kernels(copy.deepcopy(model), backend="torch")
    assert torch.equal(patched.generate(ids, max_new_tokens=5, do_sample=False), expected)


def test_patched_llava_equals_transformers():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    ids, pixels = tiny_inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        patched = apply_masked_kernels(copy.deepcopy(model), backend="torch")
        torch.testing.assert_close(patched(input_ids=ids, pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)
    assert ids[0].tolist().count(IMAGE_TOKEN) == IMAGE_TOKENS


def test_patching_touches_only_the_instance():
    model = tiny_llama()
    apply_masked_kernels(model)
    other = tiny_llama()
    assert type(other.model.layers[0].self_attn) is LlamaAttention and type(other.model.layers[0].mlp) is LlamaMLP
    assert LlamaForCausalLM.forward is LlamaForCausalLM.__dict__["forward"]


def test_patched_model_saves_a_checkpoint_transformers_loads(tmp_path):
    model = tiny_llama()
    patched = apply_masked_kernels(copy.deepcopy(model))
    patched.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = sorted(f.keys())
    # transformers' names, each weight once (the column-major copies of o_proj and down_proj included).
    assert saved == sorted(model.state_dict())
    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_patched_model_loads_a_transformers_state_dict():
    model, other = tiny_llama(), LlamaForCausalLM(tiny_llama().config)
    patched = apply_masked_kernels(other)
    patched.load_state_dict(model.state_dict())
    layer = patched.model.layers[1]
    assert torch.equal(layer.self_attn.o_weight, model.model.layers[1].self_attn.o_proj.weight)
    assert layer.self_attn.o_weight.stride() == (1, 64)  # still the column-major copy the kernels read


@pytest.mark.parametrize("bad, match", [
    (torch.nn.Linear(2, 2), r"model must be a transformers Llama or Llava model; Linear has no LlamaDecoderLayer"),
    ("llama", r"model must be a transformers Llama or Llava model, got str"),
])
def test_apply_masked_kernels_rejects_other_models(bad, match):
    with pytest.raises(ValueError, match=match):
        apply_masked_kernels(bad)


def test_apply_masked_kernels_rejects_a_plan_for_another_shape():
    other = ModelShape(hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=8,
                       intermediate_size=100, vocab_size=97)
    with pytest.raises(ValueError, match="plan is for"):
        apply_masked_kernels(tiny_llama(), plan=ExecutionPlan.full(other))
