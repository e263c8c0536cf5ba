"""Plan: a request's plan in the form a running batch reads, made once at admission.

A :class:`RowPlan` is an :class:`~adallava_kernels.ExecutionPlan` on the
device as two boolean masks over every layer: the query heads and the MLP
neurons the plan keeps. Joining a batch copies them into the row's slot
(:mod:`.slots`); the union of a batch and each row's view of it are
derived from them on the device, so no per-unit Python work happens after
admission.
"""

from __future__ import annotations

import dataclasses

import torch

from ..plan import ExecutionPlan

__all__ = ["RowPlan"]


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """``heads`` ``[layers, heads]`` and ``neurons`` ``[layers, neurons]``: bool, 1 where the plan keeps the unit."""

    heads: torch.Tensor
    neurons: torch.Tensor

    @classmethod
    def of(cls, plan: ExecutionPlan, device: torch.device) -> "RowPlan":
        """The plan's masks on ``device`` (built once per plan and device, then shared)."""
        return cls(*plan.unit_masks(device))
