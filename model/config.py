"""AdaLlavaConfig: a transformers ``LlavaConfig`` plus the AdaLLaVA settings."""

from __future__ import annotations

import contextlib
import logging

from transformers import LlavaConfig

from adallava_kernels import ModelShape, UnitScheme
from adallava_kernels.checks import check_int

__all__ = ["AdaLlavaConfig", "SCHEDULER_MODES", "BUDGET_COSTS", "quiet_model_type_warning"]

SCHEDULER_MODES = ("probabilistic", "deterministic")
BUDGET_COSTS = ("units", "flops")


class AdaLlavaConfig(LlavaConfig):
    """LLaVA with a latency encoder, a scheduler and switches over the top layers.

    Args:
        switch_kind: ``"L"`` switches whole decoder layers, ``"H"`` attention
            heads and MLP neuron groups (one group per head).
        prefix_layers: layers that always run, before the scheduler reads the
            latency token (default: half the layers, as the paper).
        head_rank: -H only: heads (and MLP groups) per unit; must divide the head count.
        gumbel_tau: temperature of the Gumbel-softmax rounds in training.
        latency_freqs: sine (and as many cosine) frequencies of the latency encoding.
        scheduler_mode: ``"probabilistic"`` (AdaLLaVA: sampling without replacement
            under the budget) or ``"deterministic"`` (the baseline: a hard plan from
            the logits' signs, trained with a latency penalty).
        latency_penalty: weight of the deterministic baseline's squared budget violation.
        budget_cost: ``"units"`` spends the budget in equal units (the paper);
            ``"flops"`` in prefill FLOPs of the cost model at the prompt's length.
        prumerge: reduce the visual tokens with PruMerge before the LLM (the
            reference's rule: ``model.prumerge``).
        prumerge_neighbors: other tokens (kept or pruned) merged into each kept one
            (the reference: 32).
        image_aspect_ratio: ``"pad"``: ``python -m model.generate`` pads each image to
            a square of the image processor's mean colour before preprocessing, as
            LLaVA-1.5 does (converted checkpoints set it); ``None``: as given.
        system_prompt: text ``python -m model.generate`` puts before ``USER:`` (converted
            checkpoints: LLaVA-1.5's); ``None``: no system prompt (the llava-hf format).

    The remaining arguments are ``LlavaConfig``'s.
    """

    model_type = "adallava"

    def __init__(
        self,
        switch_kind: str = "L",
        prefix_layers: int | None = None,
        head_rank: int = 8,
        gumbel_tau: float = 5.0,
        latency_freqs: int = 128,
        scheduler_mode: str = "probabilistic",
        latency_penalty: float = 1.0,
        budget_cost: str = "units",
        prumerge: bool = False,
        prumerge_neighbors: int = 32,
        image_aspect_ratio: str | None = None,
        system_prompt: str | None = None,
        **kwargs,
    ) -> None:
        if switch_kind not in ("L", "H"):
            raise ValueError(f"switch_kind must be 'L' or 'H', got {switch_kind!r}")
        if scheduler_mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler_mode must be one of {SCHEDULER_MODES}, got {scheduler_mode!r}")
        if budget_cost not in BUDGET_COSTS:
            raise ValueError(f"budget_cost must be one of {BUDGET_COSTS}, got {budget_cost!r}")
        if not gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau!r}")
        check_int("latency_freqs", latency_freqs, positive_wording=True)
        self.switch_kind = switch_kind
        self.prefix_layers = prefix_layers
        self.head_rank = head_rank
        self.gumbel_tau = float(gumbel_tau)
        self.latency_freqs = latency_freqs
        self.scheduler_mode = scheduler_mode
        self.latency_penalty = float(latency_penalty)
        self.budget_cost = budget_cost
        self.prumerge = bool(prumerge)
        self.prumerge_neighbors = prumerge_neighbors
        if image_aspect_ratio not in (None, "pad"):
            raise ValueError(f"image_aspect_ratio must be None or 'pad', got {image_aspect_ratio!r}")
        self.image_aspect_ratio = image_aspect_ratio
        self.system_prompt = system_prompt
        super().__init__(**kwargs)

    @property
    def shape(self) -> ModelShape:
        """The language model's dimensions."""
        return ModelShape.from_hf_config(self.text_config)

    @property
    def scheme(self) -> UnitScheme:
        """How the budget divides the language model into units (checks prefix_layers and head_rank)."""
        shape = self.shape
        prefix = shape.num_layers // 2 if self.prefix_layers is None else self.prefix_layers
        return UnitScheme(self.switch_kind, shape, prefix, self.head_rank)


class _ModelTypeFilter(logging.Filter):
    """Drops transformers' model-type mismatch warning when one side is AdaLLaVA's ``adallava``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("You are using a model of type") and "`adallava`" in message)


@contextlib.contextmanager
def quiet_model_type_warning():
    """Silence, while loading, the one transformers warning that every AdaLLaVA load would print.

    transformers warns when a config.json of one model type is read by a config class of another. Both
    happen by design here: ``AdaLlavaForConditionalGeneration.from_pretrained`` reads llava-hf
    checkpoints (``llava``), and a processor's tokenizer loader reads an AdaLLaVA checkpoint's config
    with the base class (``adallava`` into ``""``). Only that warning, only inside the block, and only
    when ``adallava`` is one of the two: every other message still shows.
    """
    logger = logging.getLogger("transformers.configuration_utils")
    quiet = _ModelTypeFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
