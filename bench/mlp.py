"""Measured wall-clock of the neuron-masked SwiGLU MLP against the dense MLP.

On a CPU the shape is the model's scaled down (hidden and intermediate divided
by ``scale``) so a run takes seconds; neurons are kept in whole groups, as
AdaLLaVA-H switches them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from adallava_kernels import ModelShape, cost, masked_mlp, neuron_groups
from adallava_kernels.cost import Precision

from ._common import format_table, median_seconds

KEEP_RATIOS = (1.0, 0.85, 0.75, 0.6, 0.5, 0.25)


def scaled(shape: ModelShape, scale: int) -> ModelShape:
    return dataclasses.replace(
        shape, hidden_size=shape.hidden_size // scale, intermediate_size=shape.intermediate_size // scale
    )


def dense_mlp(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def kept_neurons(shape: ModelShape, ratio: float, generator: torch.Generator) -> torch.Tensor:
    groups = neuron_groups(shape.intermediate_size, shape.num_heads)
    count = round(ratio * len(groups))
    chosen = torch.randperm(len(groups), generator=generator)[:count].sort().values.tolist()
    return torch.tensor([n for g in chosen for n in groups[g]], dtype=torch.int32)


def run(
    shape: ModelShape, num_tokens: int, device: torch.device, dtype: torch.dtype,
    ratios=KEEP_RATIOS, min_run_time: float = 0.2, seed: int = 0,
) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    x = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    w_gate, w_up = (torch.randn(inter, hidden, generator=generator).to(device, dtype) * hidden**-0.5 for _ in range(2))
    w_down = torch.randn(hidden, inter, generator=generator).to(device, dtype) * inter**-0.5
    precision = Precision(*(torch.finfo(dtype).bits / 8,) * 3)
    full = cost.masked_mlp_cost(shape, num_tokens, inter, precision)
    dense_s = median_seconds(lambda: dense_mlp(x, w_gate, w_up, w_down), device, min_run_time)
    rows = [_row("dense", 1.0, inter, full, full, dense_s, dense_s)]
    for ratio in ratios:
        active = kept_neurons(shape, ratio, generator).to(device)
        predicted = cost.masked_mlp_cost(shape, num_tokens, active.numel(), precision)
        seconds = median_seconds(
            lambda: masked_mlp(x, w_gate, w_up, w_down, active, backend="torch", check_indices=False),
            device, min_run_time,
        )
        rows.append(_row("masked_torch", ratio, active.numel(), predicted, full, seconds, dense_s))
    return rows


def _row(provider, ratio, neurons, predicted, full, seconds, dense_s) -> dict:
    return {
        "provider": provider,
        "keep_ratio": ratio,
        "neurons": neurons,
        "median_s": seconds,
        "tflops": predicted.flops / seconds / 1e12,
        "gbps": predicted.bytes / seconds / 1e9,
        "time_ratio": seconds / dense_s,
        "flops_ratio": predicted.flops / full.flops,
    }


COLUMNS = [
    ("provider", "provider", "s"),
    ("keep_ratio", "keep", ".2f"),
    ("neurons", "neurons", "d"),
    ("median_s", "median ms", ".3f"),
    ("tflops", "TFLOP/s", ".3f"),
    ("gbps", "GB/s", ".1f"),
    ("time_ratio", "time / dense", ".3f"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
]


def table(rows: list[dict]) -> str:
    return format_table([r | {"median_s": r["median_s"] * 1e3} for r in rows], COLUMNS)
