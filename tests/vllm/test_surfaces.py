"""The vLLM interfaces the plug-in relies on, checked by name: a vLLM release that moves one fails here,
naming it, before any engine test runs. The one private surface is ``query_start_loc`` on the attention
metadata (adallava_kernels/vllm/batch_map.py)."""

import dataclasses
import importlib.metadata as md
import inspect

import pytest

from adallava_kernels.vllm import ARCHITECTURE, MODEL_CLASS, PLANS_PROCESSOR, TESTED_VLLM, register

vllm = pytest.importorskip("vllm")


def test_the_vllm_release_is_one_the_plug_in_was_tested_with():
    major_minor = tuple(int(x) for x in vllm.__version__.split(".")[:2])
    assert major_minor in TESTED_VLLM, f"vLLM {vllm.__version__}: the plug-in was tested with {TESTED_VLLM}"


def test_the_entry_point_registers_the_architecture():
    names = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert names.get("adallava") == "adallava_kernels.vllm:register"
    register()
    from vllm import ModelRegistry

    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert MODEL_CLASS.endswith(":AdaLlavaLlamaForCausalLM")


def test_the_logits_processor_interface_carries_the_batch_updates():
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    assert {f.name for f in dataclasses.fields(BatchUpdate)} >= {"batch_size", "removed", "added", "moved"}
    assert {"validate_params", "update_state", "apply", "is_argmax_invariant"} <= set(dir(LogitsProcessor))
    assert {m.name for m in MoveDirectionality} == {"UNIDIRECTIONAL", "SWAP"}
    module, name = PLANS_PROCESSOR.split(":")
    assert issubclass(getattr(__import__(module, fromlist=[name]), name), LogitsProcessor)


@pytest.mark.parametrize("module, name", [("cpu_attn", "CPUAttentionMetadata"),
                                          ("flash_attn", "FlashAttentionMetadata"),
                                          ("triton_attn", "TritonAttentionMetadata")])
def test_the_forward_context_carries_query_start_loc(module, name):
    """The CPU backend's metadata, and the GPU backends' whose decode steps batch_map reads from host ints."""
    import importlib

    from vllm.forward_context import get_forward_context, is_forward_context_available  # noqa: F401

    metadata = getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name)
    assert {"query_start_loc", "max_query_len", "num_actual_tokens"} <= {f.name for f in dataclasses.fields(metadata)}


def test_the_attention_layer_takes_flat_query_key_value():
    from vllm.model_executor.layers.attention import Attention

    params = list(inspect.signature(Attention.forward).parameters)
    assert params[1:4] == ["query", "key", "value"]
    init = inspect.signature(Attention.__init__).parameters
    assert {"num_heads", "head_size", "scale", "num_kv_heads", "cache_config", "prefix"} <= set(init)


def test_the_cache_config_says_whether_prefix_caching_is_on():
    """The model refuses prefix caching by reading this field: were it renamed, the refusal would go quiet."""
    from vllm.config import CacheConfig

    assert "enable_prefix_caching" in {f.name for f in dataclasses.fields(CacheConfig)}


def test_the_parallel_config_names_each_model_parallel_size_the_model_refuses():
    """The model refuses tensor, pipeline and context parallelism by reading these fields: were one renamed,
    its refusal would go quiet."""
    from vllm.config import ParallelConfig

    from adallava_kernels.vllm.model import MODEL_PARALLEL_SIZES

    assert set(MODEL_PARALLEL_SIZES) <= {f.name for f in dataclasses.fields(ParallelConfig)}


def test_the_compilation_config_says_whether_cuda_graphs_are_captured():
    """The model refuses CUDA graphs by reading this field (its NONE member: no graphs)."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    assert "cudagraph_mode" in {f.name for f in dataclasses.fields(CompilationConfig)}
    assert CUDAGraphMode.NONE.name == "NONE"
