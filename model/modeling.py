"""AdaLlavaForConditionalGeneration: LLaVA-1.5 with AdaLLaVA's latency token and scheduler.

A planned call reads: embed the prompt (``prumerge``: visual tokens, PruMerged when configured) ->
insert the latency token and check budgets and plans (``scheduler``) -> run the decoder under a
plan, by one of two paths over the same weights:

- **masked** (``backend=None``, training and the reference; ``masked``): transformers' own decoder
  layers with differentiable switches, every unit computed, then zeroed;
- **the plan runtime** (``backend="torch" | "triton" | "auto"``, inference; ``inference``): a
  skipped layer is absent and stores no KV, an active layer computes its active units only, and the
  scheduler is the prefill's planner; ``generate`` plans once per request and decodes over the
  runtime's paged pool, with no host sync per step.

Loading (``checkpoint``) is transformers' ``from_pretrained``, made strict.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging

from adallava_kernels import ExecutionPlan
from adallava_kernels.checks import check_int
from adallava_kernels.runtime import PlannedDecoder

from . import inference
from .checkpoint import LLAVA_KEY_MAPPING, check_llava_checkpoint, check_loaded_keys, check_scheduler_overrides
from .config import AdaLlavaConfig, quiet_model_type_warning
from .inference import AdaRequest
from .masked import SwitchGates, masked_forward
from .prumerge import embed_inputs, image_features
from .scheduler import (
    LatencyEncoder,
    Scheduler,
    check_budgets,
    check_inputs,
    check_plans,
    insert_latency_token,
    plan_from_logits,
    sample_switches,
)

__all__ = ["AdaLlavaForConditionalGeneration"]

logger = logging.get_logger(__name__)


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
        hidden = config.text_config.hidden_size
        self.latency_encoder = LatencyEncoder(hidden, config.scheme, config.latency_freqs)
        self.scheduler = Scheduler(hidden, config.scheme)
        self.switch_gates = SwitchGates(self.decoder_layers, config.shape.head_dim)
        # The runtimes hold the decoder's weights in their own layout, outside the module tree, so
        # they are neither saved nor counted as parameters. Their stacked q|k|v and gate|up are the
        # layers' own memory: building one makes those parameters views of them.
        self._runtimes = inference.Runtimes()
        # Set by from_pretrained: the checkpoint held trained latency-encoder and scheduler weights.
        self.has_trained_scheduler = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, for the llava-hf layout too, and strict.

        Every tensor of the checkpoint must map onto a parameter, and every parameter but the
        latency encoder's and the scheduler's must be in the checkpoint, else ``ValueError``
        naming the keys. Sets ``has_trained_scheduler``. ``key_mapping`` adds renamings to
        the llava-hf ones (``LLAVA_KEY_MAPPING``).

        Before any weight is allocated, the directory is checked (``checkpoint.check_llava_checkpoint``):
        its config must be a LLaVA or AdaLLaVA one over a Llama, and its tensor files must read; a config
        override that contradicts a trained scheduler (``switch_kind``, ...) is refused. Anything else is a
        ``ValueError`` naming it, not a default LLaVA-7B built in its place.
        """
        directory, config = check_llava_checkpoint("pretrained_model_name_or_path", pretrained_model_name_or_path)
        check_scheduler_overrides("pretrained_model_name_or_path", directory, config, kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs["key_mapping"] = {**LLAVA_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        with quiet_model_type_warning():
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        model.has_trained_scheduler = check_loaded_keys(model, info, pretrained_model_name_or_path)
        if not model.has_trained_scheduler:
            logger.warning(
                f"{pretrained_model_name_or_path} holds no AdaLLaVA latency encoder or scheduler: they are "
                "untrained, so plans under a budget below 1.0 are arbitrary"
            )
        return (model, info) if wants_info else model

    # -- structure -------------------------------------------------------------------------

    @property
    def scheme(self):
        return self.config.scheme

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def scheduler_parameters(self) -> list[nn.Parameter]:
        """The latency encoder's and the scheduler's parameters (trained at their own learning rate)."""
        return list(self.latency_encoder.parameters()) + list(self.scheduler.parameters())

    def runtime(self, backend: str = "auto") -> PlannedDecoder:
        """The plan runtime over this model's language model, one per backend, rebuilt when the decoder's
        weights change (training). Its KV pool grows with the requests (:meth:`generate`)."""
        return self._runtimes.get(self, backend)

    # -- inputs and plans ------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Projected visual tokens, one ``[tokens, hidden]`` tensor per image (with PruMerge: the kept
        tokens, merged, then one extra token, a count that varies per image)."""
        return image_features(self, pixel_values)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered over the image placeholders."""
        return embed_inputs(self, input_ids, pixel_values)

    def plan_from_logits(self, logits: torch.Tensor, budgets: Sequence[float], mask2d: torch.Tensor) -> list[ExecutionPlan]:
        """Inference plans: the best plan under each budget (deterministic mode: the logits' signs)."""
        return plan_from_logits(self.scheduler, self.config, logits, budgets, mask2d)

    def sample_switches(self, logits: torch.Tensor, budgets: Sequence[float], generator=None) -> torch.Tensor:
        """Training switches (0/1 values carrying straight-through gradients)."""
        return sample_switches(self.config, logits, budgets, generator)

    # -- forward ---------------------------------------------------------------------------

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
                ``"triton"`` or ``"auto"`` run the plan runtime (inference only).
            logits_to_keep: as transformers: logits of the last this many
                positions only (0: all); a loss needs them all.

        Without ``latency_budget`` and ``plan`` this is ``LlavaForConditionalGeneration.forward``
        (``**kwargs`` go there). Otherwise it returns an :class:`~model.outputs.AdaLlavaOutput`.
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
        check_inputs(input_ids, pixel_values, attention_mask)
        check_int("logits_to_keep", logits_to_keep, 0)
        if logits_to_keep and labels is not None:
            raise ValueError("a loss needs every position's logits: use logits_to_keep=0 with labels")
        batch = input_ids.shape[0]
        mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask2d.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {list(mask2d.shape)}")
        plans = check_plans(plan, batch, self.scheme)
        budgets = None if latency_budget is None else check_budgets(latency_budget, batch)
        h = self.embed(input_ids, pixel_values)
        where = None
        if budgets is not None:
            h, mask2d, labels, where = insert_latency_token(
                self.latency_encoder, h, mask2d, labels, budgets, latency_position)
        if backend is not None:
            return inference.kernel_forward(self, h, mask2d, labels, budgets, plans, where, backend, logits_to_keep)
        return masked_forward(self, h, mask2d, labels, budgets, plans, where, generator, logits_to_keep)

    # -- generation ------------------------------------------------------------------------

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
        by default their pages are returned. Returns an :class:`~model.inference.AdaGeneration`.
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
        return inference.generate(
            self, input_ids, pixel_values, attention_mask, latency_budget=latency_budget, plan=plan,
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, backend=backend, keep_cache=keep_cache,
            eos_check_every=eos_check_every,
        )

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
    ) -> AdaRequest:
        """The first half of :meth:`generate`, for a caller that runs its own decode loop (a serving stack,
        a benchmark): admit the request's sequences to :meth:`runtime` for ``max_new_tokens`` new tokens,
        prefill them (the scheduler plans after the prefix layers, unless ``plan`` is given) and return an
        :class:`AdaRequest`. Its sequences stay admitted until ``request.free()``; decode them with
        ``request.runtime.decode(request.seq_ids)``."""
        return inference.start_request(
            self, input_ids, pixel_values, attention_mask, latency_budget=latency_budget, plan=plan,
            max_new_tokens=max_new_tokens, backend=backend,
        )
