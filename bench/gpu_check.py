"""``python -m bench.gpu_check`` (the bench half of ``make gpu-check``): does the model follow its FLOPs here?

The model section of the benchmark (``bench/model.py``) at one shape,
``llava-7b`` on CUDA (``tiny`` on a CPU, so that the same path runs in the
test suite), under a reduced plan set: the full plan, AdaLLaVA-L and -H at
budgets 0.5, 0.75 and 1.0, and two random -H plans. It prints one table, per
plan: prefill and decode wall and GPU time and GPU / wall; under it, per
stage, the Pearson r of FLOPs with wall and with GPU time and the worst
deviation from proportionality (``bench/report.py``); then the full plan's
decode step against the bandwidth floor: the bytes the step must read
(``adallava_kernels.cost``) over the rate of a device-to-device copy measured
in the same run; last, where the host's time goes in the prefill of the full
plan, of a -H plan and of the plan whose prefill wall time is the largest
multiple of its GPU time (``bench/host.py``: when the call returns against its
wall time, the synchronisations, a profile). ``results.json`` is rewritten
after every plan, so a run cut short keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adallava_kernels import PRESETS, ExecutionPlan, get_device, get_shape
from adallava_kernels.checks import check_backend, check_output_dir
from adallava_kernels.cli import ArgumentParser, checked

from . import model as model_bench
from . import report, timing
from .host import host_profile, host_text
from ._common import (DTYPES, checked_device, default_dtype, error_record, flops_text, format_table, metadata,
                      positive, progress, roofline_device, si_text, timing_cells, write_json)

BUDGETS = (0.5, 0.75, 1.0)
RANDOM_PLANS = 2
# The copy that measures the device's rate: as many bytes as the step reads, up to 1 GiB (far past any cache).
COPY_MOST_BYTES = 2**30
DEFAULT_OUT = Path("bench/out/gpu-check")


def reduced_plans(shape, seed: int = 0) -> list[tuple]:
    """``(family, label, plan)``: the full plan, -L and -H at :data:`BUDGETS` and :data:`RANDOM_PLANS` random -H
    plans, as ``bench.model.plans`` builds them."""
    return [(model_bench.FULL, "full", ExecutionPlan.full(shape)),
            *model_bench.plans(shape, list(BUDGETS), RANDOM_PLANS, seed, early_exit=False, random_kinds=("H",))]


# The -H plan an A/B (--plans ab) times beside the full plan: its partial layers' kernels are half as long,
# so a fixed cost per kernel weighs most there.
AB_PLAN = "H 0.50"


def chosen_plans(shape, which: str) -> list[tuple]:
    """The ``(family, label, plan)`` entries ``--plans which`` times."""
    plans = reduced_plans(shape)
    if which == "reduced":
        return plans
    return plans[:1] + ([p for p in plans if p[1] == AB_PLAN] if which == "ab" else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="model shape (default llava-7b on CUDA, tiny on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=positive(int), default=None,
                        help=f"prefill length (default {model_bench.GPU_TOKENS} on CUDA, {model_bench.CPU_TOKENS} on "
                             f"CPU)")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                        help="kernels the model runs (default auto: Triton on CUDA)")
    parser.add_argument("--roofline-device", type=roofline_device, default="H200",
                        help="device the rows' roofline time is predicted for (default H200)")
    parser.add_argument("--quick", action="store_true", help="2 repetitions a case, to check that everything runs")
    parser.add_argument("--plans", choices=["reduced", "full", "ab"], default="reduced",
                        help="reduced: the full plan, -L and -H at each budget and the random -H plans (default); "
                             "full: the full plan alone and its floor; ab: the full plan and its floor, then the "
                             f"{AB_PLAN} plan (an A/B of a launch setting)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory of results.json, rewritten after every plan (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.device = checked_device(parser, args.device)
    checked(parser, check_backend, "--backend", args.backend, args.device)
    # Last, and creating nothing: results.json is written after the first plan, minutes in on a GPU.
    args.out = checked(parser, check_output_dir, "--out", args.out)
    return args


def run(args: argparse.Namespace) -> dict:
    """Time every plan of :func:`reduced_plans`, then the copy; ``results.json`` after each. A plan that fails
    ends the timing: its error is recorded and what finished is still summarised."""
    device, on_gpu = args.device, args.device.type == "cuda"
    dtype = default_dtype(args.dtype, device)
    model_name = args.model or ("llava-7b" if on_gpu else "tiny")
    shape = get_shape(model_name)
    tokens = args.tokens or (model_bench.GPU_TOKENS if on_gpu else model_bench.CPU_TOKENS)
    budget, op_budget = (timing.QUICK, timing.QUICK) if args.quick else (timing.END_TO_END, timing.OPS)
    results = _header(device, dtype, model_name, shape, tokens, args.backend, budget)

    def save() -> None:
        write_json(args.out / "results.json", results)

    bench = model_bench.setup(shape, model_name, device, dtype, get_device(args.roofline_device), tokens,
                              args.backend, budget)
    rows = results["model_runs"]["rows"]
    try:
        chosen = chosen_plans(shape, args.plans)
        for family, label, plan in progress(chosen, f"gpu-check {model_name}"):
            rows += model_bench.plan_rows(bench, family, label, plan)
            save()
    except Exception as error:  # noqa: BLE001 - the plans that finished are still summarised
        results["errors"]["model"] = error_record(error)
    results["model_runs"]["graphs"] = bench.model.runtime(args.backend).graph_stats()
    full_decode = next((r for r in rows if r["family"] == model_bench.FULL and r["stage"] == "decode"), None)
    if full_decode is not None:
        results["floor"] = bandwidth_floor(full_decode, device, dtype, op_budget)
    results["check"] = check(rows, args.backend)
    results["check_by_family"] = {kind: check(family_rows(rows, kind), args.backend) for kind in FAMILY_GROUPS}
    results["proportional"] = proportional(rows)
    save()
    if args.plans != "reduced":
        return results
    try:
        results["distinct_plans"] = distinct_plan_captures(bench, args.backend, DISTINCT_PLANS)
    except Exception as error:  # noqa: BLE001 - the timings above are kept
        results["errors"]["distinct_plans"] = error_record(error)
    save()
    try:
        results["host_profile"] = prefill_host_profiles(bench, args.backend, chosen, rows)
    except Exception as error:  # noqa: BLE001 - the timings above are kept
        results["errors"]["host_profile"] = error_record(error)
    save()
    return results


# The plans whose prefill's host time is always profiled: the full plan (dense kernels) and a -H plan (gathers).
HOST_PROFILED = ("full", "H 0.50")


def host_profiled(rows: list[dict]) -> list[str]:
    """The plans whose prefill :func:`prefill_host_profiles` profiles: :data:`HOST_PROFILED`, then the plan whose
    prefill wall time is the largest multiple of its GPU time in this run (where GPU time was measured), the
    case the profile is for."""
    labels = [label for label in HOST_PROFILED if any(r["label"] == label for r in rows)]
    timed = [r for r in rows if r["stage"] == "prefill" and r.get("gpu_s") and r["label"] not in labels]
    if timed:
        labels.append(max(timed, key=lambda r: r["median_s"] / r["gpu_s"])["label"])
    return labels


def prefill_host_profiles(bench, backend: str, chosen: list[tuple], rows: list[dict]) -> dict:
    """Per plan of :func:`host_profiled`, where its prefill's host time goes (:func:`bench.host.host_profile`):
    a prefill whose wall time is far above its GPU time is the host's."""
    plans = {label: plan for _, label, plan in chosen}
    return {label: host_profile(model_bench.prefill_call(bench.model, bench.ids, plans[label], backend), bench.device)
            for label in host_profiled(rows) if label in plans}


# The plan families r is taken over apart: -L plans (whole layers) and -H plans (heads and neurons), each
# with the full plan as its anchor.
FAMILY_GROUPS = {"L": ("AdaLLaVA-L",), "H": ("AdaLLaVA-H", "random-H")}
# Distinct -H plans decoded one after another to count graph captures after the first.
DISTINCT_PLANS = 16


def family_rows(rows: list[dict], kind: str) -> list[dict]:
    """The full plan's rows and those of the families of ``kind`` (a key of :data:`FAMILY_GROUPS`)."""
    return [r for r in rows if r["family"] == model_bench.FULL or r["family"] in FAMILY_GROUPS[kind]]


def proportional(rows: list[dict]) -> list[dict]:
    """Per plan and stage: its FLOPs ratio to the full plan, its wall and GPU time ratios, their deviation from
    proportional (time ratio / FLOPs ratio - 1) and wall / GPU."""
    full = {r["stage"]: r for r in rows if r["family"] == model_bench.FULL}
    out = []
    for r in rows:
        ref = full.get(r["stage"])
        if ref is None or r["family"] == model_bench.FULL:
            continue
        ratio = r["flops"] / ref["flops"]
        wall = r["median_s"] / ref["median_s"]
        gpu = r["gpu_s"] / ref["gpu_s"] if r["gpu_s"] and ref["gpu_s"] else None
        out.append({"stage": r["stage"], "family": r["family"], "label": r["label"], "flops_ratio": ratio,
                    "wall_ratio": wall, "gpu_ratio": gpu, "wall_deviation": wall / ratio - 1 if ratio else None,
                    "gpu_deviation": gpu / ratio - 1 if gpu is not None and ratio else None,
                    "wall_over_gpu": r["median_s"] / r["gpu_s"] if r["gpu_s"] else None})
    for r in full.values():
        out.append({"stage": r["stage"], "family": r["family"], "label": r["label"], "flops_ratio": 1.0,
                    "wall_ratio": 1.0, "gpu_ratio": 1.0 if r["gpu_s"] else None, "wall_deviation": 0.0,
                    "gpu_deviation": 0.0 if r["gpu_s"] else None,
                    "wall_over_gpu": r["median_s"] / r["gpu_s"] if r["gpu_s"] else None})
    return out


def distinct_plan_captures(bench, backend: str, count: int) -> dict:
    """Decode ``count`` distinct random -H plans one after another, two steps each, through the model's runtime:
    the graph captures (and replays) after the first request, which warms up its step shapes. A runtime
    that keys graphs by shape, not by plan, captures nothing more."""
    import random

    rng = random.Random(1)
    plans = [model_bench._random_plan(bench.shape, "H", rng) for _ in range(count + 1)]
    fingerprints = {p.fingerprint for p in plans}
    runtime = bench.model.runtime(backend)
    counts = []
    for plan in plans:
        request = bench.model.start_request(bench.ids, latency_budget=1.0, plan=plan, max_new_tokens=4, backend=backend)
        batch = request.runtime.decode(request.seq_ids)
        token = request.logits[:, -1].argmax(-1)
        try:
            for _ in range(2):
                token = batch.step(token)[1]
        finally:
            batch.close()
            request.free()
        counts.append(runtime.graph_stats())
    first, last = counts[0], counts[-1]
    if not first.get("enabled"):
        return {"plans": count, "distinct": len(fingerprints) - 1, "graphs": False, "captures_after_first": None}
    return {"plans": count, "distinct": len(fingerprints) - 1, "graphs": True,
            "captures_after_first": last["captures"] - first["captures"],
            "replays_after_first": last["replays"] - first["replays"]}


def _header(device, dtype, model_name, shape, tokens, backend, budget) -> dict:
    """What results.json holds before the first plan: the run's metadata and an empty ``model_runs``."""
    return {
        "meta": metadata(device, dtype, "bench.gpu_check"), "device_type": device.type, "model": model_name,
        "shape": shape.to_dict(), "sections": ["model"], "budgets": list(BUDGETS), "random_plans": RANDOM_PLANS,
        "timing": {"end_to_end": vars(budget) | {"rule": budget.describe()}, "iqr_limit": timing.IQR_LIMIT},
        "model_runs": {"shape": shape.to_dict(), "tokens": tokens, "backend": backend, "rows": []},
        "errors": {},
    }


def bandwidth_floor(decode_row: dict, device: torch.device, dtype: torch.dtype, budget: timing.TimingBudget) -> dict:
    """The decode step against the time its reads take at the rate of a device-to-device copy of this run."""
    element = torch.finfo(dtype).bits // 8
    elements = int(min(decode_row["read_bytes"], COPY_MOST_BYTES)) // element
    copy = timing.measure_copy(elements, device, dtype, budget)
    # A copy reads and writes each byte: its rate is the memory traffic per second.
    rate = 2 * elements * element / copy.median_s
    floor_s = decode_row["read_bytes"] / rate
    gpu_s = decode_row["gpu_s"]
    # The wall time is what a user gets; the GPU time beside it says how much of the gap is the host's.
    return {"read_bytes": decode_row["read_bytes"], "copy_bytes": elements * element, "copy": copy.fields(),
            "copy_bytes_per_s": rate, "floor_s": floor_s, "step_s": decode_row["median_s"], "step_source": "median_s",
            "vs_floor": decode_row["median_s"] / floor_s, "gpu_s": gpu_s,
            "gpu_vs_floor": None if gpu_s is None else gpu_s / floor_s}


def check(rows: list[dict], backend: str) -> dict:
    """Per stage, the validation report's r of FLOPs with wall and GPU time, worst deviations and verdict."""
    wall_rows = model_bench.report_rows(rows, backend)
    # The GPU time as a series of its own gives its worst deviation; the profiler's time has no IQR.
    gpu_rows = [r | {"seconds": r["gpu_seconds"], "iqr_seconds": 0.0} for r in wall_rows if r["gpu_seconds"]]
    gpu = {s.op: s for s in report.summarize(gpu_rows)} if len(gpu_rows) == len(wall_rows) and gpu_rows else {}
    out = {}
    for wall in report.summarize(wall_rows) if wall_rows else []:
        stage = wall.op.rsplit(" ", 1)[-1]
        on_gpu = gpu.get(wall.op)
        out[stage] = {"pearson_wall": wall.pearson, "pearson_gpu": wall.pearson_gpu,
                      "worst_wall": wall.worst_deviation, "worst_wall_label": wall.worst_label,
                      "worst_gpu": on_gpu and on_gpu.worst_deviation, "worst_gpu_label": on_gpu and on_gpu.worst_label,
                      "verdict": wall.verdict, "plans": wall.points}
    return out


def _stage_columns(stage: str) -> list[tuple[str, str, str]]:
    return [(f"{stage}_ratio", f"{stage} FLOPs ratio", ".3f"), (f"{stage}_wall", f"{stage} wall ms", "s"),
            (f"{stage}_iqr", "IQR", "s"), (f"{stage}_gpu", "GPU ms", "s"), (f"{stage}_share", "GPU / wall", "s")]


COLUMNS = [("family", "plan", "s"), ("label", "label", "s"), ("layers_on", "layers", "d"),
           ("prefill_flops", "prefill FLOPs", "s"), *_stage_columns("prefill"), *_stage_columns("decode")]


def _plan_cells(prefill: dict, decode: dict | None, full: dict) -> dict:
    cells = {"family": prefill["family"], "label": prefill["label"], "layers_on": prefill["layers_on"],
             "prefill_flops": flops_text(prefill["flops"])}
    for stage, row in (("prefill", prefill), ("decode", decode)):
        if row is None:
            cells |= {f"{stage}_ratio": float("nan"), f"{stage}_wall": "-", f"{stage}_iqr": "-", f"{stage}_gpu": "-",
                      f"{stage}_share": "-"}
            continue
        shown = timing_cells(row)
        ref = full.get(stage)
        cells |= {f"{stage}_ratio": row["flops"] / ref["flops"] if ref else float("nan"),
                  f"{stage}_wall": shown["wall_ms"], f"{stage}_iqr": shown["iqr"], f"{stage}_gpu": shown["gpu_ms"],
                  f"{stage}_share": "-" if row["gpu_s"] is None else f"{row['gpu_s'] / row['median_s']:.2f}"}
    return cells


def _r(value: float | None) -> str:
    return "-" if value is None else report.r_text(value)


def _deviation(value: float | None, label: str | None) -> str:
    return "-" if value is None else f"{value:+.1%} ({label})"


def table(results: dict) -> str:
    """The plans' table, then the per-stage correlations and worst deviations, then the bandwidth floor."""
    rows = results["model_runs"]["rows"]
    full = {r["stage"]: r for r in rows if r["family"] == model_bench.FULL}
    by_label = {}
    for r in rows:
        by_label.setdefault(r["label"], {})[r["stage"]] = r
    lines = [format_table([_plan_cells(stages["prefill"], stages.get("decode"), full)
                           for stages in by_label.values() if "prefill" in stages], COLUMNS)]
    for stage, c in results.get("check", {}).items():
        lines.append(f"{stage}: r(FLOPs, wall) {_r(c['pearson_wall'])}, r(FLOPs, GPU) {_r(c['pearson_gpu'])}; "
                     f"worst deviation wall {_deviation(c['worst_wall'], c['worst_wall_label'])}, GPU "
                     f"{_deviation(c['worst_gpu'], c['worst_gpu_label'])}; verdict (wall): {c['verdict']}")
    for kind, by_stage in results.get("check_by_family", {}).items():
        for stage, c in by_stage.items():
            lines.append(f"{stage}, -{kind} plans and the full plan: r(FLOPs, wall) {_r(c['pearson_wall'])}, "
                         f"r(FLOPs, GPU) {_r(c['pearson_gpu'])}; worst deviation wall "
                         f"{_deviation(c['worst_wall'], c['worst_wall_label'])}")
    floor = results.get("floor")
    if floor:
        gpu = "" if floor.get("gpu_s") is None else (f" (GPU {floor['gpu_s'] * 1e3:.3f} ms, "
                                                      f"{floor['gpu_vs_floor']:.2f}x)")
        lines.append(f"full-plan decode step: wall {floor['step_s'] * 1e3:.3f} ms, {floor['vs_floor']:.2f}x the "
                     f"bandwidth floor of {floor['floor_s'] * 1e3:.3f} ms{gpu} ({si_text(floor['read_bytes'], 'B')} "
                     f"read at {si_text(floor['copy_bytes_per_s'], 'B/s')}, the read + write rate of a "
                     f"{si_text(floor['copy_bytes'], 'B')} device-to-device copy in this run)")
    distinct = results.get("distinct_plans")
    if distinct:
        after = "not counted (no CUDA graphs here)" if distinct["captures_after_first"] is None else (
            f"{distinct['captures_after_first']} captures after the first")
        lines.append(f"{distinct['plans']} distinct -H plans decoded one after another: {after}")
    for label, profile in results.get("host_profile", {}).items():
        lines.append(host_text(f"prefill host time, {label}", profile))
    for name, error in results.get("errors", {}).items():
        lines.append(f"{name} stopped early: {error['type']}: {error['message']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print(f"\ngpu-check on {results['meta']['device']} ({results['meta']['dtype']}), {results['model']} with random "
          f"weights, prefill over {results['model_runs']['tokens']} tokens, kernels {args.backend}; a decode step is "
          f"one step of the runtime (a CUDA graph replay on CUDA); FLOPs ratios to the full plan")
    print(table(results))
    print(f"\nwrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["errors"] else 0)
