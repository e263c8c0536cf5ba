"""Figures of a benchmark run, drawn from its ``results.json`` alone, so any past run can be redrawn.

    python -m bench.plot RESULTS.json [--out DIR]

- ``plot.png``, the headline: for prefill and for one decode step, each
  plan's measured time relative to the full plan against its FLOPs relative
  to the full plan, families in colour (filled: wall time; hollow: GPU time
  where measured), with the ideal diagonal and a band of +-10% around it;
- ``latency.png``: time to first token, time per output token and end-to-end
  latency against the budget, one line per family, with each family's ideal
  (its plans' FLOPs ratio times the full plan's time, dashed) and the references;
- ``ops.png`` (then ``ops-2.png``, ...): time against predicted FLOPs for each
  op case, at most 12 panels per image, one kind of op per image;
- ``kv.png``: the KV bytes one sequence takes per plan, measured and as the
  cost model predicts, and the append and gather bandwidth against a copy;
- ``serve.png``: the host time of each serving event per batch size, the
  batch over the graph-key trace with each key's first step, and the GPU
  trace's mixed / full ratio, predicted and (on a GPU) measured;
- ``kernels.png``: each profiled layer's time by sub-block.

A section the run holds but no figure can draw (it failed, or has no rows) is
named in one line, ``no figure for section NAME: why``; a run with nothing to
draw at all is refused in one line, exit status 2.

Reads the current format and the first GPU run's (``bench/results/h100-2026-11-23``),
whose model rows hold ``seconds`` instead of ``median_s`` and have no full-plan row.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from adallava_kernels.checks import check_output_dir
from adallava_kernels.cli import ArgumentParser, checked

from ._common import flops_unit, ideal_ratio, load_results, row_seconds
from .report import REFERENCE, role_of

PANELS_PER_PAGE = 12
BAND = 0.10
FAMILY_COLORS = {
    "AdaLLaVA-L": "tab:blue", "AdaLLaVA-H": "tab:orange", "early-exit": "tab:green",
    "random-L": "tab:purple", "random-H": "tab:brown",
}
# One colour per provider across every op page: the library's Triton kernels in red.
SERIES_COLORS = {
    "triton": "tab:red", "index_select": "tab:blue", "sdpa_gathered": "tab:blue", "pregathered": "tab:green",
    "flash_attn": "tab:green", "zero_mask": "tab:gray",
}
DENSE = "dense (transformers)"
FULL = "full plan"
OP_KINDS = {"mlp": "masked MLP", "attention": "masked attention"}
LATENCY_PANELS = (("ttft", "time to first token"), ("tpot", "time per output token"), ("e2e", "end-to-end latency"))


# -- the data each figure draws ------------------------------------------------

def _full_rows(rows: list[dict]) -> dict[str, dict]:
    """Per stage, the row every ratio is taken to: the full plan, else ``L 1.00``, else the largest-FLOPs plan."""
    full = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        planned = [r for r in rows if r["stage"] == stage and r["family"] != DENSE]
        by_family = [r for r in planned if r["family"] == FULL] or [r for r in planned if r["label"] == "L 1.00"]
        full[stage] = by_family[0] if by_family else max(planned, key=lambda r: r["flops"])
    return full


def headline_data(results: dict) -> dict[str, dict]:
    """Per stage: ``families`` {family: [point]} with one point per plan, and the ``dense`` reference point.

    A point holds the plan's label, ``flops_ratio``, ``wall_ratio`` and
    ``gpu_ratio`` (``None`` where the GPU time was not measured), all relative
    to the full plan of the same stage.
    """
    rows = results.get("model_runs", {}).get("rows", [])
    if not rows:
        raise ValueError("results have no model_runs rows: the headline figure needs the model section")
    data = {}
    for stage, ref in _full_rows(rows).items():
        ref_gpu = ref.get("gpu_s")

        def point(r):
            gpu = r.get("gpu_s")
            return {"label": r["label"], "flops_ratio": r["flops"] / ref["flops"],
                    "wall_ratio": row_seconds(r) / row_seconds(ref),
                    "gpu_ratio": gpu / ref_gpu if gpu is not None and ref_gpu else None}

        families: dict[str, list[dict]] = {}
        dense = None
        for r in rows:
            if r["stage"] != stage or r["family"] == FULL:
                continue
            if r["family"] == DENSE:
                dense = point(r)
            else:
                families.setdefault(r["family"], []).append(point(r))
        data[stage] = {"families": families, "dense": dense}
    return data


def latency_data(results: dict) -> dict[str, dict]:
    """Per metric (ttft, tpot, e2e): ``families`` {family: [(budget, ms)]}, the references' ms and the
    ``ideal`` {family: [(budget, FLOPs ratio * full ms)]}, the ratio its plan predicts for the metric."""
    rows = results.get("latency", {}).get("rows", [])
    if not rows:
        raise ValueError("results have no latency rows: the latency figure needs the latency section")
    data = {}
    for metric, _ in LATENCY_PANELS:
        families: dict[str, list[tuple[float, float]]] = {}
        ratios: dict[str, list[tuple[float, float]]] = {}
        refs = {}
        for r in rows:
            ms = r[metric]["median_s"] * 1e3
            if r["family"] in (FULL, DENSE):
                refs[r["family"]] = ms
            else:
                families.setdefault(r["family"], []).append((r["budget"], ms))
                ratios.setdefault(r["family"], []).append((r["budget"], ideal_ratio(r, metric)))
        ideal = ({f: sorted((b, ratio * refs[FULL]) for b, ratio in points) for f, points in ratios.items()}
                 if FULL in refs else {})
        data[metric] = {"families": {f: sorted(p) for f, p in families.items()}, "full": refs.get(FULL),
                        "dense": refs.get(DENSE), "ideal": ideal}
    return data


def op_pages(rows: Sequence[dict], per_page: int = PANELS_PER_PAGE) -> list[tuple[str, list[str]]]:
    """The op cases of the validation rows, as pages of at most ``per_page``: (kind, ops) each, one kind a page.
    End-to-end ops are left to the headline figure."""
    by_kind: dict[str, list[str]] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        kind = op.split(" ", 1)[0]
        if kind != "model":
            by_kind.setdefault(kind, []).append(op)
    return [(kind, ops[i:i + per_page]) for kind, ops in by_kind.items() for i in range(0, len(ops), per_page)]


# -- drawing --------------------------------------------------------------------

def _figure(width: float, height: float):
    # The Agg canvas renders off-screen without touching pyplot's global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _run_title(results: dict, with_model: bool = True) -> str:
    meta = results.get("meta", {})
    model = f"{results.get('model', '?')}, " if with_model else ""
    return (f"{model}{meta.get('dtype', '?')}, {meta.get('device', '?')} "
            f"(commit {str(meta.get('commit', '?'))[:12]}, {str(meta.get('date', '?'))[:10]})")


def _suptitle(fig, title: str, detail: str) -> None:
    """``title`` over ``detail``, wrapped to the figure's width (about 16 characters an inch at this size)."""
    width = int(fig.get_figwidth() * 16)
    fig.suptitle("\n".join([textwrap.fill(title, width), textwrap.fill(detail, width)]), fontsize="medium")


def _shared_legend(fig, axes) -> None:
    """One legend for every panel, below them, so that no point hides behind it."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=4, fontsize="small")


def _color(family: str) -> str:
    return FAMILY_COLORS.get(family, "tab:gray")


def draw_headline(results: dict, path: Path | None = None):
    """``plot.png``: time ratio against FLOPs ratio, one point per plan; returns the figure."""
    data = headline_data(results)
    fig = _figure(6.5 * len(data), 6.0)
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    stage_names = {"prefill": "prefill", "decode": "one decode step"}
    for ax, (stage, stage_data) in zip(axes, data.items()):
        points = [p for ps in stage_data["families"].values() for p in ps]
        ratios = [p["flops_ratio"] for p in points] + [1.0]
        lo = max(0.0, min(ratios) - 0.05)
        x = np.linspace(lo, 1.05, 50)
        ax.fill_between(x, (1 - BAND) * x, (1 + BAND) * x, color="0.85", label=f"ideal ±{BAND:.0%}")
        ax.plot(x, x, "k--", lw=1, label="ideal: time ratio = FLOPs ratio")
        has_gpu = False
        for family, fam_points in stage_data["families"].items():
            fx = [p["flops_ratio"] for p in fam_points]
            ax.plot(fx, [p["wall_ratio"] for p in fam_points], "o", color=_color(family), ms=7, alpha=0.85,
                    label=f"{family} (wall)", gid=f"plans:{stage}:{family}")
            gpu = [(p["flops_ratio"], p["gpu_ratio"]) for p in fam_points if p["gpu_ratio"] is not None]
            if gpu:
                has_gpu = True
                gx, gy = zip(*gpu)
                ax.plot(gx, gy, "o", mfc="none", mec=_color(family), ms=7, gid=f"gpu:{stage}:{family}")
        ax.plot([1.0], [1.0], "kX", ms=9, label="full plan (the anchor)")
        dense = stage_data["dense"]
        if dense is not None:
            ax.plot([dense["flops_ratio"]], [dense["wall_ratio"]], "k*", ms=13,
                    label="transformers dense (reference, wall)")
        if has_gpu:
            ax.plot([], [], "o", mfc="none", mec="0.3", label="hollow: GPU time")
        ax.set(title=f"{stage_names.get(stage, stage)}: does the time follow the FLOPs?",
               xlabel="FLOPs ratio to the full plan", ylabel="measured time ratio to the full plan")
        ax.set_xlim(lo, 1.05)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    _suptitle(fig, "Every plan against the full plan through the kernels", _run_title(results))
    if path is not None:
        _save(fig, path)
    return fig


def draw_latency(results: dict, path: Path | None = None):
    """``latency.png``: latency against the budget, one line per family per metric; returns the figure."""
    data = latency_data(results)
    rows = results["latency"]["rows"]
    fig = _figure(6.0 * len(LATENCY_PANELS), 5.0)
    axes = fig.subplots(1, len(LATENCY_PANELS), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, LATENCY_PANELS):
        metric_data = data[metric]
        for family, points in metric_data["families"].items():
            budgets, ms = zip(*points)
            ax.plot(budgets, ms, "o-", color=_color(family), label=family, gid=f"family:{metric}:{family}")
            spread = [(r["budget"], r[metric]["q1_s"] * 1e3, r[metric]["q3_s"] * 1e3)
                      for r in rows if r["family"] == family and "q1_s" in r[metric]]
            if spread:
                b, lo, hi = zip(*spread)
                ax.vlines(b, lo, hi, color=_color(family), lw=3, alpha=0.4)
        for i, (family, points) in enumerate(metric_data["ideal"].items()):
            ib, ims = zip(*points)
            ax.plot(ib, ims, "--", color=_color(family), lw=1, gid=f"ideal:{metric}:{family}",
                    label="dashed: ideal, FLOPs ratio x full plan" if i == 0 else None)
        if metric_data["full"] is not None:
            ax.axhline(metric_data["full"], color="0.4", ls=":", label="full plan (reference)")
        if metric_data["dense"] is not None:
            ax.axhline(metric_data["dense"], color="k", ls="-.", lw=1, label="transformers dense (reference)")
        ax.set(title=title, xlabel="latency budget", ylabel="ms (median; bars: IQR)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    first = rows[0]
    _suptitle(fig, f"Request latency: {first['prompt_tokens']} prompt tokens, {first['new_tokens']} new tokens",
              _run_title(results))
    if path is not None:
        _save(fig, path)
    return fig


def _ops_panel(ax, op: str, rows: list[dict]) -> None:
    scale, unit = flops_unit(max(r["flops"] for r in rows))
    for series in dict.fromkeys(r["series"] for r in rows):
        measured = [r for r in rows if r["series"] == series]
        role = measured[0].get("role") or role_of(series)
        x = np.array([r["flops"] for r in measured]) / scale
        ms = np.array([r["seconds"] for r in measured]) * 1e3
        (points,) = ax.plot(x, ms, "o", color=SERIES_COLORS.get(series), label=f"{series}: {role}",
                            gid=f"series:{op}:{series}")
        gpu = [(xi, r["gpu_seconds"] * 1e3) for xi, r in zip(x, measured) if r.get("gpu_seconds") is not None]
        if gpu:
            gx, gy = zip(*gpu)
            ax.plot(gx, gy, "o", mfc="none", mec=points.get_color())
        if role != REFERENCE:
            ref = int(np.argmax(x))
            ax.plot([0.0, x[ref]], [0.0, ms[ref]], "--", lw=1, color=points.get_color())
    ax.set_title(op.split(" ", 1)[1] if " " in op else op, fontsize="medium")
    ax.set(xlabel=f"predicted {unit}", ylabel="wall ms")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


def draw_ops(results: dict, out_dir: Path) -> list[Path]:
    """``ops.png``, ``ops-2.png``, ...: one panel per op case, at most 12 a page; returns the paths."""
    rows = results.get("report", {}).get("rows", [])
    pages = op_pages(rows)
    paths = []
    for number, (kind, ops) in enumerate(pages, start=1):
        ncols = min(3, len(ops))
        nrows = math.ceil(len(ops) / ncols)
        fig = _figure(5.2 * ncols, 4.0 * nrows + 0.6)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, op in zip(axes, ops):
            _ops_panel(ax, op, [r for r in rows if r["op"] == op])
        for ax in axes[len(ops):]:
            ax.set_visible(False)
        same_kind = [p for p in pages if p[0] == kind]
        part = f" ({same_kind.index((kind, ops)) + 1} of {len(same_kind)})" if len(same_kind) > 1 else ""
        has_gpu = any(r.get("gpu_seconds") is not None for r in rows if r["op"] in ops)
        _suptitle(fig, f"{OP_KINDS.get(kind, kind)}{part}: wall time against predicted FLOPs",
                  ("filled: wall, hollow: GPU; " if has_gpu else "")
                  + f"dashed: proportional through the largest plan; {_run_title(results, False)}")
        paths.append(_save(fig, out_dir / ("ops.png" if number == 1 else f"ops-{number}.png")))
    return paths


SERVE_BATCH_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def draw_serve(results: dict, path: Path | None = None):
    """``serve.png``: the host time of each serving event per batch size (meta device, medians with IQR bars);
    the batch's rows over the graph-key trace with each key's first step marked; the mixed / full ratio the
    union cost model predicts for the GPU trace beside the measured ones (or a note that they are pending);
    returns the figure."""
    served = results["serve"]
    fig = _figure(16.0, 5.5)
    host_ax, keys_ax, ratio_ax = fig.subplots(1, 3)
    from .serve import EVENTS

    sizes = served["batch_sizes"]
    by = {(r["event"], r["batch"]): r for r in served["rows"]}
    events = [e for e in EVENTS if any((e, b) in by for b in sizes)]
    at = np.arange(len(events))
    width = 0.8 / max(len(sizes), 1)
    for i, b in enumerate(sizes):
        rows = [by.get((e, b)) for e in events]
        medians = [r["median_s"] * 1e6 if r else np.nan for r in rows]
        errors = np.array([[(r["median_s"] - r["q1_s"]) * 1e6, (r["q3_s"] - r["median_s"]) * 1e6] if r else [0, 0]
                           for r in rows]).T
        host_ax.bar(at + (i - (len(sizes) - 1) / 2) * width, medians, width=width, yerr=errors, capsize=2,
                    color=SERVE_BATCH_COLORS[i % len(SERVE_BATCH_COLORS)], label=f"B={b}", gid=f"serve:host:{b}")
    host_ax.set_yscale("log")
    host_ax.set_xticks(at, events, rotation=30, fontsize="small")
    host_ax.set(title=f"host time per event, {served['host_model']} on meta, one thread", ylabel="us (median; IQR)")
    host_ax.grid(alpha=0.3, axis="y")

    keys = served["keys"]
    rows_per_step = keys["rows_per_step"]
    keys_ax.plot(np.arange(len(rows_per_step)), rows_per_step, color="tab:blue", lw=1, label="rows per step",
                 gid="serve:rows")
    for k in keys["keys"]:
        late = k["events_before"] >= keys["warm_events"]
        keys_ax.axvline(k["first_step"], color="tab:red" if late else "0.6", lw=1, ls="--" if late else ":",
                        gid=f"serve:key:{k['bucket']}")
    keys_ax.plot([], [], color="0.6", ls=":", label="a key's first step")
    keys_ax.plot([], [], color="tab:red", ls="--", label=f"a key first seen after {keys['warm_events']} events")
    keys_ax.set(title=f"{keys['events']} join/leave events: {keys['distinct_keys']} graph keys, "
                      f"{keys['new_keys_after_warm']} new after {keys['warm_events']}",
                xlabel="decode step", ylabel="rows in the batch")
    keys_ax.title.set_fontsize("small")
    keys_ax.grid(alpha=0.3)

    predicted, gpu = served["predicted"], served.get("gpu", {})
    labels, values, colors = [f"predicted\n(roofline {predicted['roofline_device']})"], \
        [predicted["roofline_s_ratio"]], ["0.5"]
    measured = gpu.get("measured_ratio")
    if measured:
        for key, label, color in (("step_wall_priced", "measured\nstep wall", "tab:blue"),
                                  ("step_gpu_priced", "measured\nstep GPU", "tab:orange"),
                                  ("tpot_median", "measured\nTPOT", "tab:green")):
            if measured.get(key) is not None:
                labels.append(label)
                values.append(measured[key])
                colors.append(color)
    ratio_ax.bar(np.arange(len(values)), values, width=0.6, color=colors, gid="serve:ratios")
    ratio_ax.set_xlim(-0.8, len(values) - 0.2)
    for x, value in enumerate(values):
        ratio_ax.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize="small")
    ratio_ax.set_xticks(np.arange(len(values)), labels, fontsize="small")
    ratio_ax.axhline(1.0, color="k", lw=1)
    ratio_ax.set(title="GPU trace: mixed plans / every plan full", ylabel="ratio")
    if not measured:
        ratio_ax.text(0.5, 0.5, "measured: pending\n(no GPU in this run)", transform=ratio_ax.transAxes,
                      ha="center", va="center", fontsize="medium", color="tab:red")
    ratio_ax.grid(alpha=0.3, axis="y")
    _shared_legend(fig, [host_ax, keys_ax])
    _suptitle(fig, f"Serving a trace of requests under their own plans through one running batch of "
                   f"{served['capacity']} rows", _run_title(results))
    if path is not None:
        _save(fig, path)
    return fig


def _sub_blocks(layer: dict) -> dict[str, float]:
    """A profiled layer's time per sub-block (``other``: the kernels outside the wrapped ones), in us."""
    blocks: dict[str, float] = {}
    for k in layer["kernels"]:
        name = k["stage"] or "other"
        blocks[name] = blocks.get(name, 0.0) + k["seconds"] * 1e6
    return blocks


def draw_kernels(results: dict, path: Path | None = None):
    """``kernels.png``: per profiled layer and stage, its time by sub-block; returns the figure."""
    profiled = results["kernels"]
    layers = profiled["layers"]
    fig = _figure(5.0 * len(layers), 4.5)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        blocks = _sub_blocks(layer)
        ax.barh(list(blocks), list(blocks.values()), color="tab:blue", gid=f"kernels:{layer['layer']}:{layer['stage']}")
        ax.invert_yaxis()
        ax.set(title=f"{layer['layer']} layer {layer['index']}, {layer['stage']}: {layer['kernel_count']} kernels, "
                     f"{layer['total_s'] * 1e6:.1f} us", xlabel="us (sum of its kernels)")
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3, axis="x")
    _suptitle(fig, f"Per kernel: a full and a partial layer ({profiled['tokens']} prefill tokens, decode at context "
                   f"{profiled['context']}, kernels {profiled['backend']}); {profiled['time']}",
              _run_title(results))
    if path is not None:
        _save(fig, path)
    return fig


def draw_kv(results: dict, path: Path | None = None):
    """``kv.png``: the bytes one sequence takes per plan, measured and predicted, against a DynamicCache; the
    append and gather bandwidth against a copy of the same bytes; returns the figure."""
    section = results["kv_cache"]
    memory, bandwidth = section.get("memory", []), section.get("bandwidth", [])
    fig = _figure(13.0, 5.0)
    memory_ax, bandwidth_ax = fig.subplots(1, 2)
    labels = [r["cache"] if r["cache"] == "DynamicCache" else f"{r['kind']} {r['budget']:.2f}" for r in memory]
    at = np.arange(len(memory))
    memory_ax.bar(at - 0.2, [r["bytes"] / 2**20 for r in memory], width=0.4, color="tab:blue", label="bytes measured",
                  gid="kv:memory")
    memory_ax.bar(at + 0.2, [r["predicted_bytes"] / 2**20 for r in memory], width=0.4, color="tab:gray",
                  label="bytes the cost model predicts", gid="kv:predicted")
    memory_ax.set_xticks(at, labels, rotation=45, fontsize="x-small")
    memory_ax.set(title="one sequence's KV bytes per plan", ylabel="MiB")
    at = np.arange(len(bandwidth))
    bandwidth_ax.bar(at - 0.2, [r["gbps"] for r in bandwidth], width=0.4, color="tab:green", label="the op's rate",
                     gid="kv:bandwidth")
    bandwidth_ax.bar(at + 0.2, [r["copy_gbps"] for r in bandwidth], width=0.4, color="tab:olive",
                     label="copy_ of the same bytes")
    bandwidth_ax.set_xticks(at, [f"{r['model']} {r['op']}" for r in bandwidth], rotation=45, fontsize="x-small")
    bandwidth_ax.set(title="append and gather bandwidth", ylabel="GB/s")
    for ax in (memory_ax, bandwidth_ax):
        ax.grid(alpha=0.3, axis="y")
    _shared_legend(fig, [memory_ax, bandwidth_ax])
    _suptitle(fig, "Layer-skip KV cache", _run_title(results))
    if path is not None:
        _save(fig, path)
    return fig


# Per section (named as --only names it): its key in results.json, and what draws it: a figure of its own
# (file name, drawing function), or the op pages of the validation rows (None).
FIGURES = {
    "mlp": ("mlp", None),
    "attention": ("attention", None),
    "kv": ("kv_cache", ("kv.png", draw_kv)),
    "model": ("model_runs", ("plot.png", draw_headline)),
    "latency": ("latency", ("latency.png", draw_latency)),
    "serve": ("serve", ("serve.png", draw_serve)),
    "kernels": ("kernels", ("kernels.png", draw_kernels)),
}


def _has_rows(section: dict) -> bool:
    return bool(section.get("rows") or section.get("layers") or section.get("memory") or section.get("bandwidth"))


def _older_format(results: dict, name: str) -> bool:
    """A serve section of the runs before the trace (requests one by one, then one batch): not drawn."""
    return name == "serve" and "serve" in results and "keys" not in results["serve"]


def _drawable(results: dict, name: str) -> bool:
    key, figure = FIGURES[name]
    if figure is None:
        return any(r["op"].split(" ", 1)[0] == name for r in results.get("report", {}).get("rows", []))
    return key in results and _has_rows(results[key]) and not _older_format(results, name)


def not_drawn(results: dict) -> list[str]:
    """One line per section the run ran (or tried to) that no figure draws: ``section NAME: why``."""
    lines = []
    for name, (key, figure) in FIGURES.items():
        error = results.get("errors", {}).get(name)
        if error is not None:
            lines.append(f"section {name}: it failed in this run ({error['type']}: {error['message']})")
        elif key in results and not _drawable(results, name):
            why = ("results.json has no validation rows of it" if figure is None
                   else "it is in an older format (requests one by one, then one batch)"
                   if _older_format(results, name) else "it has no rows")
            lines.append(f"section {name}: {why}")
    return lines


def draw_all(results: dict, out_dir: str | Path) -> list[Path]:
    """Every figure ``results`` has data for, written to ``out_dir``; returns the paths written (what is not
    drawn, and why: :func:`not_drawn`)."""
    out_dir = Path(out_dir)
    paths = []
    for name, (_, figure) in FIGURES.items():
        if figure is not None and _drawable(results, name):
            file_name, draw = figure
            draw(results, out_dir / file_name)
            paths.append(out_dir / file_name)
    return paths + draw_ops(results, out_dir)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = ArgumentParser(prog="python -m bench.plot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", metavar="RESULTS.json", help="results.json of a run of python -m bench")
    parser.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: RESULTS's own)")
    args = parser.parse_args(argv)
    results = checked(parser, load_results, args.results, "RESULTS.json")
    out = checked(parser, check_output_dir, "--out", args.out or Path(args.results).parent)
    skipped = not_drawn(results)
    if not any(_drawable(results, name) for name in FIGURES):
        parser.error(f"RESULTS.json: {args.results} has nothing to draw"
                     + (": " + "; ".join(skipped) if skipped else " (no section with rows)"))
    paths = draw_all(results, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    for line in skipped:
        print(f"no figure for {line}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
