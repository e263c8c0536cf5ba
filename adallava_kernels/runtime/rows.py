"""Plan: a request's plan in the form a running batch reads, made once at admission.

A :class:`RowPlan` is an :class:`~adallava_kernels.ExecutionPlan` on the
device as one boolean mask over every layer: the query heads and the MLP
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
    """``units`` ``[layers, heads + neurons]`` bool: 1 where the plan keeps the unit, its query heads first;
    ``heads`` and ``neurons`` are views of it."""

    units: torch.Tensor
    num_heads: int

    @property
    def heads(self) -> torch.Tensor:
        return self.units[:, :self.num_heads]

    @property
    def neurons(self) -> torch.Tensor:
        return self.units[:, self.num_heads:]

    @classmethod
    def of(cls, plan: ExecutionPlan, device: torch.device) -> "RowPlan":
        """The plan's masks on ``device`` in one tensor (built once per request's plan, then shared)."""
        heads, neurons = plan.unit_masks(device)
        return cls(torch.cat((heads, neurons), dim=1), heads.shape[1])
