"""What a planned forward returns, and the loss it trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from adallava_kernels import ExecutionPlan

__all__ = ["AdaLlavaOutput", "IGNORE_INDEX", "next_token_loss"]

# The label of a position that is not trained on (the prompt, the latency token), as transformers.
IGNORE_INDEX = -100


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


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the next token over the answer labels."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
