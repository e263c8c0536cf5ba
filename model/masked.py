"""The masked forward: AdaLLaVA's training path, and the reference the runtime is tested against.

It runs transformers' own decoder layers over every unit and multiplies by the switches: a head's
output (the input of ``o_proj``) by its head switch, a neuron's activation (the input of
``down_proj``) by its group's switch, and a -L layer's output is ``h + s * (layer(h) - h)``.

Why it is not the runtime's path: training needs gradients to reach the scheduler through the
switches, which are straight-through 0/1 values (Gumbel-softmax rounds), so a switched-off unit
must still be computed and multiplied by a differentiable zero; a kernel that skips it has nothing
to differentiate. So this path saves nothing: every unit is computed, then zeroed. Inference runs
the same plans through the plan runtime (``model/inference.py``), where a switched-off unit costs
nothing; the tests hold the two to the same logits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from adallava_kernels.masks import causal_mask, positions

from .outputs import AdaLlavaOutput, next_token_loss
from .scheduler import gates_from_plan, gates_from_switches, plan_from_logits, sample_switches, switch_latency

__all__ = ["SwitchGates", "masked_forward", "masked_layers"]


class SwitchGates:
    """Forward pre-hooks on every decoder layer's ``o_proj`` and ``down_proj`` that multiply their input
    by the head and neuron gates set for the layer (none set: the layer runs as transformers')."""

    def __init__(self, layers: nn.ModuleList, head_dim: int) -> None:
        self.head_dim = head_dim
        self.gates: dict[int, tuple] = {}
        for i, layer in enumerate(layers):
            layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i, 0))
            layer.mlp.down_proj.register_forward_pre_hook(self._hook(i, 1))

    def _hook(self, layer: int, which: int):
        def hook(module, args):
            gate = self.gates.get(layer, (None, None))[which]
            if gate is None:
                return None
            if which == 0:
                gate = gate.repeat_interleave(self.head_dim, dim=-1)
            return (args[0] * gate[:, None, :].to(args[0].dtype),) + args[1:]

        return hook


def masked_layers(model, h: torch.Tensor, mask2d: torch.Tensor, schedule: Callable) -> torch.Tensor:
    """Run ``model``'s decoder under switch gates; ``schedule(h)`` is called after the prefix layers and
    returns ``{layer: (layer_gate, head_gate, neuron_gate)}``. Returns the final norm's output."""
    lm = model.model.language_model
    position_ids = positions(mask2d)
    mask4d = causal_mask(mask2d, h.shape[1], h.dtype)
    rotary = lm.rotary_emb(h, position_ids)
    gates: dict[int, tuple] = {}
    hooks = model.switch_gates
    try:
        for i, layer in enumerate(model.decoder_layers):
            if i == model.scheme.prefix_layers:
                gates = schedule(h)
            layer_gate, head_gate, neuron_gate = gates.get(i, (None, None, None))
            hooks.gates[i] = (head_gate, neuron_gate)
            out = layer(h, attention_mask=mask4d, position_ids=position_ids, position_embeddings=rotary)
            out = out[0] if isinstance(out, tuple) else out
            h = out if layer_gate is None else h + layer_gate.to(h.dtype)[:, None, None] * (out - h)
    finally:
        hooks.gates.clear()
    return lm.norm(h)


def masked_forward(model, h, mask2d, labels, budgets, plans, where, generator, keep) -> AdaLlavaOutput:
    """The planned forward of the masked path: ``plans`` when given; else the scheduler's switches
    (training: sampled under the budgets) or plans (eval: the best under the budgets)."""
    config, scheme = model.config, model.scheme
    result = AdaLlavaOutput(logits=h, labels=labels, plans=plans, latency_positions=where)

    def schedule(hidden):
        if plans is not None:
            return gates_from_plan(plans, scheme, hidden.device, hidden.dtype)
        logits = model.scheduler(hidden[torch.arange(hidden.shape[0], device=hidden.device), where])
        if model.training:
            result.switches = sample_switches(config, logits, budgets, generator)
            if config.scheduler_mode == "deterministic":
                target = torch.tensor(budgets, dtype=torch.float32, device=logits.device)
                result.latency_penalty = ((switch_latency(result.switches, scheme) - target) ** 2).mean()
            return gates_from_switches(result.switches.to(hidden.dtype), scheme)
        result.plans = plan_from_logits(model.scheduler, config, logits, budgets, mask2d)
        return gates_from_plan(result.plans, scheme, hidden.device, hidden.dtype)

    hidden = masked_layers(model, h, mask2d, schedule)
    result.logits = model.lm_head(hidden[:, -keep:])
    if labels is not None:
        result.loss = next_token_loss(result.logits, labels)
        if result.latency_penalty is not None:
            result.loss = result.loss + config.latency_penalty * result.latency_penalty
    return result
