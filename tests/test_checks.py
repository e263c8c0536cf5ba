"""Checks at the library's boundary: device strings, counts, KV byte accounting and the messages that
name the argument at fault."""

import importlib

import pytest
import torch

from adallava_kernels import ContiguousKVCache, ExecutionPlan, LayerSkipKVCache, cost, get_shape, masked_attention
from adallava_kernels import checks
from adallava_kernels.kv_cache import layers as kv_layers, pool as kv_pool

attention_module = importlib.import_module("adallava_kernels.ops.masked_attention")

TINY = get_shape("tiny")  # 4 layers, 8 heads over 2 KV heads of 24

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")


def device_takers():
    plan = ExecutionPlan.full(TINY)
    return {
        "LayerSkipKVCache": lambda d: LayerSkipKVCache(TINY, num_pages=4, page_size=4, dtype=torch.float32, device=d),
        "ContiguousKVCache": lambda d: ContiguousKVCache(1, 2, 24, 8, dtype=torch.float32, device=d),
        "ExecutionPlan.layer": lambda d: plan.layer(0, device=d),
        "ExecutionPlan.layers": lambda d: plan.layers(d),
        "LayerPlan.to": lambda d: plan.layer(0).to(d),
    }


@pytest.mark.parametrize("taker", sorted(device_takers()))
def test_a_device_string_torch_cannot_parse_is_a_value_error(taker):
    with pytest.raises(ValueError, match=r"device must be a device such as 'cpu' or 'cuda:0', got 'gpu'"):
        device_takers()[taker]("gpu")


@NO_CUDA
@pytest.mark.parametrize("taker", sorted(device_takers()))
def test_cuda_without_cuda_is_a_value_error(taker):
    for device in ("cuda", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match=r"device is .*cuda.*, but CUDA is not available here; use 'cpu'"):
            device_takers()[taker](device)


def test_check_device_accepts_what_torch_allocates_on():
    assert checks.check_device("device", "cpu") == torch.device("cpu")
    assert checks.check_device("device", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device must be a device string or torch.device, got int"):
        checks.check_device("device", 0)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"this machine has {count} CUDA device"):
            checks.check_device("device", f"cuda:{count}")


def test_count_checks_are_one_function():
    assert cost.check_int is kv_pool.check_int is kv_layers.check_int is attention_module.check_int is checks.check_int
    for value in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=rf"page_size must be an int >= 1, got {value!r}"):
            cost.kv_cache_bytes(TINY, 3, page_size=value)
    with pytest.raises(ValueError, match=r"num_pages must be an int >= 1, got 0"):
        LayerSkipKVCache(TINY, num_pages=0)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        x = torch.randn(1, 2, 8)
        masked_attention(x, torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8),
                         torch.tensor([0], dtype=torch.int32), torch.ones(1, 2, 4), torch.zeros(1, 2, 4),
                         num_heads=0, num_kv_heads=1)


# ------------------------------------------------------------------------------- KV bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pool_bytes_equal_the_cost_model_at_the_pools_dtype(dtype):
    plan = ExecutionPlan.from_layer_mask([1, 1, 0, 1], TINY)
    pool = LayerSkipKVCache(TINY, num_pages=256, page_size=16, dtype=dtype)
    pool.add_sequence("a", plan, max_tokens=100)
    for layer in (0, 1, 3):
        k = torch.randn(2, 70, 24, dtype=dtype)
        pool.append("a", layer, k, k)
    assert pool.bytes_in_use == cost.kv_cache_bytes(TINY, 70, plan, page_size=16, dtype=dtype)
    assert cost.kv_cache_bytes(TINY, 70, plan, page_size=16, kv_bytes=dtype.itemsize) == pool.bytes_in_use


def test_kv_cache_bytes_defaults_to_the_pools_default_dtype():
    assert LayerSkipKVCache(TINY, num_pages=1).pages.dtype == torch.bfloat16
    assert cost.kv_cache_bytes(TINY, 10) == cost.kv_cache_bytes(TINY, 10, dtype=torch.bfloat16)


@pytest.mark.parametrize("kwargs, match", [
    ({"kv_bytes": 4, "dtype": torch.float32}, r"pass kv_bytes or dtype, not both"),
    ({"kv_bytes": 0}, r"kv_bytes must be a positive number, got 0"),
    ({"dtype": "float32"}, r"dtype must be a torch.dtype, got str"),
])
def test_kv_cache_bytes_checks_the_element_size(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cost.kv_cache_bytes(TINY, 10, **kwargs)


# ---------------------------------------------------------------------- masked_attention


def _attention_args(hidden=48, batch=1, seq=5):
    g = torch.Generator().manual_seed(0)
    w_q, w_k, w_v, w_o = (torch.randn(48, 48, generator=g) * 0.1 for _ in range(4))
    return dict(x=torch.randn(batch, seq, hidden, generator=g), w_q=w_q, w_k=w_k, w_v=w_v, w_o=w_o,
                active_heads=torch.tensor([0, 1], dtype=torch.int32), cos=torch.ones(batch, seq, 24),
                sin=torch.zeros(batch, seq, 24), num_heads=2, num_kv_heads=2)


def test_x_of_the_wrong_hidden_size_is_blamed_on_x():
    args = _attention_args(hidden=40)
    with pytest.raises(ValueError, match=r"x must have the weights' hidden size 48 in its last dim .*got shape \[1, 5, 40\]"):
        masked_attention(**args)
    args = _attention_args()
    args["w_q"] = args["w_q"][:, :40]  # the weights disagree: the odd weight is blamed
    with pytest.raises(ValueError, match=r"w_q must have shape"):
        masked_attention(**args)


def test_rotary_shape_message_reads_for_batch_one():
    args = _attention_args()
    args["cos"] = torch.ones(1, 4, 24)
    with pytest.raises(ValueError, match=r"cos must have shape \[1, 5, 24\] \(\[batch, seq, head_dim\]"):
        masked_attention(**args)
