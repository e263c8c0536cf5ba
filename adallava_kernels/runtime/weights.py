"""A transformers Llama decoder's weights, in the layout the runtime's kernels read.

Made once per model (not per plan or per request):

- ``w_qkv``: ``q_proj``, ``k_proj`` and ``v_proj`` stacked ``[(heads + 2 kv_heads) * head_dim, hidden]``,
  so a layer projects q, k and v in one matmul, or (for a plan's heads) one
  gathered launch;
- ``w_gate_up``: ``gate_proj`` and ``up_proj`` stacked ``[2 * intermediate, hidden]``;
- ``w_o_columns`` / ``w_down_columns``: column-major copies of ``o_proj`` and
  ``down_proj`` for the layers a plan may switch partly off, so the
  gathered columns of the Triton kernels are contiguous.

Norms, embedding, ``lm_head`` and the rotary module are shared with the
source model. The stacked and column-major copies are new memory (for
LLaVA-1.5-7B in bf16: 9.0 GB stacked plus 2.0 GB column-major for its 16
switchable layers), the price of a plan-independent layout made once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..modules import check_hf_attention, check_hf_mlp
from ..ops.layout import prepare_column_gather
from ..ops.masked_attention import AttentionWeights
from ..ops.masked_mlp import MlpWeights
from ..shape import ModelShape

__all__ = ["LayerWeights", "DecoderWeights"]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    attention: AttentionWeights
    mlp: MlpWeights


@dataclass
class DecoderWeights:
    """Every weight a planned forward reads, with the model's shape."""

    shape: ModelShape
    embed: torch.Tensor
    norm: torch.Tensor
    norm_eps: float
    lm_head: torch.Tensor
    rotary: nn.Module
    layers: list[LayerWeights]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def partial_layers(self) -> frozenset[int]:
        """The layers prepared for partial plans (with the column-major ``o_proj``/``down_proj`` copies)."""
        return frozenset(i for i, layer in enumerate(self.layers)
                         if layer.attention.w_o_columns is not None and layer.mlp.w_down_columns is not None)

    @classmethod
    def from_hf(cls, model: nn.Module, *, lm_head: nn.Module | None = None,
                partial_layers: Iterable[int] | None = None) -> "DecoderWeights":
        """Read a transformers ``LlamaForCausalLM``, ``LlavaForConditionalGeneration`` or ``LlamaModel``
        (with ``lm_head``). ``partial_layers``: the layers a plan may run with some heads or neurons off
        (default all); only they get the column-major copies."""
        decoder, head = _decoder_and_head(model, lm_head)
        config = decoder.config
        shape = ModelShape.from_hf_config(config)
        partial = set(range(shape.num_layers) if partial_layers is None else partial_layers)
        bad = sorted(i for i in partial if not 0 <= i < shape.num_layers)
        if bad:
            raise ValueError(f"partial_layers must be layer indices in [0, {shape.num_layers}), got {bad}")
        with torch.no_grad():
            layers = [_layer_weights(layer, i in partial) for i, layer in enumerate(decoder.layers)]
        return cls(
            shape=shape, embed=decoder.embed_tokens.weight.detach(), norm=decoder.norm.weight.detach(),
            norm_eps=float(decoder.norm.variance_epsilon), lm_head=head.weight.detach(), rotary=decoder.rotary_emb,
            layers=layers,
        )


def _decoder_and_head(model: nn.Module, lm_head: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    """The ``LlamaModel`` and the ``lm_head`` of ``model``."""
    inner = getattr(model, "model", None)
    decoder = getattr(inner, "language_model", None) or inner or model  # Llava, CausalLM, or the decoder itself
    head = lm_head if lm_head is not None else getattr(model, "lm_head", None)
    for name in ("layers", "embed_tokens", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            raise ValueError(
                f"model must be a transformers LlamaForCausalLM, LlavaForConditionalGeneration or LlamaModel; "
                f"{type(model).__name__} has no decoder with .{name}"
            )
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError("model needs a bias-free lm_head nn.Linear (pass lm_head= with a bare LlamaModel)")
    return decoder, head


def _layer_weights(layer: nn.Module, partial: bool) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    check_hf_mlp(mlp)
    eps = float(layer.input_layernorm.variance_epsilon)
    if float(layer.post_attention_layernorm.variance_epsilon) != eps:
        raise ValueError("the two RMSNorms of a decoder layer must share their epsilon")
    w_o, w_down = attn.o_proj.weight.detach(), mlp.down_proj.weight.detach()
    num_heads, num_kv_heads, _ = check_hf_attention(attn)
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        eps=eps,
        attention=AttentionWeights.stack(
            attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach(), w_o,
            num_heads=num_heads, num_kv_heads=num_kv_heads,
            w_o_columns=prepare_column_gather(w_o) if partial else None),
        mlp=MlpWeights(
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), w_down=w_down,
            w_down_columns=prepare_column_gather(w_down) if partial else None),
    )
