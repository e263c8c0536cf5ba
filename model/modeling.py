"""AdaLLaVA on transformers' Llava: latency token, scheduler, switches, and plan-driven execution.

Two ways to run a plan over the same weights:

- **masked** (``backend=None``, training and the reference): transformers'
  own decoder layers, whose head outputs (the input of ``o_proj``) and
  neuron activations (the input of ``down_proj``) are multiplied by the
  switches; a -L layer's output is ``h + s * (layer(h) - h)``. Gradients
  reach the scheduler through the straight-through switches. Nothing is
  saved: every unit is computed, then zeroed.
- **kernels** (``backend="torch" | "triton" | "auto"``, inference): the
  prefix layers run dense; a skipped layer is the identity and stores no KV;
  an active layer runs ``masked_attention`` and ``masked_mlp`` over its
  active units only. ``generate`` plans once at prefill and decodes with a
  :class:`~adallava_kernels.LayerSkipKVCache`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlavaForConditionalGeneration

from adallava_kernels import ExecutionPlan, LayerSkipKVCache, MaskedAttention, MaskedMLP, check_budget

from .config import AdaLlavaConfig
from .prumerge import cls_attention_and_keys, prune_merge
from .scheduler import (
    LatencyEncoder,
    Scheduler,
    budget_units,
    deterministic_switches,
    gates_from_plan,
    gates_from_switches,
    plan_from_switches,
    sample_head_switches,
    sample_layer_switches,
    switch_latency,
)

__all__ = ["AdaLlavaForConditionalGeneration", "AdaLlavaOutput", "AdaGeneration", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_BACKENDS = ("auto", "torch", "triton")
_sequence_ids = itertools.count()


@dataclass
class AdaLlavaOutput:
    """What a planned forward returns.

    ``logits`` cover every position of the sequence the layers saw, the latency
    token included (at ``latency_positions``); ``labels`` are aligned with
    them (``IGNORE_INDEX`` at the latency token).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    switches: torch.Tensor | None = None
    plans: list[ExecutionPlan] | None = None
    latency_positions: torch.Tensor | None = None
    latency_penalty: torch.Tensor | None = None


@dataclass
class AdaGeneration:
    """What ``generate(..., latency_budget=l)`` returns.

    ``sequences`` are the prompt's ids followed by the new tokens (the latency
    token has no id and does not appear); ``kv_cache`` holds ``seq_ids``
    (row ``b`` is ``seq_ids[b]``) until the caller frees them.
    """

    sequences: torch.Tensor
    plans: list[ExecutionPlan]
    prompt_tokens: list[int]
    kv_cache: LayerSkipKVCache
    seq_ids: list[Hashable] = field(default_factory=list)


def _additive_mask(mask2d: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, 1, q_len, kv_len]`` causal-plus-padding mask, 0 where attended, the dtype's minimum elsewhere."""
    kv_len = mask2d.shape[1]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask2d.device).tril(kv_len - q_len)
    visible = causal[None, None] & mask2d.bool()[:, None, None, :]
    return torch.zeros(visible.shape, dtype=dtype, device=mask2d.device).masked_fill(~visible, torch.finfo(dtype).min)


def _positions(mask2d: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' ``generate`` derives them: attended tokens before each one."""
    return (mask2d.long().cumsum(-1) - 1).clamp(min=0)


class AdaLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 with AdaLLaVA's latency encoder and scheduler.

    Without ``latency_budget`` and ``plan`` every call is transformers'
    ``LlavaForConditionalGeneration``. ``from_pretrained`` loads a local
    LLaVA checkpoint (llava-hf layout); the latency encoder and the scheduler
    start untrained unless the checkpoint holds them.
    """

    config_class = AdaLlavaConfig

    def __init__(self, config: AdaLlavaConfig) -> None:
        super().__init__(config)
        scheme = config.scheme
        hidden = config.text_config.hidden_size
        self.latency_encoder = LatencyEncoder(hidden, scheme, config.latency_freqs)
        self.scheduler = Scheduler(hidden, scheme)
        self._hook_gates: dict[int, tuple] = {}
        self._install_gate_hooks()
        # Kernel modules share the decoder's weights: held outside the module tree,
        # so they are neither saved nor counted twice.
        self.__dict__["_kernel_cache"] = {}

    # -- structure -------------------------------------------------------------

    @property
    def scheme(self):
        return self.config.scheme

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def scheduler_parameters(self) -> list[nn.Parameter]:
        """The latency encoder's and the scheduler's parameters (trained at their own learning rate)."""
        return list(self.latency_encoder.parameters()) + list(self.scheduler.parameters())

    def _install_gate_hooks(self) -> None:
        for i, layer in enumerate(self.decoder_layers):
            layer.self_attn.o_proj.register_forward_pre_hook(self._gate_hook(i, 0))
            layer.mlp.down_proj.register_forward_pre_hook(self._gate_hook(i, 1))

    def _gate_hook(self, layer: int, which: int):
        head_dim = self.config.shape.head_dim

        def hook(module, args):
            gate = self._hook_gates.get(layer, (None, None))[which]
            if gate is None:
                return None
            if which == 0:
                gate = gate.repeat_interleave(head_dim, dim=-1)
            return (args[0] * gate[:, None, :].to(args[0].dtype),) + args[1:]

        return hook

    # -- inputs ----------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Projected visual tokens, one ``[tokens, hidden]`` tensor per image (fewer with PruMerge)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one int for AdaLLaVA, got {layer!r}")
        tower = self.model.vision_tower
        pixel_values = pixel_values.to(self.dtype)
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        if not self.config.prumerge:
            return list(self.model.multi_modal_projector(hidden))
        attention, keys = cls_attention_and_keys(tower, pixel_values, layer)
        merged = prune_merge(hidden, attention, keys, neighbors=self.config.prumerge_neighbors)
        return [self.model.multi_modal_projector(m[None])[0] for m in merged]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered over the image placeholders."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = torch.cat(self.image_features(pixel_values)).to(embeds.dtype)
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"input_ids hold {int(slots.sum())} image tokens, but the images give {features.shape[0]} "
                "visual tokens (with PruMerge the count varies per image: see model.fit_image_tokens)"
            )
        return embeds.masked_scatter(slots[..., None], features)

    def _insert_latency_token(self, embeds, mask2d, labels, budgets, position):
        """Put each sample's latency token after its prompt: before the first answer label, else after the
        last attended token, or at ``position``. Returns the new embeds, mask, labels and positions."""
        batch, seq = mask2d.shape
        if position is not None:
            where = torch.as_tensor(position, dtype=torch.long).flatten().expand(batch).tolist()
        else:
            where = []
            for b in range(batch):
                answer = [] if labels is None else (labels[b] != IGNORE_INDEX).nonzero().flatten().tolist()
                attended = mask2d[b].nonzero().flatten()
                where.append(answer[0] if answer else int(attended[-1]) + 1 if attended.numel() else seq)
        for b, w in enumerate(where):
            if not 0 <= w <= seq:
                raise ValueError(f"latency_position {w} for sample {b} is outside [0, {seq}]")
        tokens = self.latency_encoder(budgets).to(embeds.dtype)
        one = mask2d.new_ones(1)
        rows = [(torch.cat([embeds[b, :w], tokens[b:b + 1], embeds[b, w:]]),
                 torch.cat([mask2d[b, :w], one, mask2d[b, w:]])) for b, w in enumerate(where)]
        new_labels = None
        if labels is not None:
            ignore = labels.new_full((1,), IGNORE_INDEX)
            new_labels = torch.stack([torch.cat([labels[b, :w], ignore, labels[b, w:]]) for b, w in enumerate(where)])
        where = torch.tensor(where, dtype=torch.long, device=embeds.device)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), new_labels, where

    # -- scheduling ------------------------------------------------------------

    def _budgets(self, latency_budget, batch: int) -> list[float]:
        values = torch.as_tensor(latency_budget, dtype=torch.float64).flatten().tolist()
        if len(values) not in (1, batch):
            raise ValueError(f"latency_budget must be one number or one per sample ({batch}), got {len(values)}")
        return [check_budget(v) for v in (values * batch if len(values) == 1 else values)]

    def _plan_tokens(self, mask2d: torch.Tensor) -> list[int | None]:
        """Per sample, the prompt length a FLOPs budget is priced at (None: equal units)."""
        if self.config.budget_cost == "units":
            return [None] * mask2d.shape[0]
        return [int(n) for n in mask2d.sum(-1).tolist()]

    def plan_from_logits(self, logits: torch.Tensor, budgets: Sequence[float], mask2d: torch.Tensor) -> list[ExecutionPlan]:
        """Inference plans: the best plan under each budget (deterministic mode: the logits' signs)."""
        if self.config.scheduler_mode == "deterministic":
            return [plan_from_switches(s, self.scheme) for s in (logits > 0).float()]
        tokens = self._plan_tokens(mask2d)
        return [self.scheduler.best_plan(logits[b], budgets[b], tokens[b]) for b in range(len(budgets))]

    def sample_switches(self, logits: torch.Tensor, budgets: Sequence[float], generator=None) -> torch.Tensor:
        """Training switches (0/1 values carrying straight-through gradients)."""
        scheme = self.scheme
        if self.config.scheduler_mode == "deterministic":
            return deterministic_switches(logits)
        units = budget_units(scheme, torch.tensor(budgets))
        tau = self.config.gumbel_tau
        if scheme.kind == "L":
            return sample_layer_switches(logits, units, tau, generator=generator)
        return sample_head_switches(logits, units, scheme.rank, tau, generator=generator)

    # -- the masked path ---------------------------------------------------------

    def _masked_layers(self, h, mask2d, positions, *, schedule):
        """Run the decoder under switch gates; ``schedule(h)`` is called after the prefix layers and returns
        ``{layer: (layer_gate, head_gate, neuron_gate)}``."""
        lm = self.model.language_model
        mask4d = _additive_mask(mask2d, h.shape[1], h.dtype)
        rotary = lm.rotary_emb(h, positions)
        gates: dict[int, tuple] = {}
        try:
            for i, layer in enumerate(self.decoder_layers):
                if i == self.scheme.prefix_layers:
                    gates = schedule(h)
                layer_gate, head_gate, neuron_gate = gates.get(i, (None, None, None))
                self._hook_gates[i] = (head_gate, neuron_gate)
                out = layer(h, attention_mask=mask4d, position_ids=positions, position_embeddings=rotary)
                out = out[0] if isinstance(out, tuple) else out
                h = out if layer_gate is None else h + layer_gate.to(h.dtype)[:, None, None] * (out - h)
        finally:
            self._hook_gates.clear()
        return lm.norm(h)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the next token over the answer labels."""
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        *,
        latency_budget: float | Sequence[float] | torch.Tensor | None = None,
        plan: ExecutionPlan | Sequence[ExecutionPlan] | None = None,
        latency_position: int | Sequence[int] | None = None,
        backend: str | None = None,
        generator: torch.Generator | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """transformers' Llava forward, or a planned one.

        Args:
            latency_budget: in [0.5, 1.0], one or one per sample: insert the
                latency token, plan with the scheduler (training: Gumbel
                rounds; eval: the best plan), run the plan.
            plan: run these plans (one, or one per sample) instead of the
                scheduler's; without ``latency_budget`` no latency token is inserted.
            latency_position: where the latency token goes (default: before the
                first answer label, else after the last attended token).
            backend: ``None`` runs the masked path (differentiable); ``"torch"``,
                ``"triton"`` or ``"auto"`` run the kernels (inference only).
            logits_to_keep: as transformers: logits of the last this many
                positions only (0: all); a loss needs them all.

        Without ``latency_budget`` and ``plan`` this is ``LlavaForConditionalGeneration.forward``
        (``**kwargs`` go there). Otherwise it returns an :class:`AdaLlavaOutput`.
        """
        if latency_budget is None and plan is None:
            if backend is not None:
                raise ValueError("backend needs a latency_budget or a plan")
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels,
                logits_to_keep=logits_to_keep, **kwargs,
            )
        if kwargs.get("past_key_values") is not None:
            raise ValueError("a planned forward takes no past_key_values; use generate(latency_budget=...)")
        if input_ids is None:
            raise ValueError("a planned forward needs input_ids")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("a loss needs every position's logits: use logits_to_keep=0 with labels")
        batch = input_ids.shape[0]
        mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask2d.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {list(mask2d.shape)}")
        plans = self._check_plans(plan, batch)
        budgets = None if latency_budget is None else self._budgets(latency_budget, batch)
        h = self.embed(input_ids, pixel_values)
        where = None
        if budgets is not None:
            h, mask2d, labels, where = self._insert_latency_token(h, mask2d, labels, budgets, latency_position)
        if backend is not None:
            return self._kernel_forward(h, mask2d, labels, budgets, plans, where, backend, logits_to_keep)
        return self._masked_forward(h, mask2d, labels, budgets, plans, where, generator, logits_to_keep)

    def _check_plans(self, plan, batch: int) -> list[ExecutionPlan] | None:
        if plan is None:
            return None
        plans = [plan] * batch if isinstance(plan, ExecutionPlan) else list(plan)
        if len(plans) != batch:
            raise ValueError(f"plan must be one ExecutionPlan or one per sample ({batch}), got {len(plans)}")
        for p in plans:
            if not isinstance(p, ExecutionPlan):
                raise ValueError(f"plan must hold ExecutionPlans, got {type(p).__name__}")
            p.check_shape(self.config.shape)
            if not all(p.layer_mask[: self.scheme.prefix_layers]) or any(
                len(p.heads[i]) < p.shape.num_heads or len(p.neurons[i]) < p.shape.intermediate_size
                for i in range(self.scheme.prefix_layers)
            ):
                raise ValueError(f"plan must run the {self.scheme.prefix_layers} prefix layers whole")
        return plans

    def _masked_forward(self, h, mask2d, labels, budgets, plans, where, generator, keep) -> AdaLlavaOutput:
        scheme = self.scheme
        result = AdaLlavaOutput(logits=h, labels=labels, plans=plans, latency_positions=where)

        def schedule(hidden):
            if plans is not None:
                return gates_from_plan(plans, scheme, hidden.device, hidden.dtype)
            logits = self.scheduler(hidden[torch.arange(hidden.shape[0], device=hidden.device), where])
            if self.training:
                result.switches = self.sample_switches(logits, budgets, generator)
                if self.config.scheduler_mode == "deterministic":
                    target = torch.tensor(budgets, dtype=torch.float32, device=logits.device)
                    result.latency_penalty = ((switch_latency(result.switches, scheme) - target) ** 2).mean()
                return gates_from_switches(result.switches.to(hidden.dtype), scheme)
            result.plans = self.plan_from_logits(logits, budgets, mask2d)
            return gates_from_plan(result.plans, scheme, hidden.device, hidden.dtype)

        hidden = self._masked_layers(h, mask2d, _positions(mask2d), schedule=schedule)
        result.logits = self.lm_head(hidden[:, -keep:])
        if labels is not None:
            result.loss = self._loss(result.logits, labels)
            if result.latency_penalty is not None:
                result.loss = result.loss + self.config.latency_penalty * result.latency_penalty
        return result

    # -- the kernel path ---------------------------------------------------------

    def kernel_layers(self, backend: str = "auto") -> list[tuple[MaskedAttention, MaskedMLP | None]]:
        """Per decoder layer, the kernel modules over its weights (rebuilt when the weights change).

        Switchable layers hold column-major copies of ``o_proj`` and ``down_proj``
        for fast gathers; prefix layers share every weight and run their MLP dense.
        """
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        layers = self.decoder_layers
        stamp = tuple((l.self_attn.o_proj.weight.data_ptr(), l.self_attn.o_proj.weight._version,
                       l.mlp.down_proj.weight._version) for l in layers)
        cached = self._kernel_cache.get(backend)
        if cached is None or cached[0] != stamp:
            prefix = self.scheme.prefix_layers
            modules = [
                (MaskedAttention.from_hf(l.self_attn, backend=backend, gather_layout=i >= prefix),
                 MaskedMLP.from_hf(l.mlp, backend=backend) if i >= prefix else None)
                for i, l in enumerate(layers)
            ]
            cached = self._kernel_cache[backend] = (stamp, modules)
        return cached[1]

    def _kernel_layer(self, i, h, rotary, padding, cache_layer, modules, layer_plan):
        layer = self.decoder_layers[i]
        attention, mlp = modules[i]
        attention.set_plan(layer_plan)
        if layer_plan is None or layer_plan.num_heads:
            h = h + attention(layer.input_layernorm(h), rotary, padding, cache_layer)[0]
        if mlp is None:
            return h + layer.mlp(layer.post_attention_layernorm(h))
        mlp.set_plan(layer_plan)
        if layer_plan.num_neurons:
            h = h + mlp(layer.post_attention_layernorm(h))
        return h

    @staticmethod
    def _plan_groups(plans: Sequence[ExecutionPlan], device) -> list[tuple[ExecutionPlan, list[int], torch.Tensor | None]]:
        """Rows that share a plan, with their index on ``device`` (``None`` when one plan covers the batch)."""
        rows: dict[ExecutionPlan, list[int]] = {}
        for b, p in enumerate(plans):
            rows.setdefault(p, []).append(b)
        if len(rows) == 1:
            return [(plan, r, None) for plan, r in rows.items()]
        return [(plan, r, torch.tensor(r, device=device)) for plan, r in rows.items()]

    def _run_kernels(self, h, mask2d, positions, *, modules, schedule, plans=None, groups=None, padded=None,
                     cache=None, seq_ids=None):
        """The decoder over the kernels. ``mask2d`` covers past and new positions. Samples with equal
        plans run their switchable layers together; ``schedule(h)`` gives the plans after the prefix.
        Decode steps pass ``groups`` and ``padded`` computed once, so a step makes no host sync of its own."""
        lm = self.model.language_model
        rotary = lm.rotary_emb(h, positions)
        if padded is None:
            padded = not bool(mask2d.all())
        padding = mask2d if padded else None
        prefix = self.scheme.prefix_layers

        def view(i, rows):
            return None if cache is None else cache.layer_view([seq_ids[r] for r in rows], i)

        everyone = list(range(h.shape[0]))
        for i in range(prefix):
            h = self._kernel_layer(i, h, rotary, padding, view(i, everyone), modules, None)
        plans = schedule(h) if plans is None else plans
        groups = self._plan_groups(plans, h.device) if groups is None else groups
        out = h if groups[0][2] is None else h.clone()
        for plan, rows, index in groups:
            part, part_rotary, part_padding = h, rotary, padding
            if index is not None:
                part = h.index_select(0, index)
                part_rotary = tuple(t.index_select(0, index) for t in rotary)
                part_padding = None if padding is None else padding.index_select(0, index)
            layer_plans = plan.layers(h.device)
            for i in range(prefix, self.config.shape.num_layers):
                if plan.layer_mask[i]:
                    part = self._kernel_layer(i, part, part_rotary, part_padding, view(i, rows), modules, layer_plans[i])
            out = part if index is None else out.index_copy(0, index, part)
        return lm.norm(out), plans

    @torch.no_grad()
    def _kernel_forward(self, h, mask2d, labels, budgets, plans, where, backend, keep) -> AdaLlavaOutput:
        modules = self.kernel_layers(backend)

        def schedule(hidden):
            logits = self.scheduler(hidden[torch.arange(hidden.shape[0], device=hidden.device), where])
            return self.plan_from_logits(logits, budgets, mask2d)

        hidden, plans = self._run_kernels(h, mask2d, _positions(mask2d), modules=modules, schedule=schedule, plans=plans)
        logits = self.lm_head(hidden[:, -keep:])
        loss = None if labels is None else self._loss(logits, labels)
        return AdaLlavaOutput(logits=logits, loss=loss, labels=labels, plans=plans, latency_positions=where)

    # -- generation ----------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        latency_budget: float | Sequence[float] | None = None,
        plan: ExecutionPlan | Sequence[ExecutionPlan] | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        backend: str = "auto",
        kv_cache: LayerSkipKVCache | None = None,
        page_size: int = 16,
        **kwargs,
    ):
        """Greedy decoding under a latency budget: plan once at prefill, decode with the layer-skip KV cache.

        Without ``latency_budget`` this is transformers' ``generate`` (every
        option of it). With one, decoding is greedy: the latency token is put
        after the prompt, the scheduler plans after the prefix layers (or
        ``plan`` is used), every later step reuses the plan, and only the
        plan's layers and KV heads are stored in ``kv_cache`` (a new pool
        sized for ``max_new_tokens`` when none is given). Returns an
        :class:`AdaGeneration`.
        """
        if latency_budget is None:
            if plan is not None:
                raise ValueError("plan needs a latency_budget in generate (the latency token is part of the prompt)")
            return super().generate(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **kwargs,
            )
        if kwargs.get("do_sample") or (kwargs.get("num_beams") or 1) > 1:
            raise ValueError("generate with a latency_budget decodes greedily: do_sample and num_beams are not supported")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("generate needs input_ids of shape [batch, prompt]")
        batch = input_ids.shape[0]
        budgets = self._budgets(latency_budget, batch)
        plans = self._check_plans(plan, batch)
        modules = self.kernel_layers(backend)
        mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        if mask2d.shape != input_ids.shape or not bool(mask2d[:, -1].all()):
            raise ValueError("generate needs an attention_mask shaped like input_ids with left padding (last column all 1)")
        h = self.embed(input_ids, pixel_values)
        h, mask2d, _, where = self._insert_latency_token(h, mask2d, None, budgets, mask2d.shape[1])
        total = mask2d.shape[1] + max_new_tokens
        cache, seq_ids = self._admit(kv_cache, batch, total, page_size, h)

        def schedule(hidden):
            logits = self.scheduler(hidden[:, -1])
            chosen = self.plan_from_logits(logits, budgets, mask2d)
            for s, p in zip(seq_ids, chosen):
                cache.set_plan(s, p)
            return chosen

        if plans is not None:
            for s, p in zip(seq_ids, plans):
                cache.set_plan(s, p)
        positions = _positions(mask2d)
        hidden, plans = self._run_kernels(h, mask2d, positions, modules=modules, schedule=schedule,
                                          plans=plans, cache=cache, seq_ids=seq_ids)
        new_tokens = self._decode(hidden, mask2d, positions[:, -1], modules, plans, cache, seq_ids,
                                  max_new_tokens, eos_token_id)
        return AdaGeneration(
            sequences=torch.cat([input_ids, new_tokens], dim=1), plans=plans,
            prompt_tokens=[int(n) for n in mask2d.sum(-1).tolist()], kv_cache=cache, seq_ids=seq_ids,
        )

    def _admit(self, kv_cache, batch: int, total: int, page_size: int, like: torch.Tensor):
        """Sequences in the pool, each under a prefix-only plan until the scheduler has planned."""
        shape = self.config.shape
        if kv_cache is None:
            pages = batch * shape.num_layers * shape.num_kv_heads * -(-total // page_size)
            kv_cache = LayerSkipKVCache(shape, num_pages=pages, page_size=page_size, dtype=like.dtype, device=like.device)
        elif not isinstance(kv_cache, LayerSkipKVCache):
            raise ValueError(f"kv_cache must be a LayerSkipKVCache, got {type(kv_cache).__name__}")
        prefix = self.scheme.prefix_layers
        prefix_plan = ExecutionPlan.from_layer_mask([1] * prefix + [0] * (shape.num_layers - prefix), shape)
        run = next(_sequence_ids)
        seq_ids = [("adallava", run, b) for b in range(batch)]
        for s in seq_ids:
            kv_cache.add_sequence(s, prefix_plan, total)
        return kv_cache, seq_ids

    def _decode(self, hidden, mask2d, last_position, modules, plans, cache, seq_ids, max_new_tokens, eos_token_id):
        """Greedy steps over the cache; finished rows repeat the pad token."""
        pad = self.config.text_config.pad_token_id
        pad = eos_token_id if pad is None else pad
        token = self.lm_head(hidden[:, -1]).argmax(-1)
        tokens = [token]
        done = torch.zeros_like(token, dtype=torch.bool)
        # New tokens are always attended, so padding and the plan groups stay as at prefill.
        padded = not bool(mask2d.all())
        groups = self._plan_groups(plans, hidden.device)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    break
            mask2d = torch.cat([mask2d, mask2d.new_ones(mask2d.shape[0], 1)], dim=1)
            last_position = last_position + 1
            h = self.get_input_embeddings()(token)[:, None]
            out, _ = self._run_kernels(h, mask2d, last_position[:, None], modules=modules, schedule=None,
                                       plans=plans, groups=groups, padded=padded, cache=cache, seq_ids=seq_ids)
            token = self.lm_head(out[:, -1]).argmax(-1)
            if eos_token_id is not None and pad is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
        return torch.stack(tokens, dim=1)


def fit_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, counts: Sequence[int], image_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize each row's run of image tokens to ``counts[b]`` (PruMerge keeps a varying number), left-padding
    the rows back to one length. Each row must hold one contiguous run of image tokens."""
    rows, masks = [], []
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for b, row in enumerate(input_ids):
        keep = attention_mask[b].bool()
        ids = row[keep]
        slots = (ids == image_token_id).nonzero().flatten()
        if slots.numel() == 0 or int(slots[-1] - slots[0]) + 1 != slots.numel():
            raise ValueError(f"input_ids row {b} must hold one contiguous run of image tokens")
        start, stop = int(slots[0]), int(slots[-1]) + 1
        run = ids.new_full((counts[b],), image_token_id)
        rows.append(torch.cat([ids[:start], run, ids[stop:]]))
    width = max(r.numel() for r in rows)
    for r in rows:
        masks.append(torch.cat([r.new_zeros(width - r.numel()), r.new_ones(r.numel())]))
    ids = torch.stack([torch.cat([r.new_full((width - r.numel(),), pad_token_id), r]) for r in rows])
    return ids, torch.stack(masks)
