"""AdaLlavaLlamaForCausalLM: a Llama decoder for vLLM whose every request runs its own plan.

The weights are the checkpoint's Llama decoder (a ``LlamaForCausalLM``, or the language model of a
llava-hf LLaVA checkpoint: its vision tower and projector are not loaded). vLLM keeps its own KV
cache, scheduler and attention backend: each layer's attention is vLLM's ``Attention`` over every
head.

A forward pass over vLLM's flattened batch (prefill chunks and decode tokens of many requests) runs
each layer once for all its tokens, the plans as data: the step's distinct plans give per-token
masks of query heads and MLP neurons (a token takes its row's plan, :mod:`.batch_map` and
:mod:`.rows`), and the layer reads only the union of the units the step's plans keep:

- a layer no token's plan runs is skipped (no projection, no attention call, no K/V written);
- attention: the q/k/v projections read only the rows of the union's query heads and their KV heads
  (the other heads' q, k and v are zeros); vLLM's attention runs over every head (the KV cache is
  vLLM's, laid out for all heads); ``o_proj`` reads only the columns of the union's heads, each
  token's heads outside its plan masked to zero;
- MLP: ``gate_proj``/``up_proj`` rows and ``down_proj`` columns of the union's neurons only, each
  token's neurons outside its plan masked to zero;
- a layer every token runs whole runs dense, with no mask; one whose union is every unit (but not every
  token's) runs the dense weights with each token's mask, no gather;
- the union's gathers are the library's Triton kernels on CUDA (``ADALLAVA_VLLM_BACKEND``), PyTorch ops
  elsewhere.

vLLM's prefix caching must be off: requests of different plans compute different K/V for the same
prompt (every layer after a plan's first switched-off unit), so a prefix cached by one would be wrong
for the other. So must its CUDA graphs (``enforce_eager=True``): a step picks each layer's work on the
host from its rows' plans, which a graph captured once would replay for every batch. The model refuses
to load under either (:func:`check_engine_config`), and under tensor, pipeline or context parallelism,
which it does not implement (every weight is whole on one device).

A token whose plan skips a unit adds exactly zero for it, so each request computes what the plan
runtime (:class:`~adallava_kernels.runtime.PlannedDecoder`) computes for it alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..plan import ExecutionPlan
from ..shape import ModelShape
from .batch_map import row_starts
from .rows import rows_of, serve_shape
from .scheduler import load_planner
from .step import BatchPlans, StepPlans

__all__ = ["AdaLlavaLlamaForCausalLM", "StepPlans", "check_engine_config"]

logger = logging.getLogger(__name__)

_SKIP_KEYS = ("vision_tower", "multi_modal_projector", "rotary_emb", "latency_encoder", "scheduler.")
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                        r"down_proj)\.weight$")
_NORM_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_TOP_KEY = re.compile(r"(?:^|\.)(embed_tokens|norm|lm_head)\.weight$")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, scaled in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# vLLM's ways of splitting one model over devices. The model holds every head, neuron and layer on one device
# (its union gathers index whole weights), so each must be 1; data parallelism (whole engines) is fine.
MODEL_PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size", "prefill_context_parallel_size",
                        "decode_context_parallel_size")


def check_engine_config(vllm_config) -> None:
    """Refuse the engine settings under which requests would silently get another plan's tokens, and the
    model parallelism the model does not implement."""
    name = "AdaLlavaLlamaForCausalLM"
    parallel = getattr(vllm_config, "parallel_config", None)
    for size in MODEL_PARALLEL_SIZES:
        value = getattr(parallel, size, 1)
        if value not in (None, 1):
            raise ValueError(f"{name} runs whole on one device: {size} must be 1, got {value}; serve more "
                             "devices with data parallelism (data_parallel_size), an engine per device")
    if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        raise ValueError(f"{name} needs vLLM's prefix caching off: a plan changes the K/V of every layer after its "
                         "first switched-off unit, and a cached prefix would give a request the K/V of another "
                         "request's plan; pass enable_prefix_caching=False to vLLM (--no-enable-prefix-caching)")
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and getattr(mode, "name", mode) != "NONE":
        raise ValueError(f"{name} needs vLLM's CUDA graphs off (cudagraph_mode is {getattr(mode, 'name', mode)}): each "
                         "step chooses its layers' work from its rows' plans on the host, which a captured graph "
                         "would replay unchanged for every later batch; pass enforce_eager=True to vLLM "
                         "(--enforce-eager)")


def _budget_of(row) -> float | None:
    """A batch row's latency budget, None for a row of an explicit plan or none."""
    spec = row.spec
    return spec[1] if spec is not None and spec[0] == "budget" else None


def _ops():
    """The Triton operators, launched without the dispatcher (vLLM runs this model eagerly)."""
    from ..ops.library import eager_launchers

    return eager_launchers()


def _features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The o_proj columns of ``heads``: ``heads[i] * head_dim + d``, int32."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, dtype=torch.int32, device=heads.device)).flatten()


class AdaLlavaLlamaForCausalLM(nn.Module):
    """A Llama decoder for vLLM whose requests each run their own AdaLLaVA plan (see the module)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        from vllm.model_executor.layers.attention import Attention

        from . import PLANS_PROCESSOR

        config = vllm_config.model_config.hf_config
        config = getattr(config, "text_config", config)
        self.config, self.vllm_config = config, vllm_config
        processors = vllm_config.model_config.logits_processors or []
        names = [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in processors]
        if PLANS_PROCESSOR not in names:
            raise ValueError(f"{type(self).__name__} needs the logits processor that carries each request's plan: "
                             f"pass logits_processors=[{PLANS_PROCESSOR!r}] to vLLM")
        check_engine_config(vllm_config)
        self.shape = ModelShape.from_hf_config(config)
        serve_shape(self.shape)
        s = self.shape
        self.eps = float(config.rms_norm_eps)
        self.embed_tokens = nn.Parameter(torch.empty(s.vocab_size, s.hidden_size), requires_grad=False)
        self.norm = nn.Parameter(torch.empty(s.hidden_size), requires_grad=False)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = self.embed_tokens if self.tied else nn.Parameter(
            torch.empty(s.vocab_size, s.hidden_size), requires_grad=False)
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        sizes = {"q_proj": (q, s.hidden_size), "k_proj": (kv, s.hidden_size), "v_proj": (kv, s.hidden_size),
                 "o_proj": (s.hidden_size, q), "gate_proj": (s.intermediate_size, s.hidden_size),
                 "up_proj": (s.intermediate_size, s.hidden_size), "down_proj": (s.hidden_size, s.intermediate_size),
                 "input_layernorm": (s.hidden_size,), "post_attention_layernorm": (s.hidden_size,)}
        self.layers = nn.ModuleList()
        for i in range(s.num_layers):
            layer = nn.Module()
            for name, size in sizes.items():
                setattr(layer, name, nn.Parameter(torch.empty(size), requires_grad=False))
            layer.attn = Attention(s.num_heads, s.head_dim, s.head_dim ** -0.5, num_kv_heads=s.num_kv_heads,
                                   cache_config=vllm_config.cache_config, prefix=f"{prefix}layers.{i}.self_attn.attn")
            self.layers.append(layer)
        self.rotary = LlamaRotaryEmbedding(config)
        self._explicit: dict[str, ExecutionPlan] = {}
        # The union layers' ops: the library's gathered Triton kernels (a decode step's, with the rows' masks
        # as data) or PyTorch ops; "auto": Triton on CUDA. ADALLAVA_VLLM_BACKEND=torch|triton|auto.
        backend = os.environ.get("ADALLAVA_VLLM_BACKEND", "auto")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"ADALLAVA_VLLM_BACKEND must be auto, torch or triton, got {backend!r}")
        device = vllm_config.device_config.device
        self.backend = backend if backend != "auto" else ("triton" if torch.device(device).type == "cuda" else "torch")
        self._full = ExecutionPlan.full(s)
        self._warned: set = set()
        # An AdaLLaVA checkpoint's latency encoder and scheduler (scheduler.py), where the directory has them.
        directory = vllm_config.model_config.model
        self.planner = load_planner(directory, s) if isinstance(directory, str) and os.path.isdir(directory) else None
        self._latency_tokens: dict[float, torch.Tensor] = {}
        self._batch_plans: BatchPlans | None = None  # made at the first step

    # -- vLLM's model interface -----------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        step = self.step_plans(h.shape[0], h.device, h.dtype, input_ids, h)
        self.rotary.to(h.device)
        cos, sin = self.rotary(h[None], positions.reshape(1, -1))
        cos, sin = cos[0, :, None].to(h.dtype), sin[0, :, None].to(h.dtype)  # [tokens, 1, head_dim]
        for i, layer in enumerate(self.layers):
            h = self._layer(i, layer, h, cos, sin, step)
        return _rms_norm(h, self.norm, self.eps)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states @ self.lm_head.t()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for key, tensor in weights:
            if any(skip in key for skip in _SKIP_KEYS):
                continue
            if m := _LAYER_KEY.search(key) or _NORM_KEY.search(key):
                name = f"layers.{m.group(1)}.{m.group(2)}"
            elif m := _TOP_KEY.search(key):
                name = m.group(1)
            else:
                continue
            if name == "lm_head" and self.tied:
                continue
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{key}: shape {list(tensor.shape)}, the model's {name} is {list(param.shape)}")
            param.data.copy_(tensor)
            loaded.add(name)
        if self.tied:
            loaded.add("lm_head")
        # The latency encoder and scheduler were loaded from their own file (scheduler.py).
        loaded.update(name for name in params if name.startswith("planner."))
        return loaded

    # -- plans ----------------------------------------------------------------------------------

    def plan_for(self, spec, prompt: tuple = ()) -> ExecutionPlan:
        """The plan of a request's spec (:mod:`.requests`) and prompt."""
        if spec is None:
            return self._full
        kind, value = spec
        if kind == "plan":
            plan = self._explicit.get(value)
            if plan is None:  # parsed once per JSON text, a few hundred kept
                if len(self._explicit) >= 256:
                    self._explicit.pop(next(iter(self._explicit)))
                try:
                    plan = ExecutionPlan.from_json(value, self.shape)
                except ValueError as error:
                    # Refused at admission where the front end shares this process; here, one bad request
                    # must not stop the engine: it runs the full plan, and the log says why.
                    logger.error("adallava_plan refused (%s): the request runs the full plan", error)
                    plan = self._full
                self._explicit[value] = plan
            return plan
        if self.planner is not None:
            return self._plan_budget(value, list(prompt))
        if value < 1.0 and value not in self._warned:
            self._warned.add(value)
            logger.warning("adallava_budget=%s: this checkpoint has no AdaLLaVA scheduler (export_for_vllm); the "
                           "request runs the full plan", value)
        return self._full  # a budget of 1.0 buys every unit: model.generate's full plan

    def row_plan(self, row) -> ExecutionPlan:
        """The plan of a batch row (:class:`.rows.Row`), made at its first step and kept on the row."""
        if row is None:
            return self._full
        if row.plan is None:
            row.plan = self.plan_for(row.spec, row.prompt)
        return row.plan

    def step_plans(self, num_tokens: int, device: torch.device, dtype: torch.dtype, input_ids=None,
                   h: torch.Tensor | None = None) -> StepPlans | None:
        """The step's plans as data, or ``None`` when every token runs the full plan. Writes the latency
        tokens of budget rows into ``h`` (their placeholder's embedding replaced). The rows' plans and budgets
        are device tables patched by the batch's joins, leaves and moves (:mod:`.step`): a step reads no row
        that no update touched."""
        starts = row_starts(num_tokens)
        batch = rows_of(self.vllm_config)
        if starts is None or batch is None:
            return None
        starts = starts.numpy()  # host ints: nothing below dispatches an op to read them
        plans = self.batch_plans
        plans.sync(batch, device, dtype)
        if input_ids is not None and h is not None and self.planner is not None:
            index = plans.latency_index(starts, num_tokens)
            if index is not None:
                self._apply_latency_tokens(h, input_ids, plans.latency_table, index)
        return plans.step(starts, num_tokens)

    @property
    def batch_plans(self) -> BatchPlans:
        if self._batch_plans is None:
            latency = self._latency_token if self.planner is not None else None
            self._batch_plans = BatchPlans(self.shape, self._full, self.row_plan, _budget_of, latency)
        return self._batch_plans

    def _apply_latency_tokens(self, h, input_ids, table: torch.Tensor, index: torch.Tensor) -> None:
        """Each budget row's latency placeholder tokens take the budget's latency token: a fixed handful of
        launches over the step's tokens, nothing read back (a ``nonzero`` per row would stop the host)."""
        hit = (input_ids == self.planner.config.latency_token_id) & (index > 0)
        h.copy_(torch.where(hit[:, None], table[index], h))

    def _latency_token(self, budget: float) -> torch.Tensor:
        """The budget's latency token, computed once per budget value."""
        token = self._latency_tokens.get(budget)
        if token is None:
            if len(self._latency_tokens) >= 256:  # budgets are the requests' floats: keep a few hundred
                self._latency_tokens.pop(next(iter(self._latency_tokens)))
            token = self._latency_tokens[budget] = self.planner.latency_token(budget)
        return token

    @torch.no_grad()
    def _plan_budget(self, budget: float, prompt: list[int]) -> ExecutionPlan:
        """model.generate's plan: the prefix layers over the prompt with its latency token (appended when
        the prompt lacks the placeholder), dense, outside vLLM's cache; the scheduler reads the token."""
        latency_id = self.planner.config.latency_token_id
        if not prompt or prompt[-1] != latency_id:
            prompt = prompt + [latency_id]
        ids = torch.tensor(prompt, device=self.embed_tokens.device)
        h = self.embed_input_ids(ids)
        h[ids == latency_id] = self._latency_token(budget).to(h.dtype)
        s = self.shape
        tokens = h.shape[0]
        cos, sin = self.rotary(h[None], torch.arange(tokens, device=h.device)[None])
        cos, sin = cos[0, :, None].to(h.dtype), sin[0, :, None].to(h.dtype)
        for layer in self.layers[: self.planner.scheme.prefix_layers]:
            x = _rms_norm(h, layer.input_layernorm, self.eps)
            q = (x @ layer.q_proj.t()).view(tokens, s.num_heads, s.head_dim)
            k = (x @ layer.k_proj.t()).view(tokens, s.num_kv_heads, s.head_dim)
            v = (x @ layer.v_proj.t()).view(tokens, s.num_kv_heads, s.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = (t.repeat_interleave(s.heads_per_kv_head, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                 is_causal=True)
            h = h + out.transpose(0, 1).reshape(tokens, -1) @ layer.o_proj.t()
            x = _rms_norm(h, layer.post_attention_layernorm, self.eps)
            h = h + (F.silu(x @ layer.gate_proj.t()) * (x @ layer.up_proj.t())) @ layer.down_proj.t()
        return self.planner.plan(h[-1], budget, tokens)

    # -- a layer ----------------------------------------------------------------------------------

    def _union_qkv(self, layer: nn.Module, x: torch.Tensor, heads: torch.Tensor, kv_heads: torch.Tensor):
        """q, k and v of a union attention layer: the rows of q_proj of the union's query heads and of k_proj
        and v_proj of their KV heads only, laid into all-head tensors (zero elsewhere) for vLLM's attention.
        The zero heads' outputs are never read (o_proj reads the union's columns), and the zero K/V they
        write to the cache belong to heads no row of the batch runs."""
        s, tokens = self.shape, x.shape[0]
        rows_q, rows_kv = _features(heads, s.head_dim), _features(kv_heads, s.head_dim)
        if self.backend == "triton":
            gather = _ops().row_gathered_linear
            parts = gather(x, layer.q_proj, rows_q), gather(x, layer.k_proj, rows_kv), gather(x, layer.v_proj, rows_kv)
        else:
            parts = x @ layer.q_proj[rows_q].t(), x @ layer.k_proj[rows_kv].t(), x @ layer.v_proj[rows_kv].t()
        q = x.new_zeros(tokens, s.num_heads, s.head_dim)
        k = x.new_zeros(tokens, s.num_kv_heads, s.head_dim)
        v = x.new_zeros(tokens, s.num_kv_heads, s.head_dim)
        q[:, heads] = parts[0].view(tokens, -1, s.head_dim)
        k[:, kv_heads] = parts[1].view(tokens, -1, s.head_dim)
        v[:, kv_heads] = parts[2].view(tokens, -1, s.head_dim)
        return q, k, v.view(tokens, -1)

    def _layer(self, i: int, layer: nn.Module, h: torch.Tensor, cos, sin, step: StepPlans | None) -> torch.Tensor:
        attention, mlp = ("dense", None), ("dense", None)
        if step is not None:
            attention, mlp = step.layers[i]
        s = self.shape
        tokens = h.shape[0]
        if attention[0] != "skip":
            x = _rms_norm(h, layer.input_layernorm, self.eps)
            if attention[0] == "union":
                q, k, v = self._union_qkv(layer, x, attention[1], step.kv_heads[i])
            else:
                q = (x @ layer.q_proj.t()).view(tokens, s.num_heads, s.head_dim)
                k = (x @ layer.k_proj.t()).view(tokens, s.num_kv_heads, s.head_dim)
                v = x @ layer.v_proj.t()
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = layer.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v)
            if attention[0] == "dense":
                h = h + out @ layer.o_proj.t()
            elif attention[0] == "masked":
                mask = step.heads[:, i, :][step.token_plan]
                h = h + (out.view(tokens, s.num_heads, s.head_dim) * mask[..., None]).reshape(tokens, -1) @ layer.o_proj.t()
            else:
                heads = attention[1]
                kept = out.view(tokens, s.num_heads, s.head_dim)[:, heads] * step.head_mask(i, heads)[..., None]
                kept = kept.reshape(tokens, -1)
                if self.backend == "triton":  # o_proj's union columns, the residual added in the same pass
                    h = _ops().col_gathered_linear(kept, layer.o_proj, _features(heads, s.head_dim), None, None, h)
                else:
                    columns = layer.o_proj.view(s.hidden_size, s.num_heads, s.head_dim)[:, heads]
                    h = h + kept @ columns.reshape(s.hidden_size, -1).t()
        if mlp[0] != "skip":
            x = _rms_norm(h, layer.post_attention_layernorm, self.eps)
            if mlp[0] == "dense":
                h = h + (F.silu(x @ layer.gate_proj.t()) * (x @ layer.up_proj.t())) @ layer.down_proj.t()
            elif mlp[0] == "masked":
                mask = step.neurons[:, i, :][step.token_plan]
                h = h + (F.silu(x @ layer.gate_proj.t()) * (x @ layer.up_proj.t()) * mask) @ layer.down_proj.t()
            elif self.backend == "triton":  # the union's neurons, each token's own masked in down_proj's pass
                neurons = mlp[1]
                a = _ops().swiglu_gathered(x, layer.gate_proj, layer.up_proj, neurons)
                h = _ops().col_gathered_linear(a, layer.down_proj, neurons, None, step.neuron_mask(i, neurons), h)
            else:
                neurons = mlp[1]
                a = F.silu(x @ layer.gate_proj[neurons].t()) * (x @ layer.up_proj[neurons].t())
                h = h + (a * step.neuron_mask(i, neurons)) @ layer.down_proj[:, neurons].t()
        return h
