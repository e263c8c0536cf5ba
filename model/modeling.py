"""AdaLLaVA on transformers' Llava: latency token, scheduler, switches, and plan-driven execution.

Two ways to run a plan over the same weights:

- **masked** (``backend=None``, training and the reference): transformers'
  own decoder layers, whose head outputs (the input of ``o_proj``) and
  neuron activations (the input of ``down_proj``) are multiplied by the
  switches; a -L layer's output is ``h + s * (layer(h) - h)``. Gradients
  reach the scheduler through the straight-through switches. Nothing is
  saved: every unit is computed, then zeroed.
- **kernels** (``backend="torch" | "triton" | "auto"``, inference): the plan
  runtime (:class:`~adallava_kernels.runtime.PlannedDecoder`): a skipped
  layer is absent and stores no KV, an active layer computes its active
  units only, and the scheduler is the prefill's planner. ``generate``
  plans once per request and decodes over the runtime's paged pool, with no
  host sync per step. This module keeps what is AdaLLaVA's own: embedding,
  PruMerge, the latency token, the scheduler and training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging

from adallava_kernels import ExecutionPlan, LayerSkipKVCache, check_budget
from adallava_kernels.checks import check_int
from adallava_kernels.masks import causal_mask, positions
from adallava_kernels.runtime import PlannedDecoder

from .config import AdaLlavaConfig
from .prumerge import vision_prumerge
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

__all__ = ["AdaLlavaForConditionalGeneration", "AdaLlavaOutput", "AdaGeneration", "AdaRequest", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_BACKENDS = ("auto", "torch", "triton")
_sequence_ids = itertools.count()
# Pages of a runtime's first KV pool; generate grows an empty pool to what a request needs.
_INITIAL_PAGES = 256
logger = logging.get_logger(__name__)

# transformers' Llava checkpoint layout (as llava-hf publishes it, and as LlavaForConditionalGeneration.
# save_pretrained writes it) to this class's parameter names. transformers applies these renamings only to
# model_type "llava", so a subclass with its own model_type names them itself.
LLAVA_KEY_MAPPING = {
    r"^language_model\.lm_head": "lm_head",
    r"^language_model\.model": "model.language_model",
    r"^vision_tower": "model.vision_tower",
    r"^multi_modal_projector": "model.multi_modal_projector",
}
# Parameters a plain LLaVA checkpoint does not hold: they start untrained.
SCHEDULER_PREFIXES = ("latency_encoder.", "scheduler.")


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
    token has no id and does not appear). With ``keep_cache``, ``kv_cache``
    (the runtime's pool) still holds ``seq_ids`` (row ``b`` is ``seq_ids[b]``)
    until the caller frees them; otherwise both are empty.
    """

    sequences: torch.Tensor
    plans: list[ExecutionPlan]
    prompt_tokens: list[int]
    kv_cache: LayerSkipKVCache | None = None
    seq_ids: list[Hashable] = field(default_factory=list)


@dataclass
class AdaRequest:
    """A prefilled request (:meth:`AdaLlavaForConditionalGeneration.start_request`): its sequences in
    ``runtime`` (row ``b`` is ``seq_ids[b]``), the prompt's last logits, the plans chosen, and the attention
    mask with the latency token."""

    runtime: PlannedDecoder
    seq_ids: list[Hashable]
    logits: torch.Tensor
    plans: list[ExecutionPlan]
    attention_mask: torch.Tensor

    def free(self) -> None:
        """Return the sequences' pages to the runtime's pool."""
        for s in self.seq_ids:
            if s in self.runtime.sequences:
                self.runtime.free(s)


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
    return ", ".join(keys[:20]) + more


def _check_loaded_keys(model: nn.Module, info: dict, source) -> bool:
    """Raise unless every checkpoint tensor mapped onto a parameter and every parameter but the
    scheduler's was loaded; return whether the latency encoder and scheduler were loaded."""
    scheduler_keys = {k for k in model.state_dict() if k.startswith(SCHEDULER_PREFIXES)}
    missing = set(info.get("missing_keys", ()))
    problems = []
    if info.get("unexpected_keys"):
        problems.append(f"checkpoint keys that map to no parameter: {_listed(info['unexpected_keys'])}")
    if missing - scheduler_keys:
        problems.append(f"parameters the checkpoint does not hold: {_listed(missing - scheduler_keys)}")
    if info.get("mismatched_keys"):
        problems.append(f"keys of another shape: {_listed(str(k) for k in info['mismatched_keys'])}")
    if missing & scheduler_keys and not scheduler_keys <= missing:
        problems.append(f"a partial scheduler; missing: {_listed(missing & scheduler_keys)}")
    if problems:
        raise ValueError(f"{source} is not a LLaVA or AdaLLaVA checkpoint of this model: " + "; ".join(problems))
    return not missing & scheduler_keys


class AdaLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 with AdaLLaVA's latency encoder and scheduler.

    Without ``latency_budget`` and ``plan`` every call is transformers'
    ``LlavaForConditionalGeneration``. ``from_pretrained`` loads a local
    LLaVA checkpoint (llava-hf layout) or AdaLLaVA checkpoint (saved by this
    class, or converted from the reference code's with ``python -m
    model.convert``); ``has_trained_scheduler`` says whether it held the
    latency encoder and the scheduler (else they start untrained).
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
        # Set by from_pretrained: the checkpoint held trained latency-encoder and scheduler weights.
        self.has_trained_scheduler = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, for the llava-hf layout too, and strict.

        Every tensor of the checkpoint must map onto a parameter, and every parameter but the
        latency encoder's and the scheduler's must be in the checkpoint, else ``ValueError``
        naming the keys. Sets ``has_trained_scheduler``. ``key_mapping`` adds renamings to
        the llava-hf ones (``LLAVA_KEY_MAPPING``).
        """
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs["key_mapping"] = {**LLAVA_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model.has_trained_scheduler = _check_loaded_keys(model, info, pretrained_model_name_or_path)
        if not model.has_trained_scheduler:
            logger.warning(
                f"{pretrained_model_name_or_path} holds no AdaLLaVA latency encoder or scheduler: they are "
                "untrained, so plans under a budget below 1.0 are arbitrary"
            )
        return (model, info) if wants_info else model

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
        """Projected visual tokens, one ``[tokens, hidden]`` tensor per image (with PruMerge: the kept
        tokens, merged, then one extra token, a count that varies per image)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one int for AdaLLaVA, got {layer!r}")
        tower = self.model.vision_tower
        pixel_values = pixel_values.to(self.dtype)
        if self.config.prumerge:
            if self.config.vision_feature_select_strategy != "default":
                raise ValueError("prumerge needs vision_feature_select_strategy='default' (patch features, no [CLS])")
            merged = vision_prumerge(tower, pixel_values, layer, neighbors=self.config.prumerge_neighbors)
            return [self.model.multi_modal_projector(m[None])[0] for m in merged]
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return list(self.model.multi_modal_projector(hidden))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered over the image placeholders."""
        slots = input_ids == self.config.image_token_id
        # The placeholder's own embedding is never used; a converted LLaVA checkpoint keeps its
        # vocabulary, so its placeholder id lies past the embedding table.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        if pixel_values is None:
            return embeds
        features = torch.cat(self.image_features(pixel_values)).to(embeds.dtype)
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
        mask4d = causal_mask(mask2d, h.shape[1], h.dtype)
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
            if input_ids is not None and self.config.image_token_id >= self.config.text_config.vocab_size:
                # transformers would look the placeholder id up in the embedding table (see embed).
                kwargs["inputs_embeds"] = self.embed(input_ids, pixel_values)
                input_ids = pixel_values = None
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels,
                logits_to_keep=logits_to_keep, **kwargs,
            )
        if kwargs.get("past_key_values") is not None:
            raise ValueError("a planned forward takes no past_key_values; use generate(latency_budget=...)")
        if input_ids is None:
            raise ValueError("a planned forward needs input_ids")
        check_int("logits_to_keep", logits_to_keep, 0)
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

        hidden = self._masked_layers(h, mask2d, positions(mask2d), schedule=schedule)
        result.logits = self.lm_head(hidden[:, -keep:])
        if labels is not None:
            result.loss = self._loss(result.logits, labels)
            if result.latency_penalty is not None:
                result.loss = result.loss + self.config.latency_penalty * result.latency_penalty
        return result

    # -- the kernel path: the plan runtime ------------------------------------------------

    def runtime(self, backend: str = "auto") -> PlannedDecoder:
        """The plan runtime over this model's language model, one per backend, rebuilt when the decoder's
        weights change (training). Its KV pool grows with the requests (:meth:`generate`).

        Switchable layers get the column-major copies the gathered kernels read; the prefix layers always
        run whole.
        """
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        stamp = tuple((w.data_ptr(), w._version) for layer in self.decoder_layers for w in (
            layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
            layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
            layer.mlp.down_proj.weight))
        cached = self._kernel_cache.get(backend)
        if cached is None or cached[0] != stamp:
            if cached is not None and cached[1].sequences:
                raise ValueError("the decoder's weights changed while sequences are admitted to its runtime")
            runner = PlannedDecoder.from_hf(
                self, num_pages=_INITIAL_PAGES, backend=backend,
                partial_layers=range(self.scheme.prefix_layers, self.config.shape.num_layers),
            )
            cached = self._kernel_cache[backend] = (stamp, runner)
        return cached[1]

    def _scheduler_planner(self, budgets, mask2d, where):
        """The prefill callback of the runtime: the scheduler reads each latency token's hidden state after
        the prefix layers and plans (the one read-back of the request)."""

        def planner(hidden):
            logits = self.scheduler(hidden[torch.arange(hidden.shape[0], device=hidden.device), where])
            return self.plan_from_logits(logits, budgets, mask2d)

        return planner

    @torch.no_grad()
    def _kernel_forward(self, h, mask2d, labels, budgets, plans, where, backend, keep) -> AdaLlavaOutput:
        runner = self.runtime(backend)
        planner = None if plans is not None else self._scheduler_planner(budgets, mask2d, where)
        logits, plans = runner.forward(h, mask2d, plans, planner=planner, plan_after=self.scheme.prefix_layers,
                                       logits_to_keep=keep)
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
        keep_cache: bool = False,
        eos_check_every: int = 8,
        **kwargs,
    ):
        """Greedy decoding under a latency budget, through the plan runtime.

        Without ``latency_budget`` this is transformers' ``generate`` (every
        option of it). With one, decoding is greedy: the latency token is put
        after the prompt, each sequence is admitted to :meth:`runtime` with
        every page it can need reserved, the scheduler plans after the prefix
        layers (or ``plan`` is used), and every decode step reuses the plan
        and stores only the plan's layers and KV heads. Decode steps read
        nothing back from the device except, with ``eos_token_id``, whether
        every row has finished, once every ``eos_check_every`` steps.
        ``keep_cache`` leaves the sequences in the runtime's pool (returned as
        ``kv_cache`` and ``seq_ids``; free them with ``runtime(backend).free``);
        by default their pages are returned. Returns an :class:`AdaGeneration`.
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
        if kwargs:
            raise ValueError(f"generate with a latency_budget takes no {sorted(kwargs)}")
        for name, value in (("max_new_tokens", max_new_tokens), ("eos_check_every", eos_check_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        request = self.start_request(input_ids, pixel_values, attention_mask, latency_budget=latency_budget,
                                     plan=plan, max_new_tokens=max_new_tokens, backend=backend)
        runner, seq_ids = request.runtime, request.seq_ids
        try:
            new_tokens, finished = self._decode(runner, seq_ids, request.logits[:, -1], max_new_tokens,
                                                eos_token_id, eos_check_every)
            # The request's last read-back: where every row had finished, and the prompts' lengths.
            counts = torch.cat([finished.view(1), request.attention_mask.sum(-1)]).tolist()
        finally:
            if not keep_cache:
                request.free()
        return AdaGeneration(
            sequences=torch.cat([input_ids, new_tokens[:, :counts[0]]], dim=1), plans=request.plans,
            prompt_tokens=[int(n) for n in counts[1:]], kv_cache=runner.cache if keep_cache else None,
            seq_ids=seq_ids if keep_cache else [],
        )

    @torch.no_grad()
    def start_request(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        latency_budget: float | Sequence[float],
        plan: ExecutionPlan | Sequence[ExecutionPlan] | None = None,
        max_new_tokens: int = 32,
        backend: str = "auto",
    ) -> "AdaRequest":
        """The first half of :meth:`generate`, for a caller that runs its own decode loop (a serving stack,
        a benchmark): admit the request's sequences to :meth:`runtime` for ``max_new_tokens`` new tokens,
        prefill them (the scheduler plans after the prefix layers, unless ``plan`` is given) and return an
        :class:`AdaRequest`. Its sequences stay admitted until ``request.free()``; decode them with
        ``request.runtime.decode(request.seq_ids)``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("generate needs input_ids of shape [batch, prompt]")
        batch = input_ids.shape[0]
        budgets = self._budgets(latency_budget, batch)
        plans = self._check_plans(plan, batch)
        runner = self.runtime(backend)
        mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        if mask2d.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                             f"got {list(mask2d.shape)}")
        h = self.embed(input_ids, pixel_values)
        h, mask2d, _, where = self._insert_latency_token(h, mask2d, None, budgets, mask2d.shape[1])
        # Every position but the last new token's is stored: it is never fed back.
        total = mask2d.shape[1] + max_new_tokens - 1
        seq_ids = self._admit(runner, plans, batch, total)
        try:
            planner = None if plans is not None else self._scheduler_planner(budgets, mask2d, where)
            logits = runner.prefill(seq_ids, h, mask2d, planner=planner, plan_after=self.scheme.prefix_layers)
        except Exception:
            for s in seq_ids:
                runner.free(s)
            raise
        return AdaRequest(runner, seq_ids, logits, [runner.plan(s) for s in seq_ids], mask2d)

    def _admit(self, runner: PlannedDecoder, plans, batch: int, total: int) -> list[Hashable]:
        """Admit the request's sequences (for any plan when the scheduler plans), growing an empty pool that
        is too small; a pool in use that cannot hold them refuses them (ValueError, nothing changes)."""
        row_plans = plans if plans is not None else [None] * batch
        needed = sum(runner.pages_for(p, total) for p in row_plans)
        if not runner.sequences and needed > runner.cache.num_pages:
            runner.resize_pool(max(needed, 2 * runner.cache.num_pages))
        run = next(_sequence_ids)
        seq_ids = [("adallava", run, b) for b in range(batch)]
        admitted = []
        try:
            for s, p in zip(seq_ids, row_plans):
                runner.admit(s, p, total)
                admitted.append(s)
        except Exception:
            for s in admitted:
                runner.free(s)
            raise
        return seq_ids

    def _decode(self, runner, seq_ids, logits, max_new_tokens, eos_token_id, check_every):
        """Greedy steps over the runtime; a finished row repeats the pad token. Returns the new tokens
        ``[batch, max_new_tokens]`` and, on the device, how many of them to keep: up to the step where
        every row had finished, as transformers stops."""
        pad = self.config.text_config.pad_token_id
        pad = eos_token_id if pad is None else pad
        token = logits.argmax(-1)
        out = token.new_full((token.shape[0], max_new_tokens), 0 if pad is None else pad)
        out[:, 0] = token
        finished = torch.full((), max_new_tokens, dtype=torch.long, device=token.device)
        done = torch.zeros_like(token, dtype=torch.bool)
        steps = runner.decode(seq_ids) if max_new_tokens > 1 else None
        for step in range(1, max_new_tokens):
            if eos_token_id is not None:
                done |= token == eos_token_id
                finished = torch.where(done.all() & (finished == max_new_tokens), step, finished)
                if step % check_every == 0 and bool(done.all()):
                    break
            _, token = steps.step(token)
            if eos_token_id is not None:
                token = torch.where(done, pad, token)
            out[:, step] = token
        if steps is not None:
            steps.close()
        return out, finished

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
