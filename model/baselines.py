"""Baselines the benchmarks compare AdaLLaVA with.

- **Early exit**: run the bottom layers and drop the top ones until the
  budget is met (no scheduler, no latency token): ``early_exit_plan``.
- **Deterministic scheduler**: the scheduler emits a hard plan (a switch is on
  where its logit is positive, straight-through) and learns the budget from a
  squared-violation penalty instead of sampling under it. It is
  ``AdaLlavaConfig(scheduler_mode="deterministic", latency_penalty=...)``;
  :func:`deterministic_config` derives it from an AdaLLaVA config.
"""

from __future__ import annotations

import math

from adallava_kernels import ExecutionPlan, ModelShape, check_budget

from .config import AdaLlavaConfig

__all__ = ["early_exit_plan", "deterministic_config"]


def early_exit_plan(shape: ModelShape, budget: float) -> ExecutionPlan:
    """The first ``floor(num_layers * budget)`` layers, whole; the rest skipped."""
    budget = check_budget(budget)
    # The epsilon keeps 0.7 * 30 = 21 from flooring to 20 on a representation error.
    keep = math.floor(shape.num_layers * budget + 1e-9)
    return ExecutionPlan.from_layer_mask([1] * keep + [0] * (shape.num_layers - keep), shape)


def deterministic_config(config: AdaLlavaConfig, latency_penalty: float = 1.0) -> AdaLlavaConfig:
    """A copy of ``config`` whose scheduler is the deterministic baseline."""
    data = config.to_dict()
    data.update(scheduler_mode="deterministic", latency_penalty=latency_penalty)
    return AdaLlavaConfig.from_dict(data)
