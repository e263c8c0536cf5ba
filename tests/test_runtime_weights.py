"""The runtime holds the decoder's weights once: ``DecoderWeights.from_hf`` makes the model's q/k/v and
gate/up parameters views of its stacked tensors, and adds only the column-major copies of the partial
layers' ``o_proj`` and ``down_proj``."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from adallava_kernels import apply_masked_kernels
from adallava_kernels.ops.layout import stack_rows, stacked_rows
from adallava_kernels.runtime import DecoderWeights, PlannedDecoder

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, head_dim=8, vocab_size=128)
PARTIAL = [1, 2]


def llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides})).eval()


def groups(layer) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """A decoder layer's q, k, v weights and its gate, up weights, in stacking order."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], [mlp.gate_proj.weight, mlp.up_proj.weight]


def storage_bytes(tensors) -> int:
    """The bytes of the distinct storages under ``tensors`` (each storage counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def runner_tensors(weights: DecoderWeights) -> list[torch.Tensor]:
    tensors = [weights.embed, weights.norm, weights.lm_head]
    for layer in weights.layers:
        a, m = layer.attention, layer.mlp
        tensors += [layer.input_norm, layer.post_norm, a.w_qkv, a.w_o, a.w_o_columns, m.w_gate_up, m.w_down,
                    m.w_down_columns]
    return tensors


def logits(model) -> torch.Tensor:
    ids = torch.arange(11)[None] % CONFIG["vocab_size"]
    with torch.no_grad():
        return model(ids).logits


def assert_rows_of(stacked: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Each of ``params`` lies in ``stacked``'s storage at its rows, in order."""
    start = stacked.data_ptr()
    for p in params:
        assert p.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        assert p.data_ptr() == start and p.is_contiguous()
        start += p.numel() * p.element_size()
    assert start == stacked.data_ptr() + stacked.numel() * stacked.element_size()


def test_the_models_projections_become_views_of_the_stacked_weights():
    model = llama()
    before = [[(p, p.requires_grad, p.detach().clone()) for p in group] for layer in model.model.layers
              for group in groups(layer)]
    weights = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    for layer, held in zip(model.model.layers, weights.layers):
        qkv, gate_up = groups(layer)
        assert_rows_of(held.attention.w_qkv, qkv)
        assert_rows_of(held.mlp.w_gate_up, gate_up)
    after = [p for layer in model.model.layers for group in groups(layer) for p in group]
    for (p, requires_grad, value), now in zip([x for group in before for x in group], after):
        assert now is p and isinstance(now, nn.Parameter) and now.requires_grad == requires_grad
        assert torch.equal(now, value)


def test_only_the_column_major_copies_are_new_memory():
    model = llama()
    own = storage_bytes(model.parameters())
    weights = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    columns = [t for layer in weights.layers for t in (layer.attention.w_o_columns, layer.mlp.w_down_columns)]
    column_bytes = sum(t.numel() * t.element_size() for t in columns if t is not None)
    assert column_bytes == len(PARTIAL) * (64 * 64 + 64 * 96) * 4
    assert storage_bytes(model.parameters()) == own
    assert storage_bytes([*model.parameters(), *runner_tensors(weights)]) == own + column_bytes


def test_the_model_runs_bit_for_bit_as_before():
    model = llama()
    expected = logits(model)
    DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    assert torch.equal(logits(model), expected)


def test_training_the_model_changes_the_runtimes_weights_with_it():
    model = llama()
    weights = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    q = model.model.layers[0].self_attn.q_proj.weight
    model.train()
    model(torch.arange(7)[None], labels=torch.arange(7)[None]).loss.backward()
    assert q.grad is not None and q.grad.shape == q.shape
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(weights.layers[0].attention.w_qkv[: q.shape[0]], q.detach())


def test_reading_a_model_again_stacks_nothing_new():
    model = llama()
    first = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    own = storage_bytes(model.parameters())
    pointers = [p.data_ptr() for p in model.parameters()]
    second = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    assert [p.data_ptr() for p in model.parameters()] == pointers and storage_bytes(model.parameters()) == own
    for a, b in zip(first.layers, second.layers):
        assert b.attention.w_qkv.data_ptr() == a.attention.w_qkv.data_ptr()
        assert b.mlp.w_gate_up.data_ptr() == a.mlp.w_gate_up.data_ptr()
    new = storage_bytes([*model.parameters(), *runner_tensors(first), *runner_tensors(second)])
    assert new == storage_bytes([*model.parameters(), *runner_tensors(first)]) + storage_bytes(
        [t for layer in second.layers for t in (layer.attention.w_o_columns, layer.mlp.w_down_columns)])


def test_a_model_on_the_meta_device_reads_into_meta_views():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    shapes = [p.shape for p in model.parameters()]
    weights = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    assert [p.shape for p in model.parameters()] == shapes and all(p.is_meta for p in model.parameters())
    q, k, v = groups(model.model.layers[0])[0]
    assert (q.storage_offset(), k.storage_offset(), v.storage_offset()) == (0, 64 * 64, 64 * 64 + 16 * 64)
    assert weights.layers[0].attention.w_qkv.is_meta and weights.layers[0].attention.w_qkv.shape == (96, 64)
    DecoderWeights.from_hf(model, partial_layers=PARTIAL)  # and again


def test_a_tied_parameter_keeps_its_storage_and_its_group_is_copied():
    model = llama()
    layers = model.model.layers
    layers[1].self_attn.q_proj = layers[0].self_attn.q_proj  # one q_proj held by two layers
    expected = logits(model)
    tied = [[p.data_ptr() for p in groups(layers[i])[0]] for i in (0, 1)]
    weights = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    assert [[p.data_ptr() for p in groups(layers[i])[0]] for i in (0, 1)] == tied
    for i in (0, 1):
        assert torch.equal(weights.layers[i].attention.w_qkv, torch.cat(groups(layers[i])[0]))
        assert_rows_of(weights.layers[i].mlp.w_gate_up, groups(layers[i])[1])  # the untied group is shared
    assert_rows_of(weights.layers[2].attention.w_qkv, groups(layers[2])[0])
    assert torch.equal(logits(model), expected)


def test_the_model_saves_and_loads_as_transformers_wrote_it(tmp_path):
    model = llama()
    DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    state = model.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in loaded.state_dict().items())


def test_patching_a_read_model_shares_the_stacked_weights_too():
    model = llama()
    expected = logits(model)
    weights = DecoderWeights.from_hf(model, partial_layers=PARTIAL)
    apply_masked_kernels(model, backend="torch")
    for layer, held in zip(model.model.layers, weights.layers):
        assert layer.self_attn.qkv_weight.data_ptr() == held.attention.w_qkv.data_ptr()
        assert layer.mlp.gate_up_weight.data_ptr() == held.mlp.w_gate_up.data_ptr()
    torch.testing.assert_close(logits(model), expected)


def test_stack_rows_views_rows_that_lie_stacked_and_copies_the_rest():
    whole = torch.randn(10, 4)
    parts = [whole[:3], whole[3:5], whole[5:]]
    assert stacked_rows(parts).data_ptr() == whole.data_ptr() and torch.equal(stack_rows(parts), whole)
    for other in ([whole[:3], whole[5:]], [whole[3:5], whole[:3]], [whole[:, :2], whole[:, 2:]],
                  [whole[:3], whole[3:5].double()], [torch.randn(3, 4), torch.randn(2, 4)]):
        assert stacked_rows(other) is None
        assert stack_rows(other).data_ptr() not in [p.data_ptr() for p in other]
    assert stacked_rows([whole.to("meta")[:3], whole.to("meta")[3:]]) is None


def test_a_runner_over_a_read_model_equals_the_model():
    model = llama()
    expected = logits(model)
    runner = PlannedDecoder.from_hf(model, num_pages=64, page_size=4, backend="torch", partial_layers=PARTIAL)
    ids = torch.arange(11)[None] % CONFIG["vocab_size"]
    runner.admit("a", None, 11)
    out = runner.prefill(["a"], runner.weights.embed[ids], torch.ones_like(ids))
    torch.testing.assert_close(out[:, -1], expected[:, -1])
    assert torch.equal(logits(model), expected)
