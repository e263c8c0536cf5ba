"""Patch one transformers Llama or Llava model instance with the masked modules.

    model = LlamaForCausalLM.from_pretrained(...)
    apply_masked_kernels(model)                 # every decoder layer: MaskedAttention, MaskedMLP
    apply_masked_kernels(model, plan=plan)      # and run this ExecutionPlan's heads and neurons

Only the instance passed in changes (its decoder layers' ``self_attn`` and ``mlp``); no class, function
or module of torch or transformers is replaced, so other models in the process are untouched.
"""

from __future__ import annotations

from torch import nn

from .modules import MaskedAttention, MaskedMLP, check_hf_attention, check_hf_mlp
from .ops.common import BACKENDS
from .plan import ExecutionPlan, check_execution_plan
from .shape import ModelShape

__all__ = ["apply_masked_kernels", "decoder_layers"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The Llama decoder layers of ``model`` (a Llama or Llava model of transformers), in order."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a transformers Llama or Llava model, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    if not layers:
        raise ValueError(f"model must be a transformers Llama or Llava model; {type(model).__name__} has no LlamaDecoderLayer")
    return layers


def apply_masked_kernels(
    model: nn.Module, *, plan: ExecutionPlan | None = None, backend: str = "auto", gather_layout: bool = True,
) -> nn.Module:
    """Replace the attention and MLP of every decoder layer of ``model`` with ``MaskedAttention`` and
    ``MaskedMLP`` over the same weights (q|k|v and gate|up stacked, each copy replacing the layer's
    original); return ``model``.

    Args:
        model: a transformers Llama (``LlamaForCausalLM``, ``LlamaModel``) or Llava
            (``LlavaForConditionalGeneration``) instance; layers patched before are left as they are.
        plan: an :class:`ExecutionPlan` for this model's shape to install (``set_plan`` per layer);
            ``None`` runs every head and neuron until ``set_plan`` is called on a layer's modules.
        backend: the modules' backend, ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_layout: hold ``o_proj`` and ``down_proj`` as column-major copies (made once,
            replacing the originals), so gathered columns are contiguous.

    The patched model still saves with ``save_pretrained`` under transformers' names (each weight
    once, row-major), so transformers loads the checkpoint as it was.
    """
    layers = decoder_layers(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if check_execution_plan("plan", plan, optional=True) is not None:
        config = getattr(model, "config", None)
        plan.check_shape(ModelShape.from_hf_config(config) if config is not None else plan.shape)
        if plan.shape.num_layers != len(layers):
            raise ValueError(f"plan has {plan.shape.num_layers} layers, but model has {len(layers)} decoder layers")
    for i, layer in enumerate(layers):
        if not isinstance(layer.self_attn, MaskedAttention):
            check_hf_attention(layer.self_attn)
            layer.self_attn = MaskedAttention.from_hf(layer.self_attn, backend=backend, gather_layout=gather_layout)
        if not isinstance(layer.mlp, MaskedMLP):
            check_hf_mlp(layer.mlp)
            layer.mlp = MaskedMLP.from_hf(layer.mlp, backend=backend, gather_layout=gather_layout)
        if plan is not None:
            device = layer.self_attn.qkv_weight.device
            layer.self_attn.set_plan(plan.layer(i, device))
            layer.mlp.set_plan(plan.layer(i, device))
    return model
