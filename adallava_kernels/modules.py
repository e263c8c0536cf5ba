"""Drop-in ``nn.Module`` versions of the ops, driven by an ExecutionPlan layer.

Each holds its weights as the runtime does (q|k|v and gate|up stacked,
``o_proj`` and ``down_proj`` column-major) and builds, once per plan and
device, the planned attention or MLP the runtime's layers run
(:class:`~adallava_kernels.ops.masked_attention.AttentionProgram`,
:class:`~adallava_kernels.ops.masked_mlp.MlpProgram`), so a fix to a planned
layer lands in both.
"""

from __future__ import annotations

import torch
from torch import nn

from .kv_cache import KVCacheLayer, TransformersCacheLayer
from .ops.common import resolve_backend
from .ops.layout import prepare_column_gather, stack_rows
from .ops.masked_attention import AttentionProgram, AttentionWeights, check_padding, run_masked_attention
from .ops.masked_mlp import MlpProgram, MlpWeights
from .plan import ExecutionPlan, LayerPlan

__all__ = ["MaskedAttention", "MaskedMLP", "check_hf_attention", "check_hf_mlp"]


def _check_linears(module: nn.Module, names: tuple[str, ...], what: str) -> None:
    for name in names:
        linear = getattr(module, name, None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{what}.{name} must be an nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError(f"{what}.{name} has a bias; the masked ops compute bias-free projections")


def check_hf_mlp(mlp: nn.Module) -> None:
    """``mlp`` is a transformers ``LlamaMLP``: SwiGLU with SiLU, no biases."""
    _check_linears(mlp, ("gate_proj", "up_proj", "down_proj"), "mlp")
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        raise ValueError(f"mlp.act_fn must be SiLU, got {type(act).__name__}")


def check_hf_attention(attn: nn.Module) -> tuple[int, int, int]:
    """``attn`` is a transformers ``LlamaAttention`` (no biases, scaling ``head_dim ** -0.5``);
    returns its ``(num_heads, num_kv_heads, head_dim)``."""
    _check_linears(attn, ("q_proj", "k_proj", "v_proj", "o_proj"), "attn")
    config = getattr(attn, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError("attn must be a transformers LlamaAttention with a .config")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = attn.q_proj.weight.shape[0] // num_heads
    if getattr(attn, "head_dim", head_dim) != head_dim or abs(attn.scaling - head_dim**-0.5) > 1e-12:
        raise ValueError(f"attn must use head_dim {head_dim} and scaling head_dim ** -0.5, got {attn.scaling}")
    return num_heads, num_kv_heads, head_dim


def _keep_transformers_names(module: nn.Module, names: dict[str, dict[str, int]]) -> None:
    """Save and load the parameters ``names`` maps under transformers' names, row-major: a stacked one as
    its parts, split by rows (``qkv_weight`` -> ``{"q_proj.weight": q rows, "k_proj.weight": ...}``), a
    column-major copy as the weight it is. So a model patched with these modules still writes (and
    reads) checkpoints transformers loads, each weight once."""

    def to_transformers(module, state_dict, prefix, local_metadata):
        for ours, theirs in names.items():
            if prefix + ours not in state_dict:
                continue
            value = state_dict.pop(prefix + ours)
            if len(theirs) == 1:
                state_dict[prefix + next(iter(theirs))] = value.contiguous()
                continue
            # Clones: parts of one storage would be saved as one shared tensor, which safetensors refuses.
            for name, part in zip(theirs, value.split(list(theirs.values()))):
                state_dict[prefix + name] = part.clone()

    def from_transformers(module, state_dict, prefix, *args):
        for ours, theirs in names.items():
            if all(prefix + name in state_dict for name in theirs):
                parts = [state_dict.pop(prefix + name) for name in theirs]
                state_dict[prefix + ours] = parts[0] if len(parts) == 1 else torch.cat(parts)

    module.register_state_dict_post_hook(to_transformers)
    module.register_load_state_dict_pre_hook(from_transformers)


class _Programs:
    """A module's program for its current plan, built at first use and rebuilt when the plan, the
    backend's resolution or the weights (moved, or changed in place: a torch program of a partial plan
    holds a gathered copy) change."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._plan = self._key = self._program = None

    def get(self, plan, backend: str, weights: tuple[torch.Tensor, ...], build):
        """The program of ``plan`` (``build(plan, resolved backend)`` when there is none yet)."""
        resolved = resolve_backend(self._what, backend, weights[0].device, True)
        key = (resolved, tuple((w.data_ptr(), w.device, w._version) for w in weights))
        if self._program is None or plan is not self._plan or key != self._key:
            self._program, self._plan, self._key = build(plan, resolved), plan, key
        return self._program


def _check_layer_plan(layer: object) -> LayerPlan | None:
    """``layer`` if it is one layer's plan or ``None``, else ``TypeError`` naming it; a whole ``ExecutionPlan`` is
    the commonest mistake, so its message says which call gives a layer's."""
    if layer is None or isinstance(layer, LayerPlan):
        return layer
    if isinstance(layer, ExecutionPlan):
        raise TypeError("layer must be one layer's LayerPlan or None, got an ExecutionPlan (the whole model's): pass "
                        "plan.layer(i) for layer i, or patch every layer with apply_masked_kernels(model, plan=plan)")
    raise TypeError(f"layer must be one layer's LayerPlan (plan.layer(i)) or None, got {type(layer).__name__}")


class MaskedMLP(nn.Module):
    """A transformers ``LlamaMLP`` that computes only the neurons its layer plan keeps.

    Holds the weights as the runtime does: gate and up stacked (one copy made
    here, or none when they already lie stacked, as a runtime's
    ``DecoderWeights.from_hf`` leaves them), down as one column-major copy, so gathered columns are contiguous
    (``gather_layout=False`` keeps ``w_down`` as given instead, for a layer
    that always runs whole). Call :meth:`set_plan` once per request;
    ``forward(x)`` has ``LlamaMLP``'s signature, so the module can replace
    one. Its state dict uses ``LlamaMLP``'s names (``gate_proj.weight``,
    ...), row-major.
    """

    def __init__(
        self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
        backend: str = "auto", gather_layout: bool = True,
    ):
        super().__init__()
        intermediate = w_gate.shape[0]
        self.gate_up_weight = nn.Parameter(stack_rows([w_gate, w_up]), requires_grad=False)
        self.down_weight = nn.Parameter(prepare_column_gather(w_down) if gather_layout else w_down, requires_grad=False)
        self.backend = backend
        self.intermediate_size = intermediate
        # The index of a full plan, kept so an unplanned forward allocates nothing.
        self.register_buffer(
            "all_neurons", torch.arange(intermediate, dtype=torch.int32, device=w_gate.device), persistent=False
        )
        self._neurons: torch.Tensor | None = None
        self._programs = _Programs("MaskedMLP")
        _keep_transformers_names(self, {
            "gate_up_weight": {"gate_proj.weight": intermediate, "up_proj.weight": intermediate},
            "down_weight": {"down_proj.weight": intermediate},
        })

    @classmethod
    def from_hf(cls, mlp: nn.Module, *, backend: str = "auto", gather_layout: bool = True) -> "MaskedMLP":
        """Wrap a transformers ``LlamaMLP`` (SwiGLU with SiLU, no biases)."""
        check_hf_mlp(mlp)
        weights = (mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data)
        return cls(*weights, backend=backend, gather_layout=gather_layout)

    def set_plan(self, layer: LayerPlan | None) -> None:
        """Run the neurons of ``layer`` from now on (``None``: all of them).

        The plan must be for a model with this MLP's neurons (checked on the
        host: no device value is read). A plan on another device is copied
        here once; build it with ``plan.layer(i, device)`` to avoid that.
        """
        _check_layer_plan(layer)
        if layer is not None and layer.model_neurons != self.intermediate_size:
            raise ValueError(
                f"layer plan {layer.index} is for a model with {layer.describe_model()}, "
                f"but this MLP has {self.intermediate_size} neurons"
            )
        self._neurons = None if layer is None else layer.to(self.gate_up_weight.device).neurons

    def _program(self, neurons: torch.Tensor, backend: str) -> MlpProgram:
        return MlpProgram(MlpWeights(self.gate_up_weight, self.down_weight, self.down_weight), neurons, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neurons = self.all_neurons if self._neurons is None else self._neurons
        weights = (self.gate_up_weight, self.down_weight)
        return self._programs.get(neurons, self.backend, weights, self._program)(x)


def padding_from_mask(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """The ``[batch, kv_len]`` padding mask inside the mask a transformers decoder passes its attention.

    transformers passes ``None`` (causal, no padding), the 2-D padding mask,
    or a 4-D ``[batch, 1, q_len, kv_len]`` mask (bool: True attends; float:
    0 attends) that combines causal and padding masking. The last query row
    sees every position that is not padding, so it is the padding mask.
    Masks other than causal-plus-padding (sliding windows, prefix-LM) are
    not supported.
    """
    if mask is None or mask.dim() == 2:
        return mask
    if mask.dim() != 4 or mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask must be None, [batch, {kv_len}] or [batch, 1, q_len, {kv_len}], got {list(mask.shape)}"
        )
    last_row = mask[:, 0, -1, :]
    keep = last_row if last_row.dtype == torch.bool else last_row == 0
    return keep.expand(batch, kv_len)



# What a transformers Llama decoder layer passes its attention besides the hidden states, the rotary
# tables, the mask and the cache, and that the masked attention does not need: positions arrive as
# ``position_embeddings``, and the cache is always written when one is given.
_UNUSED_LAYER_KEYWORDS = frozenset({"position_ids", "use_cache", "cache_position"})


def _one_cache(cache, past_key_values):
    """The KV cache a decoder layer passed: ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("MaskedAttention got two different caches, cache= and past_key_values=; pass one")
    return cache if cache is not None else past_key_values


def _check_layer_keywords(kwargs: dict) -> None:
    """Refuse every keyword the masked attention would otherwise drop: a cache under a name it does not
    know would decode with no cache, silently; packed-sequence or attention-output options would be ignored."""
    unknown = sorted(set(kwargs) - _UNUSED_LAYER_KEYWORDS)
    if unknown:
        raise TypeError(
            f"MaskedAttention.forward got keyword arguments it does not support: {unknown}; it takes "
            "hidden_states, position_embeddings, attention_mask, cache= (or past_key_values=), "
            f"and ignores {sorted(_UNUSED_LAYER_KEYWORDS)}"
        )

class MaskedAttention(nn.Module):
    """A transformers ``LlamaAttention`` that computes only the heads its layer plan keeps.

    Holds the weights as the runtime does: q, k and v stacked (one copy made
    here, or none when they already lie stacked, as a runtime's
    ``DecoderWeights.from_hf`` leaves them), ``o_proj`` as one column-major copy, so its gathered columns are
    contiguous (``gather_layout=False`` keeps it as given instead). Call
    :meth:`set_plan` once per request. ``forward`` takes ``LlamaAttention``'s
    arguments and returns ``(output, None)``, so the module can replace one
    inside a transformers decoder layer; with a transformers ``Cache`` it
    stores only the active KV heads of this layer. Its state dict uses
    ``LlamaAttention``'s names (``q_proj.weight``, ...), row-major.
    """

    def __init__(
        self, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *,
        num_heads: int, num_kv_heads: int, layer_idx: int | None = None, backend: str = "auto",
        gather_layout: bool = True,
    ):
        super().__init__()
        if w_q.shape[0] % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"w_q has {w_q.shape[0]} rows, which is not num_heads ({num_heads}) heads, "
                f"or num_heads is not a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.qkv_weight = nn.Parameter(stack_rows([w_q, w_k, w_v]), requires_grad=False)
        self.o_weight = nn.Parameter(prepare_column_gather(w_o) if gather_layout else w_o, requires_grad=False)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = w_q.shape[0] // num_heads
        self.layer_idx = layer_idx
        self.backend = backend
        heads = torch.arange(num_heads, dtype=torch.int32, device=w_q.device)
        self._full = LayerPlan.for_heads(
            heads, torch.arange(num_kv_heads, dtype=torch.int32, device=w_q.device), heads // (num_heads // num_kv_heads),
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=self.head_dim,
        )
        self._plan: LayerPlan | None = None
        self._programs = _Programs("MaskedAttention")
        _keep_transformers_names(self, {
            "qkv_weight": {"q_proj.weight": w_q.shape[0], "k_proj.weight": w_k.shape[0], "v_proj.weight": w_v.shape[0]},
            "o_weight": {"o_proj.weight": w_o.shape[0]},
        })

    @classmethod
    def from_hf(cls, attn: nn.Module, *, backend: str = "auto", gather_layout: bool = True) -> "MaskedAttention":
        """Wrap a transformers ``LlamaAttention`` (no biases, scaling ``head_dim ** -0.5``)."""
        num_heads, num_kv_heads, _ = check_hf_attention(attn)
        weights = (attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data, attn.o_proj.weight.data)
        return cls(*weights, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   layer_idx=getattr(attn, "layer_idx", None), backend=backend, gather_layout=gather_layout)

    def set_plan(self, layer: LayerPlan | None) -> None:
        """Run the heads of ``layer`` from now on (``None``: all of them).

        The plan must be for a model with this attention's heads, KV heads and
        head size (checked on the host: no device value is read). A plan on
        another device is copied here once; build it with
        ``plan.layer(i, device)`` to avoid that.
        """
        if _check_layer_plan(layer) is None:
            self._plan = None
            return
        mine = (self.num_heads, self.num_kv_heads, self.head_dim)
        if (layer.model_heads, layer.model_kv_heads, layer.head_dim) != mine:
            raise ValueError(
                f"layer plan {layer.index} is for a model with {layer.describe_model()}, but this attention has "
                f"{self.num_heads} heads over {self.num_kv_heads} KV heads of dim {self.head_dim}"
            )
        self._plan = layer.to(self.qkv_weight.device)

    def _program(self, plan: LayerPlan, backend: str) -> AttentionProgram:
        weights = AttentionWeights(self.qkv_weight, self.o_weight, self.o_weight, self.num_heads, self.num_kv_heads,
                                   self.head_dim)
        return AttentionProgram(weights, plan.to(self.qkv_weight.device), backend)

    def _cache_layer(self, cache) -> KVCacheLayer | None:
        if cache is None or isinstance(cache, KVCacheLayer):
            return cache
        if self.layer_idx is None:
            raise ValueError("a transformers Cache needs the layer index: build with from_hf or pass layer_idx")
        return TransformersCacheLayer(cache, self.layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cos, sin = position_embeddings
        cache = self._cache_layer(_one_cache(cache, past_key_values))
        _check_layer_keywords(kwargs)
        batch, seq = hidden_states.shape[:2]
        kv_len = seq + (0 if cache is None else cache.length)
        padding = check_padding(padding_from_mask(attention_mask, batch, kv_len), batch, kv_len, hidden_states.device)
        plan = self._full if self._plan is None else self._plan
        program = self._programs.get(plan, self.backend, (self.qkv_weight, self.o_weight), self._program)
        out = run_masked_attention(hidden_states, program, cos, sin, attention_mask=padding, kv_cache=cache)
        return out, None
