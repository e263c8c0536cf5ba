import pytest
from transformers import LlamaConfig, LlavaConfig

from adallava_kernels import PRESETS, ModelShape, get_shape


def test_presets_match_llava_1_5():
    s7, s13 = get_shape("llava-7b"), get_shape("llava-13b")
    assert (s7.hidden_size, s7.num_layers, s7.num_heads, s7.num_kv_heads, s7.head_dim, s7.intermediate_size) == (
        4096, 32, 32, 32, 128, 11008,
    )
    assert (s13.hidden_size, s13.num_layers, s13.num_heads, s13.head_dim, s13.intermediate_size) == (
        5120, 40, 40, 128, 13824,
    )


def test_from_llama_config():
    cfg = LlamaConfig(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=200, vocab_size=50,
    )
    assert ModelShape.from_hf_config(cfg) == ModelShape(96, 3, 4, 2, 24, 200, 50)


def test_from_llava_config_uses_text_config():
    text = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=120, vocab_size=77,
    )
    cfg = LlavaConfig(text_config=text.to_dict())
    assert ModelShape.from_hf_config(cfg) == ModelShape(64, 2, 4, 4, 16, 120, 77)


def test_from_hf_config_rejects_other_configs():
    with pytest.raises(ValueError, match="not a Llama-family config"):
        ModelShape.from_hf_config(object())


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("num_heads", -1), ("head_dim", 2.0)])
def test_rejects_non_positive_dims(field, value):
    kwargs = PRESETS["tiny"].to_dict() | {field: value}
    with pytest.raises(ValueError, match=field):
        ModelShape(**kwargs)


def test_rejects_heads_not_multiple_of_kv_heads():
    kwargs = PRESETS["tiny"].to_dict() | {"num_heads": 5, "num_kv_heads": 2}
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelShape(**kwargs)


def test_dict_round_trip_and_unknown_keys():
    shape = get_shape("tiny")
    assert ModelShape.from_dict(shape.to_dict()) == shape
    with pytest.raises(ValueError, match="unknown keys"):
        ModelShape.from_dict(shape.to_dict() | {"bogus": 1})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model"):
        get_shape("llava-70b")
