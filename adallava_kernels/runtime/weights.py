"""A transformers Llama decoder's weights, in the layout the runtime's kernels read.

Made once per model (not per plan or per request):

- ``w_qkv``: ``q_proj``, ``k_proj`` and ``v_proj`` stacked ``[(heads + 2 kv_heads) * head_dim, hidden]``,
  so a layer projects q, k and v in one matmul, or (for a plan's heads) one
  gathered launch;
- ``w_gate_up``: ``gate_proj`` and ``up_proj`` stacked ``[2 * intermediate, hidden]``;
- ``w_o_columns`` / ``w_down_columns``: column-major copies of ``o_proj`` and
  ``down_proj`` for the layers a plan may switch partly off, so the
  gathered columns of the Triton kernels are contiguous.

The weights are held once: the model's q/k/v and gate/up parameters become
views of the runner's stacked tensors (each ``Parameter`` stays the same
object, with its ``requires_grad``; its ``.data`` is now its rows of the
stacked tensor), so the model runs as before, bit for bit, and an in-place
change to either is seen by both. Norms, embedding, ``lm_head``, ``o_proj``,
``down_proj`` and the rotary module are the model's own tensors. Only the
column-major copies are new memory: for LLaVA-1.5-7B in bf16 with its 16
switchable layers, 16 x (4096 x 4096 + 4096 x 11008) x 2 bytes = 2.0 GB, the
price of a plan-independent layout made once.

Reading a model whose parameters already are such views (a second runner, a
runtime rebuilt after training) stacks nothing again: the existing stacked
storage is viewed. A parameter the model holds in more than one place (tied)
keeps its own storage, and its group's rows are copied as before. On the
meta device nothing is allocated either way; the parameters become views of
a new meta tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..modules import check_hf_attention, check_hf_mlp
from ..ops.layout import prepare_column_gather, stack_rows
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
        (default all); only they get the column-major copies.

        The model's q/k/v and gate/up parameters become views of the runner's stacked tensors (see the
        module's docstring), so beyond the model's own weights only the column-major copies are new;
        reading the same model again reuses the stacked tensors."""
        decoder, head = _decoder_and_head(model, lm_head)
        config = decoder.config
        shape = ModelShape.from_hf_config(config)
        partial = set(range(shape.num_layers) if partial_layers is None else partial_layers)
        bad = sorted(i for i in partial if not 0 <= i < shape.num_layers)
        if bad:
            raise ValueError(f"partial_layers must be layer indices in [0, {shape.num_layers}), got {bad}")
        held = _times_held(model, head)
        with torch.no_grad():
            layers = [_layer_weights(layer, i in partial, held) for i, layer in enumerate(decoder.layers)]
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


def _times_held(model: nn.Module, head: nn.Module) -> Counter:
    """How many times each parameter is registered in ``model`` (and a separate ``head``), by ``id``: a
    parameter held twice is tied, and stays as it is."""
    modules = [model] if any(m is head for m in model.modules()) else [model, head]
    return Counter(id(p) for m in modules for _, p in m.named_parameters(remove_duplicate=False))


def _held_once(params: list[torch.Tensor], held: Counter) -> torch.Tensor:
    """``params`` (a layer's q, k, v or gate, up weights) stacked by rows into one tensor, which they then
    view: each parameter's ``.data`` becomes its rows of it, so the model and the runtime hold them once.

    When they already lie stacked (a model read before) the stacked storage is reused and nothing moves.
    Parameters that could not all be views of one tensor, being tied (registered twice) or of
    different dtypes or devices, are copied and left as they are.
    """
    stacked = stack_rows([p.detach() for p in params])
    first = params[0]
    if any(held[id(p)] != 1 or p.dtype != first.dtype or p.device != first.device for p in params):
        return stacked
    start = 0
    for p in params:
        p.data = stacked[start:start + p.shape[0]]  # the same Parameter, requires_grad kept, over new storage
        start += p.shape[0]
    return stacked


def _layer_weights(layer: nn.Module, partial: bool, held: Counter) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    check_hf_mlp(mlp)
    eps = float(layer.input_layernorm.variance_epsilon)
    if float(layer.post_attention_layernorm.variance_epsilon) != eps:
        raise ValueError("the two RMSNorms of a decoder layer must share their epsilon")
    w_o, w_down = attn.o_proj.weight.detach(), mlp.down_proj.weight.detach()
    num_heads, num_kv_heads, head_dim = check_hf_attention(attn)
    w_qkv = _held_once([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], held)
    w_gate_up = _held_once([mlp.gate_proj.weight, mlp.up_proj.weight], held)
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        eps=eps,
        attention=AttentionWeights(w_qkv, w_o, prepare_column_gather(w_o) if partial else None,
                                   num_heads, num_kv_heads, head_dim),
        mlp=MlpWeights(w_gate_up=w_gate_up, w_down=w_down,
                       w_down_columns=prepare_column_gather(w_down) if partial else None),
    )
