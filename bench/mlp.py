"""Neuron-masked SwiGLU MLP: measured time of each way to skip neurons, against the dense MLP.

Providers:
- ``dense``: the full MLP, three ``F.linear`` calls (a reference point);
- ``zero_mask``: the full MLP with inactive neurons multiplied by zero (what
  training does): the no-savings reference, shown but not judged;
- ``index_select``: gather the active weights on every call, then ``F.linear``
  (the reference AdaLLaVA inference; the library's torch backend,
  ``masked_mlp(backend="torch")``);
- ``pregathered``: ``F.linear`` on active weights gathered beforehand (the ideal when a copy is free);
- ``triton``: the library's Triton kernels, ``masked_mlp(backend="triton")``,
  reading the weights in place (CUDA only).

Neurons are kept in whole groups, as AdaLLaVA-H switches them, so a keep
ratio of 0.85 of 32 groups keeps 28 of them: the rows carry the share that ran
(``kept_share``, 0.875) beside the nominal ratio. On a CPU the model's hidden
and intermediate sizes are divided by ``scale``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from adallava_kernels import ModelShape, cost, masked_mlp, neuron_groups
from adallava_kernels.cost import Precision
from adallava_kernels.ops.layout import prepare_column_gather

from ._common import TIMING_COLUMNS, format_table, row_iqr, timing_cells
from .timing import OPS, Timing, TimingBudget, measure_op

KEEP_RATIOS = (1.0, 0.85, 0.75, 0.6, 0.5, 0.25)
GPU_TOKENS = (1, 8, 64, 700, 4096)
CPU_TOKENS = (1, 8, 64)


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


def providers(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The providers that run on ``device``, and why the others do not."""
    names = ["dense", "zero_mask", "index_select", "pregathered", "triton"]
    skipped = {}
    if device.type != "cuda":
        skipped["triton"] = "Triton kernels are timed on CUDA only (the CPU interpreter is for correctness)"
    return [n for n in names if n not in skipped], skipped


def _masked_calls(x, w_gate, w_up, w_down, w_down_prepared, active):
    idx = active.long()
    mask = torch.zeros(w_gate.shape[0], dtype=x.dtype, device=x.device)
    mask[idx] = 1
    gathered = (w_gate[idx].contiguous(), w_up[idx].contiguous(), w_down[:, idx].contiguous())
    return {
        "zero_mask": lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up) * mask, w_down),
        "index_select": lambda: masked_mlp(x, w_gate, w_up, w_down, active, backend="torch", check_indices=False),
        "pregathered": lambda: dense_mlp(x, *gathered),
        "triton": lambda: masked_mlp(x, w_gate, w_up, w_down_prepared, active, backend="triton", check_indices=False),
    }


def run_shape(
    model: str, shape: ModelShape, tokens: int, device: torch.device, dtype: torch.dtype,
    names: list[str], ratios=KEEP_RATIOS, budget: TimingBudget = OPS, seed: int = 0,
) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    x = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    w_gate, w_up = (
        (torch.randn(inter, hidden, generator=generator) * hidden**-0.5).to(device, dtype) for _ in range(2)
    )
    w_down = (torch.randn(hidden, inter, generator=generator) * inter**-0.5).to(device, dtype)
    w_down_prepared = prepare_column_gather(w_down) if "triton" in names else w_down
    precision = Precision(*(torch.finfo(dtype).bits / 8,) * 3)
    full = cost.masked_mlp_cost(shape, tokens, inter, precision)
    dense = measure_op(lambda: dense_mlp(x, w_gate, w_up, w_down), device, budget)

    def row(provider, ratio, neurons, timing: Timing, executed):
        predicted = cost.masked_mlp_cost(shape, tokens, neurons, precision)
        seconds = timing.median_s
        return {
            "model": model, "provider": provider, "tokens": tokens, "keep_ratio": ratio, "neurons": neurons,
            # What ran: neurons go in whole groups, so 0.85 of 32 groups keeps 28, a share of 0.875.
            "kept_share": neurons / inter, "flops": predicted.flops, **timing.fields(),
            "tflops": executed.flops / seconds / 1e12, "gbps": executed.bytes / seconds / 1e9,
            "time_ratio": seconds / dense.median_s, "flops_ratio": predicted.flops / full.flops,
        }

    rows = [row("dense", 1.0, inter, dense, full)]
    for ratio in ratios:
        active = kept_neurons(shape, ratio, generator).to(device)
        calls = _masked_calls(x, w_gate, w_up, w_down, w_down_prepared, active)
        executed = cost.masked_mlp_cost(shape, tokens, active.numel(), precision)
        for name in names[1:]:
            timing = measure_op(calls[name], device, budget)
            rows.append(row(name, ratio, active.numel(), timing, full if name == "zero_mask" else executed))
    return rows


COLUMNS = [
    ("model", "model", "s"),
    ("tokens", "tokens", "d"),
    ("provider", "provider", "s"),
    ("kept_share", "kept", ".3f"),
    ("neurons", "neurons", "d"),
    *TIMING_COLUMNS,
    ("tflops", "TFLOP/s", ".3f"),
    ("gbps", "GB/s", ".1f"),
    ("time_ratio", "time / dense", ".3f"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
]


def table(rows: list[dict]) -> str:
    return format_table([r | timing_cells(r) for r in rows], COLUMNS)


def report_rows(rows: list[dict]) -> list[dict]:
    """The masked providers' rows in the validation report's form, one op per model and token count."""
    return [
        {"op": f"mlp {r['model']} {r['tokens']} tok", "series": r["provider"], "label": f"keep {r['kept_share']:.3f}",
         "flops": r["flops"], "seconds": r["median_s"], "iqr_seconds": row_iqr(r), "gpu_seconds": r["gpu_s"],
         "unstable": r["unstable"]}
        for r in rows if r["provider"] != "dense"
    ]
