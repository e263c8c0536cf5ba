"""The budget path: AdaLLaVA's latency encoder and scheduler, beside a Llama checkpoint vLLM serves.

A plain Llama (or llava-hf) checkpoint holds no scheduler, so it cannot plan a budget below 1.0. An
AdaLLaVA checkpoint's latency encoder and scheduler are saved next to its language model by
:func:`export_for_vllm`: ``adallava_scheduler.json`` (the scheme and the latency token's id) and
``adallava_scheduler.safetensors`` (their weights). With them the served model plans each budget
request as ``model.generate`` does (model/inference.py, model/scheduler.py):

- the budget's latency token (``LatencyEncoder``: sine/cosine features of the units it buys, LayerNorm,
  Linear, GELU, Linear) stands after the prompt: the request's prompt ends with the placeholder id
  ``latency_token_id``, whose embedding the model replaces (:func:`latency_prompt` appends it), so the
  token is a position of the sequence, in vLLM's KV cache, as in ``model.generate``;
- the scheduler reads that token's hidden state after the ``prefix_layers`` layers, and the plan is
  :func:`adallava_kernels.best_plan` of its logits (``budget_cost="flops"``: priced at the prompt's
  length with the latency token; ``scheduler_mode="deterministic"``: the logits' signs).

The plan is made once per (budget, prompt) by a dense pass over the prompt's prefix layers, so it is
the same whether vLLM prefills the prompt in one step or in chunks, and again the same when a preempted
request is recomputed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..budget import UnitScheme, best_plan, check_budget
from ..plan import ExecutionPlan
from ..shape import ModelShape

__all__ = ["SCHEDULER_CONFIG", "SCHEDULER_WEIGHTS", "BudgetPlanner", "SchedulerConfig", "export_for_vllm",
           "latency_prompt", "load_planner"]

SCHEDULER_CONFIG = "adallava_scheduler.json"
SCHEDULER_WEIGHTS = "adallava_scheduler.safetensors"


@dataclass(frozen=True)
class SchedulerConfig:
    switch_kind: str
    prefix_layers: int
    head_rank: int
    latency_freqs: int
    budget_cost: str
    scheduler_mode: str
    latency_token_id: int

    def scheme(self, shape: ModelShape) -> UnitScheme:
        return UnitScheme(self.switch_kind, shape, self.prefix_layers, self.head_rank)


def latency_prompt(prompt_token_ids: list[int], latency_token_id: int) -> list[int]:
    """A budget request's prompt: ``prompt_token_ids`` followed by the latency token's placeholder."""
    return list(prompt_token_ids) + [latency_token_id]


class BudgetPlanner(nn.Module):
    """The latency encoder and the scheduler of an AdaLLaVA checkpoint, planning one request at a time."""

    def __init__(self, config: SchedulerConfig, shape: ModelShape) -> None:
        super().__init__()
        self.config, self.shape = config, shape
        self.scheme = config.scheme(shape)
        hidden, freqs = shape.hidden_size, config.latency_freqs
        self.encoder = nn.Sequential(nn.LayerNorm(2 * freqs), nn.Linear(2 * freqs, hidden), nn.GELU(),
                                     nn.Linear(hidden, hidden))
        per_layer = 1 if self.scheme.kind == "L" else 2 * shape.num_heads
        self.proj = nn.Linear(hidden, self.scheme.switchable_layers * per_layer)

    def latency_token(self, budget: float) -> torch.Tensor:
        """``[hidden]``: the budget's token (model/scheduler.py's LatencyEncoder)."""
        scheme = self.scheme
        level = scheme.units_for_budget(check_budget(budget)) / (scheme.switchable_layers * scheme.units_per_layer + 1)
        weight = self.encoder[1].weight
        n = self.config.latency_freqs
        freqs = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float32, device=weight.device) / n)
        angles = torch.tensor([level], dtype=torch.float32, device=weight.device)[:, None] * (2 * math.pi) * freqs
        return self.encoder(torch.cat([angles.sin(), angles.cos()], -1).to(weight.dtype))[0]

    def plan(self, latency_hidden: torch.Tensor, budget: float, num_tokens: int) -> ExecutionPlan:
        """The plan of the latency token's hidden state after the prefix layers (model.generate's rule)."""
        scheme, shape = self.scheme, self.shape
        logits = self.proj(latency_hidden.to(self.proj.weight.dtype)).float()
        if scheme.kind == "H":
            logits = logits.view(scheme.switchable_layers, 2, shape.num_heads)
        if self.config.scheduler_mode == "deterministic":
            on = (logits > 0).cpu()
            if scheme.kind == "L":
                return ExecutionPlan.from_layer_mask([1] * scheme.prefix_layers + on.int().tolist(), shape)
            prefix = torch.ones(scheme.prefix_layers, 2, shape.num_heads, dtype=torch.bool)
            return ExecutionPlan.from_switches(torch.cat([prefix, on]), shape)
        scores = logits if scheme.kind == "L" else (logits[:, 0], logits[:, 1])
        tokens = None if self.config.budget_cost == "units" else num_tokens
        return best_plan(scheme, budget, scores, num_tokens=tokens)


def load_planner(directory: str, shape: ModelShape) -> BudgetPlanner | None:
    """The planner saved in ``directory`` by :func:`export_for_vllm`, or ``None`` where there is none."""
    path = os.path.join(directory, SCHEDULER_CONFIG)
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    with open(path, encoding="utf-8") as f:
        config = SchedulerConfig(**json.load(f))
    planner = BudgetPlanner(config, shape)
    state = load_file(os.path.join(directory, SCHEDULER_WEIGHTS))
    planner.encoder.load_state_dict({k[len("latency_encoder.net."):]: v for k, v in state.items()
                                     if k.startswith("latency_encoder.net.")})
    planner.proj.load_state_dict({k[len("scheduler.proj."):]: v for k, v in state.items()
                                  if k.startswith("scheduler.proj.")})
    return planner.float().eval()


def export_for_vllm(model, directory: str, *, latency_token_id: int) -> None:
    """Save an ``AdaLlavaForConditionalGeneration``'s language model as a Llama checkpoint
    (``LlamaForCausalLM``) with its latency encoder and scheduler beside it, for the vLLM plug-in.

    ``latency_token_id``: the id that stands for the latency token in a budget request's prompt (one the
    tokenizer never produces for text: the model replaces its embedding). The vision tower is not saved:
    the plug-in serves the decoder.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = model.config
    text = config.text_config
    if not 0 <= latency_token_id < text.vocab_size:
        raise ValueError(f"latency_token_id must be in [0, {text.vocab_size}), got {latency_token_id}")
    llama = LlamaForCausalLM(text)
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    llama.load_state_dict(state, strict=False)
    llama.save_pretrained(directory)
    scheme = config.scheme
    sidecar = SchedulerConfig(scheme.kind, scheme.prefix_layers, scheme.rank, config.latency_freqs,
                              config.budget_cost, config.scheduler_mode, latency_token_id)
    with open(os.path.join(directory, SCHEDULER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(sidecar.__dict__, f, indent=1)
    weights = {f"latency_encoder.{k}": v.detach().contiguous() for k, v in model.latency_encoder.state_dict().items()}
    weights.update({f"scheduler.{k}": v.detach().contiguous() for k, v in model.scheduler.state_dict().items()})
    save_file(weights, os.path.join(directory, SCHEDULER_WEIGHTS))
