#!/usr/bin/env python3
"""The verdict table of a ``make gpu-check`` folder: each GPU acceptance target, measured / target / holds.

Standard library only. Reads what the stages left (``stages.json``, ``setup.json``, ``model/results.json``,
``pdl/results.json``, ``phased/results.json``, ``phased-pdl/results.json``, ``kernels/results.json``, ``fit/errors.json``,
``fit/static.json``, ``boundary/results.json``, ``serve/results.json``, ``tune/results.json``,
``probes.json``, ``tests.log``); a stage that did not run or did not finish makes its rows "not measured",
never a guess. Run it alone on a folder to redraw the table: ``python scripts/gpu_verdict.py
bench/out/gpu-check``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Targets, by the issue that set them. Times are H200 targets: on another device the rows still show the
# measurement, and "holds" is judged against the same number.
FULL_DECODE_WALL_MS = 3.85  # #27/#28: 85% of the measured copy bandwidth on an H200
FULL_PREFILL_WALL_MS = 16.5  # #19
FLOOR_SHARE = 0.85  # #28: a decode step at >= 85% of the copy rate
DECODE_WALL_OVER_GPU = 1.05  # #18
PREFILL_WALL_OVER_GPU = 1.10  # #18
R_MIN = 0.99  # #18: r(FLOPs, wall) over the -L plans
PROPORTIONAL = 0.05  # #19: -H plans within 5% of proportional
L_HALF_STEP = 0.54  # #26: an AdaLLaVA-L 0.5 step at one row against the full plan's
FULL_OVER_DENSE = 1.02  # #26: a batch of full plans against the dense model
SERVE_WALL_OVER_GPU = 1.05  # #26: the serving trace's steps, wall against GPU time
SERVE_VS_MODEL = 0.10  # #26: mixed plans' tokens/s gain within 10% of the union cost model's
MAX_GRAPH_KEYS = 16  # #26: graph keys over the 1000-event trace
KERNEL_COPY_SHARE = 0.60  # #19: no decode kernel under 60% of the copy rate
MODEL_ERROR = 0.10  # #28: the static model within 10% of each decode kernel's measured time
# The fit stage prices the static model's bytes at the copy the model stage measured (fit/static.json and
# fit/errors.json record the rate). Where they were priced at another rate (the model's own, an H200's, when
# the measured one could not be read), more than this away, the model's times are not this device's: its rows
# show what it says, and hold nothing.
MODEL_COPY_TOLERANCE = 0.05
BUDGET_S = 480  # #27: the whole check
FULL_FAMILY = "full plan"  # the model check's family of the full plan (bench.model.FULL)
# The stages that run the model check's A/B plans again with one opt-in of the decode step switched on (the
# variable that does it): the verdict sets each beside the model stage.
AB_STAGES = {"pdl": "ADALLAVA_PDL=1", "phased": "ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv",
             "phased-pdl": "ADALLAVA_PDL=1 ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv"}
# Kernel boundaries of a decode layer the phased stage makes phases of one launch (bench.static's
# BLOCK_PHASED_BOUNDARIES): the MLP's, and the attention block's two (q|k|v to the attention, the attention
# to o_proj).
PHASED_BOUNDARIES = 3


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(issue: str, what: str, measured, target: str, holds) -> dict:
    return {"issue": issue, "what": what, "measured": measured, "target": target,
            "holds": None if measured is None else holds}


def _model_row(issue: str, what: str, measured, target: str, holds) -> dict:
    """A row that sets the static model against a target: :func:`_on_this_device` may set it aside."""
    return {**_row(issue, what, measured, target, holds), "static_model": True}


def _other_device(out: Path) -> str | None:
    """Why the static model's times are not this device's (None: they are, or nothing says otherwise): the
    model stage's copy, measured on a GPU, against the copy rate the fit stage priced the model at (its own
    H200's where it could not read the measured one)."""
    model = _load(out / "model" / "results.json") or {}
    measured = (model.get("floor") or {}).get("copy_bytes_per_s")
    if model.get("device_type") != "cuda" or not measured:
        return None
    for name in ("static.json", "errors.json"):
        priced = (_load(out / "fit" / name) or {}).get("copy_rate")
        if priced and abs(measured / priced - 1) > MODEL_COPY_TOLERANCE:
            return (f"not compared: the model is priced at a copy of {priced / 1e12:.3f} TB/s, this device copied "
                    f"{measured / 1e12:.3f} TB/s")
    return None


def _on_this_device(rows: list[dict], other: str | None) -> list[dict]:
    """``rows`` with each static-model row set aside (its figures kept, ``other`` beside them, holding
    nothing) where ``other`` says the model's times are another device's."""
    for row in rows:
        if row.pop("static_model", False) and other and row["measured"] is not None:
            row["measured"], row["holds"] = f"{row['measured']} ({other})", None
    return rows


def _fmt(value, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def test_summary(log: Path) -> dict | None:
    """Counts of the test log's outcomes: from pytest's summary line where it finished, else from its -v lines."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    finished = re.findall(r"=+ (.*?) in [\d.]+s", text)
    counts = {}
    if finished:
        for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", finished[-1]):
            counts["errors" if word.startswith("error") else word] = int(number)
        counts["finished"] = True
    else:
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            counts[word.lower() if word != "ERROR" else "errors"] = len(re.findall(rf"\b{word}\b", text))
        counts["finished"] = False
    counts["crashed_workers"] = len(re.findall(r"worker '\w+' crashed", text))
    counts["failures"] = sorted(set(re.findall(r"^FAILED (\S+)", text, re.M)))[:50]
    return counts


def _model_rows(out: Path) -> list[dict]:
    rows = []
    model = _load(out / "model" / "results.json")
    if not model:
        return [_row("#27", "model check ran", None, "results.json", None)]
    floor = model.get("floor")
    runs = model["model_runs"]["rows"]
    full = {r["stage"]: r for r in runs if r["family"] == FULL_FAMILY}
    on_gpu = model.get("device_type") == "cuda"
    if floor:
        wall_ms = floor["step_s"] * 1e3
        rows.append(_row("#27 #28", "full-plan decode step, wall", f"{wall_ms:.3f} ms", f"<= {FULL_DECODE_WALL_MS} ms",
                         wall_ms <= FULL_DECODE_WALL_MS))
        share = 1 / floor["vs_floor"]
        rows.append(_row("#27 #28", "full-plan decode step wall, share of the copy rate "
                         f"(floor {floor['floor_s'] * 1e3:.3f} ms)", f"{share:.1%}", f">= {FLOOR_SHARE:.0%}",
                         share >= FLOOR_SHARE))
        if floor.get("gpu_s"):
            rows.append(_row("#28", "full-plan decode step, GPU time, share of the copy rate",
                             f"{1 / floor['gpu_vs_floor']:.1%}", f">= {FLOOR_SHARE:.0%}",
                             1 / floor["gpu_vs_floor"] >= FLOOR_SHARE))
    for stage, switch in AB_STAGES.items():
        ab = _load(out / stage / "results.json")
        if floor and ab and ab.get("floor"):
            with_it = ab["floor"]["step_s"] * 1e3
            rows.append(_row("#28", f"full-plan decode step, wall, with {switch} (without)",
                             f"{with_it:.3f} ms ({floor['step_s'] * 1e3:.3f} ms)", f"<= {FULL_DECODE_WALL_MS} ms",
                             with_it <= FULL_DECODE_WALL_MS))
        rows += _ab_plan_rows(runs, (ab or {}).get("model_runs", {}).get("rows", []), switch)
    if "prefill" in full:
        ms = full["prefill"]["median_s"] * 1e3
        rows.append(_row("#19", "full-plan prefill, wall", f"{ms:.3f} ms", f"<= {FULL_PREFILL_WALL_MS} ms",
                         ms <= FULL_PREFILL_WALL_MS))
    shares = model.get("proportional", [])
    for stage, limit in (("decode", DECODE_WALL_OVER_GPU), ("prefill", PREFILL_WALL_OVER_GPU)):
        values = [(p["wall_over_gpu"], p["label"]) for p in shares if p["stage"] == stage and p["wall_over_gpu"]]
        if values or not on_gpu:
            worst = max(values) if values else None
            rows.append(_row("#18", f"{stage}: worst wall / GPU over the plans", worst and f"{worst[0]:.3f} ({worst[1]})",
                             f"<= {limit}", worst is not None and worst[0] <= limit))
    for kind, by_stage in model.get("check_by_family", {}).items():
        for stage, c in by_stage.items():
            r = c.get("pearson_wall")
            rows.append(_row("#18" if kind == "L" else "#19", f"{stage}: r(FLOPs, wall) over the -{kind} plans",
                             _fmt(r, ".4f"), f">= {R_MIN}", r is not None and r >= R_MIN))
            g = c.get("pearson_gpu")
            rows.append(_row("#18" if kind == "L" else "#19", f"{stage}: r(FLOPs, GPU) over the -{kind} plans",
                             _fmt(g, ".4f"), f">= {R_MIN}", g is not None and g >= R_MIN))
    for stage in ("decode", "prefill"):
        for which in ("wall", "gpu"):
            values = [(abs(p[f"{which}_deviation"]), p["label"], p[f"{which}_deviation"]) for p in shares
                      if p["stage"] == stage and p["family"] in ("AdaLLaVA-H", "random-H")
                      and p[f"{which}_deviation"] is not None]
            worst = max(values) if values else None
            rows.append(_row("#19", f"{stage}: -H plans' worst deviation from proportional, {which}",
                             worst and f"{worst[2]:+.1%} ({worst[1]})", f"within {PROPORTIONAL:.0%}",
                             worst is not None and worst[0] <= PROPORTIONAL))
    dense = {r["stage"]: r for r in runs if r["family"] == "dense (transformers)"}
    if "decode" in full and "decode" in dense and dense["decode"].get("median_s"):
        ratio = full["decode"]["median_s"] / dense["decode"]["median_s"]
        rows.append(_row("#26", "full-plan decode step / the dense model's (transformers), wall", f"{ratio:.3f}",
                         f"<= {FULL_OVER_DENSE}", ratio <= FULL_OVER_DENSE))
    half = next((p for p in shares if p["stage"] == "decode" and p["label"] == "L 0.50"), None)
    if half:
        rows.append(_row("#26", "AdaLLaVA-L 0.50 decode step / full plan's, one row, wall",
                         f"{half['wall_ratio']:.3f}", f"<= {L_HALF_STEP}", half["wall_ratio"] <= L_HALF_STEP))
    distinct = model.get("distinct_plans")
    if distinct:
        after = distinct.get("captures_after_first")
        rows.append(_row("#18 #27", f"graph captures for {distinct['plans']} distinct -H plans after the first",
                         after, "0", after == 0))
    for name, error in model.get("errors", {}).items():
        rows.append(_row("#27", f"model check: {name} stopped", f"{error['type']}: {error['message'][:80]}",
                         "no error", False))
    return rows


def _kernel_rows(out: Path) -> list[dict]:
    kernels = _load(out / "kernels" / "results.json")
    section = kernels and kernels.get("kernels")
    if not section:
        return [_row("#19 #28", "per-kernel profile ran", None, "results.json", None)]
    rows = []
    on_gpu = "GPU" in section.get("time", "")
    worst = None
    for layer in section["layers"]:
        if layer["stage"] != "decode":
            continue
        for k in layer["kernels"]:
            if k.get("fraction") is None or k.get("bound") != "memory":
                continue
            if worst is None or k["fraction"] < worst[0]:
                worst = (k["fraction"], f"{k['name'][:40]} in the {layer['layer']} layer")
    if on_gpu:
        rows.append(_row("#19 #28", "decode kernels: the lowest share of the copy rate", worst and
                         f"{worst[0]:.1%} ({worst[1]})", f">= {KERNEL_COPY_SHARE:.0%}",
                         worst is not None and worst[0] >= KERNEL_COPY_SHARE))
    counts = {layer["layer"]: layer["kernel_count"] for layer in section["layers"] if layer["stage"] == "decode"}
    if on_gpu and counts:
        most = max(counts.values())
        rows.append(_row("#28", "kernels per decode layer (device records)", str(counts), "<= 8", most <= 8))
    ends = section.get("step_ends")
    if on_gpu and ends:
        slowest = max(ends["kernels"], key=lambda k: k["seconds"])
        rows.append(_row("#28", "a decode step's own kernels, outside its layers (one row)",
                         f"{ends['kernel_count']} kernels, {ends['total_s'] * 1e6:.1f} us (the longest "
                         f"{slowest['name'][:40]}, {slowest['seconds'] * 1e6:.1f} us)", "reported", True))
    return rows


def _fit_rows(out: Path) -> list[dict]:
    """The static model against the sweep: per kernel, the worst error over each case's chosen config."""
    fit = _load(out / "fit" / "errors.json")
    if not fit:
        return [_row("#28", "static model vs the sweep's measured time", None, "fit/errors.json", None)]
    chosen = {kernel: s["chosen"] for kernel, s in fit.get("kernels", {}).items() if s["chosen"]["count"]}
    if not chosen:
        return [_row("#28", "static model vs the sweep: decode cases compared", "0", ">= 1", False)]
    worst = {kernel: s["worst"] for kernel, s in chosen.items()}
    text = ", ".join(f"{kernel.split('/')[0].strip('_').removesuffix('_kernel')} {error:+.1%}"
                     for kernel, error in sorted(worst.items()))
    return [_model_row("#28", "static model vs the sweep: worst error of each kernel's chosen configs", text,
                 f"within +-{MODEL_ERROR:.0%}", all(abs(e) <= MODEL_ERROR for e in worst.values()))]


def _ab_plan_rows(without: list[dict], with_it: list[dict], switch: str) -> list[dict]:
    """The A/B of an opt-in stage on its -H plan: the decode step's wall time with ``switch`` beside the model
    stage's (the full plan has its own row, against the floor)."""
    def decode(rows):
        return {r["label"]: r["median_s"] for r in rows if r["stage"] == "decode" and r["family"] != FULL_FAMILY}

    a, b = decode(without), decode(with_it)
    return [_row("#28", f"{label} plan's decode step, wall, with {switch} (without)",
                 f"{b[label] * 1e3:.3f} ms ({a[label] * 1e3:.3f} ms)", "no slower with it", b[label] <= a[label])
            for label in sorted(set(a) & set(b))]


def _step_model_rows(out: Path) -> list[dict]:
    """The static model's full-plan decode step at batch 1 (fit/static.json) against the measured one's GPU
    time, without PDL (model stage) and with it (pdl stage); and the fixed cost per kernel that the measured
    step implies, were the model's byte times right: its FIXED_S plus the error spread over the step's kernels."""
    static = _load(out / "fit" / "static.json")
    step = next((s for s in (static or {}).get("steps", []) if s["batch"] == 1 and s["partial_layers"] == 0), None)
    rows = []
    for stage, label in (("model", ""), ("pdl", ", with ADALLAVA_PDL=1")):
        floor = (_load(out / stage / "results.json") or {}).get("floor")
        what = f"full-plan decode step at batch 1, the static model against the measured GPU time{label}"
        if step is None or not floor:
            rows.append(_row("#28", what, None, f"within +-{MODEL_ERROR:.0%}", None))
            continue
        measured = floor.get("gpu_s") or floor["step_s"]
        error = step["seconds"] / measured - 1
        fixed = static["fixed_s"] + (measured - step["seconds"]) / step["kernels"]
        text = (f"{step['seconds'] * 1e3:.3f} ms vs {measured * 1e3:.3f} ms ({error:+.1%}); implied fixed cost "
                f"{fixed * 1e6:.2f} us a kernel (model {static['fixed_s'] * 1e6:.1f} us)")
        rows.append(_model_row("#28", what, text, f"within +-{MODEL_ERROR:.0%}", abs(error) <= MODEL_ERROR))
        rows.append(_steps_at_fixed_cost(static, fixed, label))
    return rows


# bench.boundary's modes (standard library only: its own copy of bench.boundary.MODES), each with what its
# slope costs and the words the verdict gives it.
BOUNDARY_MODES = {
    "off": ("the cost of one more kernel in a captured chain (bench.boundary)", ""),
    "on": ("the cost of one more kernel in a captured chain (bench.boundary), with ADALLAVA_PDL=1",
           ", with ADALLAVA_PDL=1"),
    "fused": ("the cost of one more phase of one kernel, ordered by tickets (bench.boundary)",
              ", were every kernel boundary a phase of one kernel"),
}


def _boundary_rows(out: Path) -> list[dict]:
    """The cost of one more boundary in a captured run (``python -m bench.boundary``): a kernel without PDL and
    with it, and a phase of one kernel; each stream's slope over its runs; and the static model's decode steps
    again at the larger of each mode's slopes, in place of its FIXED_S."""
    result = _load(out / "boundary" / "results.json")
    if not result or not result.get("series"):
        return [_row("#28", "the cost of one more boundary in a captured run (bench.boundary)", None, "reported",
                     None)]
    static = _load(out / "fit" / "static.json")
    rows = []
    for mode, (what, label) in BOUNDARY_MODES.items():
        series = [s for s in result["series"] if s["mode"] == mode]
        if not series:
            reason = {**result.get("skipped", {}), **result.get("errors", {})}.get(mode, "not measured")
            rows.append(_row("#28", what, None, f"reported ({reason})", None))
            continue
        text = ", ".join(f"{s['slope_s'] * 1e6:.2f} us over {s['total_bytes'] / 2**20:.0f} MiB (r {s['r']:.4f})"
                         for s in series)
        rows.append(_row("#28", what, text, "reported", True))
        if static:
            cost = max(s["slope_s"] for s in series)
            rows.append(_steps_at_fixed_cost(static, cost, label, "the measured cost"))
    slopes = {mode: max((s["slope_s"] for s in result["series"] if s["mode"] == mode), default=None)
              for mode in ("off", "fused")}
    if static and None not in slopes.values():
        rows.append(_phased_steps(static, slopes["off"], slopes["fused"]))
    return rows


# The sweep's cases (bench.tune) of a whole layer's phased MLP and of the launches it replaces in the bound step:
# gate|up of every neuron, then down as the column gather.
PHASED_MLP_CASES = {"phased": "mlp phased b{b} full", "separate": ("gate|up b{b} full", "down bound b{b}")}


def _phased_sweep_rows(out: Path) -> list[dict]:
    """The phased MLP against the two launches it replaces, each timed alone in a CUDA graph by the sweep
    (its fastest candidate): what one launch of two phases saves a layer, kernel boundary against phase
    boundary, at each batch the sweep reached."""
    tune = _load(out / "tune" / "results.json")
    best = {c["case"]: c["best"]["seconds"] for c in (tune or {}).get("cases", []) if c.get("best")}
    rows = []
    for b in (1, 16):
        phased = best.get(PHASED_MLP_CASES["phased"].format(b=b))
        parts = [best.get(name.format(b=b)) for name in PHASED_MLP_CASES["separate"]]
        what = f"phased MLP b{b}, one launch against gate|up + down, each timed alone (bench.tune)"
        if phased is None or None in parts:
            rows.append(_row("#28", what, None, "faster than the two launches", None))
            continue
        separate = sum(parts)
        rows.append(_row("#28", what, f"{phased * 1e6:.1f} us against {separate * 1e6:.1f} us: "
                                     f"{(separate - phased) * 1e6:+.1f} us a layer", "faster than the two launches",
                         phased < separate))
    return rows


def _phased_steps(static: dict, kernel: float, phase: float) -> dict:
    """The static model's decode steps as the phased stage runs them (``AB_STAGES``): every kernel at ``kernel``
    seconds, and :data:`PHASED_BOUNDARIES` of each layer's kernel boundaries phases of one launch, ``phase``
    seconds each in place of a kernel's fixed cost (bench.static's ``block_phases_s_at_target``)."""
    def seconds(step):
        if "layers" not in step:
            return None
        return (step["seconds"] + step["kernels"] * (kernel - static["fixed_s"])
                - PHASED_BOUNDARIES * step["layers"] * (kernel - phase))

    return _steps_row(static, seconds, "static decode steps with the phased MLP and attention block, at the measured "
                                       f"costs of {kernel * 1e6:.2f} us a kernel and {phase * 1e6:.2f} us a phase")


def _step_name(step: dict) -> str:
    return f"{'full' if step['partial_layers'] == 0 else '-H'} b{step['batch']}"


def _steps_at_fixed_cost(static: dict, fixed: float, label: str, source: str = "the implied fixed cost") -> dict:
    """The static model's decode steps (full plan and half the layers partial, batch 1 and 16) with ``fixed``
    seconds a kernel in place of the model's FIXED_S (``source``: what gave it, a measured step or a chain of
    kernels): their share of the copy rate, against the share #28 asks of each."""
    return _steps_row(static, lambda step: step["seconds"] + step["kernels"] * (fixed - static["fixed_s"]),
                      f"static decode steps at {source} of {fixed * 1e6:.2f} us a kernel{label}")


def _steps_row(static: dict, seconds, what: str) -> dict:
    """A row of the static model's decode steps, each timed by ``seconds(step)`` (None: not priced): their
    share of the copy rate, against the share #28 asks of each."""
    target = static.get("target_share", FLOOR_SHARE)
    shares = {}
    for step in static["steps"]:
        time = seconds(step)
        shares[_step_name(step)] = step["bytes"] / static["copy_rate"] / time if time and time > 0 else None
    text = ", ".join(f"{name} {'-' if share is None else f'{share:.1%}'}" for name, share in shares.items())
    return _model_row("#28", what, text, f">= {target:.0%} each",
                      all(s is not None and s >= target for s in shares.values()))


def _serve_rows(out: Path) -> list[dict]:
    serve = _load(out / "serve" / "results.json")
    section = serve and serve.get("serve")
    if not section:
        return [_row("#26", "serving run ran", None, "results.json", None)]
    if "keys" not in section:  # the serve section before the trace: requests one by one, then one batch
        batch = section["batch"]
        return [_row("#26", f"one batch of {section['requests']}: tokens/s", f"{batch['tokens_per_s']:.1f}",
                     "reported", True)]
    keys = section["keys"]
    rows = [_row("#26", f"graph keys over a {keys['events']}-event trace: distinct, new after "
                        f"{keys['warm_events']} events", f"{keys['distinct_keys']}, {keys['new_keys_after_warm']}",
                 f"<= {MAX_GRAPH_KEYS}, 0",
                 keys["distinct_keys"] <= MAX_GRAPH_KEYS and keys["new_keys_after_warm"] == 0)]
    gpu = section.get("gpu", {})
    if "mixed" not in gpu:
        rows.append(_row("#26", "serving trace measured on the GPU", None, "tokens/s, TPOT, TTFT", None))
        return rows
    mixed, full, measured = gpu["mixed"], gpu["full"], gpu["measured_ratio"]
    rows.append(_row("#26", "serving trace: tokens/s, mixed plans (every plan full)",
                     f"{mixed['tokens_per_s']:.1f} ({full['tokens_per_s']:.1f})", "reported", True))
    wall = measured.get("step_wall_priced")
    rows.append(_row("#26", "serving trace: step wall mixed / full, measured (predicted)",
                     None if wall is None else f"{wall:.3f} ({gpu['predicted']['roofline_s_ratio']:.3f})",
                     "reported", True))
    if mixed.get("step_gpu_sum_s"):
        over = mixed["step_wall_sum_s"] / mixed["step_gpu_sum_s"]
        rows.append(_row("#26", "serving trace, mixed plans: step wall / GPU time", f"{over:.3f}",
                         f"<= {SERVE_WALL_OVER_GPU}", over <= SERVE_WALL_OVER_GPU))
    gain, model_gain = measured.get("tokens_per_s"), gpu["predicted"].get("roofline_s_ratio")
    if gain and model_gain:
        model_gain = 1 / model_gain  # tokens/s scale as the inverse of the step time
        rows.append(_row("#26", "serving trace: tokens/s mixed / full, measured (union cost model)",
                         f"{gain:.3f} ({model_gain:.3f})", f"within {SERVE_VS_MODEL:.0%}",
                         abs(gain / model_gain - 1) <= SERVE_VS_MODEL))
    if mixed["graphs"].get("enabled"):
        captures = mixed["graphs"]["captures"] + full["graphs"]["captures"]
        rows.append(_row("#26", "graph captures while the traces run (after warm-up)", captures,
                         "0 after warm-up", captures == 0))
    return rows


def verdict(out: Path) -> dict:
    out = Path(out)
    stages = _load(out / "stages.json") or {}
    setup = _load(out / "setup.json") or {}
    rows = []
    elapsed = stages.get("elapsed_s")
    rows.append(_row("#27", "the whole check, seconds", elapsed, f"<= {BUDGET_S}",
                     elapsed is not None and elapsed <= BUDGET_S))
    for stage in stages.get("stages", []):
        rows.append(_row("#27", f"stage {stage['name']}", f"{stage['status']} in {stage['seconds']} s",
                         "passed", stage["status"] == "passed"))
    tests = test_summary(out / "tests.log")
    if tests is not None:
        bad = tests.get("failed", 0) + tests.get("errors", 0)
        done = "" if tests["finished"] else " (cut short)"
        rows.append(_row("#27", "test suite: failed + errors" + done,
                         f"{bad} of {bad + tests.get('passed', 0)} ({tests.get('skipped', 0)} skipped)", "0",
                         bad == 0 and tests["finished"]))
        rows.append(_row("#27", "test suite: crashed workers", tests["crashed_workers"], "0",
                         tests["crashed_workers"] == 0))
    probes = _load(out / "probes.json")
    if probes is not None:
        cases = probes.get("cases", {})
        rows.append(_row("#27", "extension bad-input probes: cases run, child exit status",
                         f"{len(cases)}, {probes.get('returncode')}", "exit 0", probes.get("returncode") == 0))
    tune = _load(out / "tune" / "results.json")
    if tune is not None:
        chosen = sum(1 for c in tune.get("cases", []) if c.get("best"))
        rows.append(_row("#27", "kernel sweep: cases with a chosen config",
                         f"{chosen} of {len(tune.get('cases', [])) + len(tune.get('skipped', []))}", "all",
                         chosen > 0 and not tune.get("skipped")))
    rows += (_model_rows(out) + _kernel_rows(out)
             + _on_this_device(_fit_rows(out) + _step_model_rows(out) + _boundary_rows(out), _other_device(out))
             + _phased_sweep_rows(out) + _serve_rows(out))
    return {"device": setup.get("device"), "torch": setup.get("torch"), "triton": setup.get("triton"),
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# gpu-check verdict: {result.get('device') or 'device unknown'} "
             f"(torch {result.get('torch')}, triton {result.get('triton')})", "",
             "| issue | what | measured | target | holds |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        holds = ("not measured" if r["measured"] is None else "not compared") if r["holds"] is None else (
            "yes" if r["holds"] else "**no**")
        measured = "-" if r["measured"] is None else r["measured"]
        lines.append(f"| {r['issue']} | {r['what']} | {measured} | {r['target']} | {holds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_verdict.py GPU_CHECK_FOLDER")
    print(markdown(verdict(Path(sys.argv[1]))))
