"""Cohorts: the rows of a prefill that run one layer program together.

Rows whose plans agree on a layer (the same heads and neurons) form that
layer's cohort and run it in one call: AdaLLaVA's prefix layers run as one
cohort of every row; after the scheduler, rows split into as many cohorts
as they have distinct layer plans. A skipped layer has no cohort. A
:class:`Schedule` lists per layer its :class:`Run` s (one layer program over
one cohort); the cohorts come as device row indices made in one copy
(``None``: every row), and as host row lists for plan-time work.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from .layers import LayerProgram

__all__ = ["Run", "Schedule", "attach_tables", "for_cohort", "run_layer", "build_schedule"]


@dataclasses.dataclass
class Run:
    """One layer program over one cohort."""

    program: LayerProgram
    cohort: int  # index into the schedule's cohorts; 0 is every row
    tables: torch.Tensor | None = None  # [cohort rows, kv_heads, width] int32


@dataclasses.dataclass
class Schedule:
    layers: list[list[Run]]  # per layer that runs, its runs
    cohorts: list[torch.Tensor | None]  # device row indices of each cohort (None: every row)
    rows: list[list[int]]  # the same, on the host


def build_schedule(programs: Sequence[Sequence[LayerProgram]], layers: Sequence[int], device: torch.device) -> Schedule:
    """The runs of ``layers`` for a batch whose row ``b`` runs ``programs[b][layer]`` (a skipped layer runs
    nothing)."""
    batch = len(programs)
    index: dict[tuple[int, ...], int] = {tuple(range(batch)): 0}
    by_layer = []
    for layer in layers:
        runs_of: dict[int, tuple[LayerProgram, list[int]]] = {}
        for b in range(batch):
            program = programs[b][layer]
            runs_of.setdefault(id(program), (program, []))[1].append(b)
        by_layer.append([Run(program, index.setdefault(tuple(rows), len(index)))
                         for program, rows in runs_of.values() if program.runs_attention or program.runs_mlp])
    host_rows = [list(rows) for rows, _ in sorted(index.items(), key=lambda item: item[1])]
    cohorts: list = [None]
    if len(host_rows) > 1:
        flat = torch.tensor([r for rows in host_rows[1:] for r in rows], dtype=torch.long)
        cohorts += list(flat.to(device).split([len(rows) for rows in host_rows[1:]]))
    return Schedule(by_layer, cohorts, host_rows)


def attach_tables(
    schedule: Schedule, page_table: Callable[[Hashable, int], torch.Tensor], seq_ids: Sequence[Hashable], width: int,
) -> None:
    """Each run's block tables ``[cohort rows, kv_heads, width]`` (``page_table(seq_id, layer)``, stacked on
    the device, padded to ``width`` pages)."""
    for runs in schedule.layers:
        for run in runs:
            if not run.program.runs_attention:
                continue
            layer = run.program.index
            run.tables = torch.stack([_padded(page_table(seq_ids[b], layer), width) for b in schedule.rows[run.cohort]])


def _padded(table: torch.Tensor, width: int) -> torch.Tensor:
    return table if table.shape[1] == width else F.pad(table, (0, width - table.shape[1]))


def for_cohort(inputs, rows: torch.Tensor | None):
    """``inputs`` (a PrefillInputs or DecodeInputs) for the cohort's rows only (``None``: every row)."""
    if rows is None:
        return inputs
    values = (getattr(inputs, f.name) for f in dataclasses.fields(inputs))
    return type(inputs)(*(None if t is None else t.index_select(0, rows) for t in values))


def run_layer(h: torch.Tensor, runs: list[Run], cohorts: list, run_one) -> torch.Tensor:
    """One layer over every row: each run on its cohort (``h`` untouched by a skipped layer)."""
    if len(runs) == 1 and runs[0].cohort == 0:
        return run_one(runs[0], h)
    out = h
    for run in runs:
        rows = cohorts[run.cohort]
        part = h if rows is None else h.index_select(0, rows)
        part = run_one(run, part)
        out = part if rows is None else out.index_copy(0, rows, part)
    return out
