"""``python -m bench``: does the wall-clock follow the FLOPs an AdaLLaVA plan predicts, op by op and end to end?

Prints the predicted cost of the plans, the measured tables of the masked
MLP, the masked attention, the layer-skip KV cache, the whole model under
many plans and the request latency per budget, then the validation table:
per op, the Pearson correlation of wall time (and of GPU time) with predicted
FLOPs, the fitted line, the worst deviation from proportionality and a
verdict on wall time. Every timed case has its wall time (median and IQR,
flagged when the IQR exceeds 5% of the median) and, on CUDA, its GPU time.
With ``--out DIR`` it writes ``results.json`` (every row, with the device,
dtype, commit, date and command), ``report.md`` and the figures
(``plot.png``, ``latency.png``, ``ops*.png``; ``python -m bench.plot``
redraws them). ``--compare OLD/results.json`` sets each case's time beside
the old run's and flags regressions over 5% and beyond the runs' IQRs. A
section that fails is reported and recorded under ``errors`` in results.json;
the others still run and are written, and the command exits with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

from adallava_kernels import PRESETS, check_budget, get_device, get_shape
from adallava_kernels.checks import check_backend, check_output_dir
from adallava_kernels.cli import ArgumentParser, checked

from . import attention, compare, kernels, kv_cache, latency, mlp, plans, plot, report, serve, timing
from . import model as model_bench
from ._common import (DTYPES, checked_device, default_dtype, error_record, int_list, load_results, metadata,
                      model_list, non_negative_int, positive, progress, roofline_device, write_json)

DEFAULT_BUDGETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)
SECTIONS = ("mlp", "attention", "kv", "model", "latency", "serve", "kernels")


def section_list(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--only takes a comma-separated subset of {','.join(SECTIONS)}, got {text!r}")
    return chosen


def budget_list(text: str) -> list[float]:
    try:
        return [check_budget(float(b)) for b in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def results_file(text: str) -> dict:
    """``--compare``: a results.json of an earlier run, checked before anything is timed."""
    try:
        results = load_results(text, "--compare")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not compare.cases(results):
        raise argparse.ArgumentTypeError(f"--compare: {text} has no timed case to compare with")
    return {"path": text, "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="model shape (default llava-7b on CUDA, tiny on CPU)")
    parser.add_argument("--only", type=section_list, default=list(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--no-static", action="store_true",
                        help="kernels section without a GPU: skip the static report of the decode kernels' sm_90 code "
                             "(about a minute of compiling the first time)")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                        help="kernels the model and latency sections run (default auto: Triton on CUDA)")
    parser.add_argument("--decode-steps", type=positive(int), default=model_bench.DECODE_STEPS,
                        help="decode steps between the two generate calls that time transformers' decode step "
                             "(the library's is timed step by step)")
    parser.add_argument("--random-plans", type=non_negative_int, default=model_bench.RANDOM_PLANS,
                        help="random plans the model section adds to the budgets' plans")
    parser.add_argument("--roofline-device", type=roofline_device, default="H200",
                        help="device the roofline predicts for: H200, H100, A100, V100, or 'measure' (this CPU)")
    parser.add_argument("--budgets", type=budget_list, default=list(DEFAULT_BUDGETS),
                        help="comma-separated latency budgets in [0.5, 1.0]")
    parser.add_argument("--tokens", type=positive(int), default=700,
                        help="prefill length of the plans table and, on CUDA, of the model section "
                             f"(on CPU the model section uses {model_bench.CPU_TOKENS})")
    parser.add_argument("--context", type=positive(int), default=700, help="positions a decode step attends to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the ops are timed: cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the timed ops (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--scale", type=positive(int), default=None,
                        help="divide the op shapes by this (MLP: hidden and intermediate; attention: hidden "
                             "and heads) (default 4 on CPU, 1 on CUDA and for tiny)")
    parser.add_argument("--models", type=model_list, default=None,
                        help="models whose ops are timed (default: --model on CPU; llava-7b,llava-13b on CUDA)")
    parser.add_argument("--mlp-tokens", type=int_list, default=None,
                        help="tokens per MLP call (default 1,8,64 on CPU; 1,8,64,700,4096 on CUDA)")
    parser.add_argument("--attention-seqs", type=int_list, default=None,
                        help="attention prefill lengths (default 64 on CPU; 700,2048,8192 on CUDA)")
    parser.add_argument("--attention-contexts", type=int_list, default=None,
                        help="attention decode contexts (default 128 on CPU; 700,4096 on CUDA)")
    parser.add_argument("--attention-batches", type=int_list, default=None,
                        help="attention batch sizes (default 1 on CPU; 1,8 on CUDA)")
    parser.add_argument("--kv-pool-gib", type=positive(float), default=40.0,
                        help="pool size for the sequences-per-pool column of the KV-cache table (default 40 GiB)")
    parser.add_argument("--latency-prompt", type=positive(int), default=None,
                        help=f"prompt tokens of the latency section's request (default {latency.GPU_REQUEST[0]} on "
                             f"CUDA, {latency.CPU_REQUEST[0]} on CPU)")
    parser.add_argument("--latency-new-tokens", type=positive(int), default=None,
                        help=f"new tokens of the latency section's request, at least 2 (default "
                             f"{latency.GPU_REQUEST[1]} on CUDA, {latency.CPU_REQUEST[1]} on CPU)")
    parser.add_argument("--serve-repeats", type=positive(int), default=None,
                        help=f"serve section: timed repeats of each serving event at each batch size, at least 2 "
                             f"(default {serve.HOST_REPEATS}; --quick {serve.QUICK_REPEATS})")
    parser.add_argument("--serve-events", type=positive(int), default=None,
                        help=f"serve section: join and leave events of the graph-key trace (default "
                             f"{serve.KEY_EVENTS}; --quick {serve.QUICK_KEY_EVENTS})")
    parser.add_argument("--serve-requests", type=positive(int), default=None,
                        help=f"serve section: requests of the trace measured on a GPU (default "
                             f"{serve.GPU_REQUESTS}; --quick {serve.QUICK_GPU_REQUESTS}); scales its time")
    defaults = timing.END_TO_END
    parser.add_argument("--min-reps", type=positive(int), default=defaults.min_reps,
                        help=f"end-to-end cases are timed for this many repetitions or --min-time, whichever "
                             f"comes first, and {defaults.floor_reps} at least (default {defaults.min_reps})")
    parser.add_argument("--min-time", type=positive(float), default=defaults.min_seconds,
                        help=f"seconds of --min-reps' rule (default {defaults.min_seconds:g})")
    parser.add_argument("--quick", action="store_true",
                        help="short timing runs (2 repetitions), to check that everything runs")
    parser.add_argument("--compare", type=results_file, default=None, metavar="OLD/results.json",
                        help="set each case's time beside this earlier run's and flag regressions over 5%% and "
                             "beyond the two runs' combined IQR")
    parser.add_argument("--out", default=None, type=Path,
                        help="directory for results.json, report.md and the figures")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single option's type can check, before anything is timed: the device, the backend on it, the
    options that depend on one another, and that ``--out`` can be written (last: the only check that touches
    the file system, and it creates nothing)."""
    args.device = checked_device(parser, args.device)
    checked(parser, check_backend, "--backend", args.backend, args.device)
    if args.latency_new_tokens is not None and args.latency_new_tokens < 2:
        parser.error(f"--latency-new-tokens must be at least 2 (one output token after the first), "
                     f"got {args.latency_new_tokens}")
    if args.serve_repeats is not None and args.serve_repeats < 2:
        parser.error(f"--serve-repeats must be at least 2 (each admission kind, -L and -H, takes every other "
                     f"repeat), got {args.serve_repeats}")
    if "kernels" in args.only and args.device.type == "cuda" and args.context < 2:
        parser.error(f"--context must be at least 2 for the kernels section on CUDA (its decode step follows a "
                     f"prefill of context - 1 tokens), got {args.context}")
    if args.out is not None:
        args.out = checked(parser, check_output_dir, "--out", args.out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    on_gpu = device.type == "cuda"
    dtype = default_dtype(args.dtype, device)
    model_name = args.model or ("llava-7b" if on_gpu else "tiny")
    shape = get_shape(model_name)
    roofline_device = get_device(args.roofline_device)
    scale = args.scale or (1 if on_gpu or model_name == "tiny" else 4)
    op_models = args.models or (["llava-7b", "llava-13b"] if on_gpu else [model_name])
    budgets = timing_budgets(args)
    dtype_name = str(dtype).removeprefix("torch.")
    results = {
        "meta": metadata(device, dtype),
        "device_type": device.type,
        "model": model_name,
        "shape": shape.to_dict(),
        "sections": args.only,
        "roofline_device": vars(roofline_device) | {"ridge_point": roofline_device.ridge_point},
        "timing": {name: vars(b) | {"rule": b.describe()} for name, b in budgets.items()}
                  | {"iqr_limit": timing.IQR_LIMIT},
    }
    report_rows: list[dict] = []

    plan_rows = plans.run(shape, args.budgets, roofline_device, args.tokens, args.context)
    print(f"\n{model_name}: AdaLLaVA plans, prefill over {args.tokens} tokens, decode at context {args.context}, "
          f"roofline on {roofline_device.name} ({roofline_device.source})")
    print(plans.table(plan_rows))
    if plans.merged(plan_rows)[1]:
        print(plans.why_merged(shape))
    results["plans"] = {"num_tokens": args.tokens, "context_len": args.context, "rows": plan_rows}
    results["errors"] = {}

    prefill, decode = attention_cases(args, on_gpu)
    run_shape = model_run_shape(shape, model_name, on_gpu, scale)
    # Per section: its key in results.json, how it runs, and its rows in the validation report.
    sections = {
        "mlp": ("mlp", lambda: run_mlp(args, op_models, scale, device, dtype, budgets["ops"]),
                lambda done: mlp.report_rows(done["rows"])),
        "attention": ("attention",
                      lambda: run_attention(op_models, scale, device, dtype, prefill, decode, budgets["ops"]),
                      lambda done: attention.report_rows(done["rows"])),
        "kv": ("kv_cache", lambda: run_kv(args, model_name, shape, op_models, scale, device, dtype, prefill, decode,
                                          budgets["ops"]), None),
        "model": ("model_runs", lambda: run_model(args, model_name, run_shape, on_gpu, device, dtype, roofline_device,
                                                  budgets["end_to_end"]),
                  lambda done: model_bench.report_rows(done["rows"], args.backend)),
        "latency": ("latency", lambda: run_latency(args, model_name, run_shape, on_gpu, device, dtype,
                                                   budgets["end_to_end"]), None),
        "serve": ("serve", lambda: run_serve(args, model_name, run_shape, device, dtype, roofline_device), None),
        "kernels": ("kernels", lambda: run_kernels(args, model_name, run_shape, on_gpu, device, dtype), None),
    }
    for name in (section for section in SECTIONS if section in args.only):
        key, run, to_report = sections[name]
        done = run_section(name, run, results["errors"])
        if done is not None:
            results[key] = done
            report_rows += to_report(done) if to_report else []
        if args.out:
            # A run cut short still leaves the sections it finished.
            write_json(args.out / "results.json", results)

    reports = report.summarize(report_rows) if report_rows else []
    results["report"] = {"min_pearson": report.MIN_PEARSON, "max_deviation": report.MAX_DEVIATION,
                         "rows": report_rows, "series": report.report_json(reports)}
    if reports:
        print(f"\nvalidation on {results['meta']['device']} ({dtype_name}): wall and GPU time against predicted FLOPs")
        print(report.table(reports))
    if args.compare:
        results["compare"] = run_compare(results, args.compare)
    print_timing_notes(results)
    summary, _ = summarize_run(results, reports)
    print("\n" + summary)
    if args.out:
        write_outputs(args.out, results)
    return results


def run_section(name: str, run, errors: dict) -> dict | None:
    """``run()``'s result; if it raises, its traceback on stderr, a line saying so, the error recorded in
    ``errors[name]`` and ``None``, so that the other sections still run and are written."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - any failure of one section is reported, not fatal to the others
        errors[name] = error_record(error)
        print(f"\nsection {name} failed: {type(error).__name__}: {error} (the other sections go on)")
        return None
    finally:
        # A section's model lives in reference cycles (its hooks), and a failed one leaves its model and pool
        # behind: free them before the next section builds its own.
        gc.collect()


def failure_note(errors: dict) -> str | None:
    """A clause for the summary naming the sections that failed and why."""
    if not errors:
        return None
    return "sections that failed: " + ", ".join(f"{name} ({e['type']}: {e['message']})" for name, e in errors.items())


def exit_status(results: dict) -> int:
    """The command's exit status: 1 when a section failed (its error is in results.json), else 0."""
    return 1 if results.get("errors") else 0


def print_timing_notes(results: dict) -> None:
    """The cases whose timing was unstable, and where the GPU times come from."""
    unstable = compare.unstable_cases(results)
    if unstable:
        shown = "; ".join(unstable[:8])
        if len(unstable) > 8:
            shown += f"; ... ({len(unstable)} in all, listed in report.md)"
        print(f"\ntimed cases whose IQR exceeds {timing.IQR_LIMIT:.0%} of the median (marked ! above): {shown}")
    print(gpu_note(results))


def gpu_note(results: dict) -> str:
    sources = compare.gpu_sources(results)
    return ("GPU time: " + "; ".join(sources) if sources
            else "GPU time: not measured (on a CPU there is no device time apart from the wall time)")


def summarize_run(results: dict, reports) -> tuple[str, list[tuple[str, str]]]:
    """The report's one-line summary and its sections after the validation table, from ``results`` (as
    results.json holds them) and the validation ``reports``."""
    unstable = compare.unstable_cases(results)
    latency_note = latency.summary(results["latency"]["rows"]) if "latency" in results else None
    notes = [note for note in (failure_note(results.get("errors")), latency_note) if note]
    summary = report.summary_line(reports, len(unstable), len(compare.spread_cases(results)),
                                  results["meta"]["device"], notes)
    sections = []
    if results.get("errors"):
        sections.append(("Sections that failed", "\n".join(
            f"- {name}: `{e['type']}: {e['message']}`" for name, e in results["errors"].items())))
    sections += section_parts(results)
    rules = results["timing"]
    ops = (timing.DO_BENCH + f", {rules['ops']['min_seconds']:g} s" if results["device_type"] == "cuda"
           else rules["ops"]["rule"])
    how = (f"Wall time of an end-to-end case: {rules['end_to_end']['rule']}; of an op: {ops}; the median and "
           f"the IQR are reported. {gpu_note(results)}.")
    sections.append(("How the times were taken", how))
    sections.append(("Timed cases with an IQR over 5% of the median", "\n".join(f"- {c}" for c in unstable) or "none"))
    if "compare" in results:
        sections.append((f"Against {results['compare']['old']}", compare.markdown(results["compare"])))
    return summary, sections


def report_markdown(results: dict) -> str:
    """report.md of a run, from its results.json alone."""
    rows = results.get("report", {}).get("rows", [])
    reports = report.summarize(rows) if rows else []
    summary, sections = summarize_run(results, reports)
    return report.markdown(reports, results["meta"], summary, sections)


# The sections report.md has a part of its own for, after the validation table (which holds the mlp, attention
# and model sections' series): the title and the Markdown of each.
REPORT_PARTS = {
    "kv_cache": ("Layer-skip KV cache", kv_cache.markdown),
    "latency": ("Request latency per budget", lambda done: latency.markdown(done["rows"])),
    "serve": ("Serving: a trace of requests joining and leaving one running batch", serve.markdown),
    "kernels": ("Per kernel: a full and a partial layer", kernels.markdown),
}


def section_parts(results: dict) -> list[tuple[str, str]]:
    """report.md's part for each of :data:`REPORT_PARTS` the run holds."""
    return [(title, to_markdown(results[key])) for key, (title, to_markdown) in REPORT_PARTS.items() if key in results]


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    (out / "report.md").write_text(report_markdown(results))
    figures = plot.draw_all(results, out)
    print(f"\nwrote {out}/results.json, report.md" + "".join(f", {p.name}" for p in figures))
    for line in plot.not_drawn(results):
        print(f"no figure for {line}")


def timing_budgets(args) -> dict[str, timing.TimingBudget]:
    """How long each kind of case is timed: ``--quick`` for a check that everything runs."""
    if args.quick:
        return {"end_to_end": timing.QUICK, "ops": timing.QUICK}
    end_to_end = dataclasses.replace(timing.END_TO_END, min_reps=args.min_reps, min_seconds=args.min_time,
                                     floor_reps=min(timing.END_TO_END.floor_reps, args.min_reps))
    return {"end_to_end": end_to_end, "ops": timing.OPS}


def run_mlp(args, op_models, scale, device, dtype, budget) -> dict:
    names, skipped = mlp.providers(device)
    tokens = args.mlp_tokens or list(mlp.GPU_TOKENS if device.type == "cuda" else mlp.CPU_TOKENS)
    shapes = {m: mlp.scaled(get_shape(m), scale) for m in op_models}
    cases = [(m, s, t) for m, s in shapes.items() for t in tokens]
    rows = [
        row
        for m, s, t in progress(cases, "mlp")
        for row in mlp.run_shape(m, s, t, device, dtype, names, budget=budget)
    ]
    print(f"\nmasked MLP on {device} ({str(dtype).removeprefix('torch.')}), sizes divided by {scale}; "
          f"providers {', '.join(names)}" + "".join(f"; {k} not run: {why}" for k, why in skipped.items()))
    print(mlp.table(rows))
    return {"scale": scale, "shapes": {m: s.to_dict() for m, s in shapes.items()}, "providers": names,
            "skipped": skipped, "rows": rows}


def attention_cases(args, on_gpu: bool) -> tuple[dict, dict]:
    prefill = dict(attention.GPU_PREFILL if on_gpu else attention.CPU_PREFILL)
    decode = dict(attention.GPU_DECODE if on_gpu else attention.CPU_DECODE)
    if args.attention_seqs:
        prefill["seqs"] = args.attention_seqs
    if args.attention_contexts:
        decode["contexts"] = args.attention_contexts
    if args.attention_batches:
        prefill["batches"] = decode["batches"] = args.attention_batches
    return prefill, decode


def run_attention(op_models, scale, device, dtype, prefill, decode, budget) -> dict:
    names, skipped = attention.providers(device)
    shapes = {m: attention.scaled(get_shape(m), scale) for m in op_models}
    rows = []
    for m in progress(shapes, "attention"):
        rows += attention.run({m: shapes[m]}, device, dtype, names, prefill, decode, budget)
    print(f"\nmasked attention on {device} ({str(dtype).removeprefix('torch.')}), hidden and heads divided by "
          f"{scale}; providers {', '.join(names)}" + "".join(f"; {k} not run: {why}" for k, why in skipped.items()))
    print(attention.table(rows))
    return {"scale": scale, "shapes": {m: s.to_dict() for m, s in shapes.items()}, "prefill": prefill,
            "decode": decode, "providers": names, "skipped": skipped, "rows": rows}


def run_kv(args, model_name, shape, op_models, scale, device, dtype, prefill, decode, budget) -> dict:
    kv_shape = attention.scaled(shape, scale)
    memory = kv_cache.memory_rows(model_name, kv_shape, args.budgets, args.context, args.kv_pool_gib, device, dtype)
    print(f"\nlayer-skip KV cache on {device} ({str(dtype).removeprefix('torch.')}), {model_name} with heads "
          f"divided by {scale}, {args.context} positions per sequence, pages of {kv_cache.PAGE_SIZE}, pool of "
          f"{args.kv_pool_gib:g} GiB")
    print(kv_cache.memory_table(memory))
    shapes = {m: attention.scaled(get_shape(m), scale) for m in op_models}
    bandwidth = [
        row
        for m, s in progress(shapes.items(), "kv cache")
        for row in kv_cache.bandwidth_rows(m, s, max(decode["batches"]), max(decode["contexts"]),
                                           max(prefill["seqs"]), device, dtype, budget)
    ]
    print(kv_cache.bandwidth_table(bandwidth))
    return {"shape": kv_shape.to_dict(), "page_size": kv_cache.PAGE_SIZE, "pool_gib": args.kv_pool_gib,
            "memory": memory, "bandwidth": bandwidth}


def model_run_shape(shape, model_name: str, on_gpu: bool, scale: int):
    """The shape the model and latency sections build: on a CPU a model other than tiny is scaled down."""
    if on_gpu or model_name == "tiny":
        return shape
    return dataclasses.replace(attention.scaled(shape, scale), intermediate_size=shape.intermediate_size // scale)


def run_model(args, model_name, run_shape, on_gpu, device, dtype, roofline_device, budget) -> dict:
    tokens = args.tokens if on_gpu else model_bench.CPU_TOKENS
    rows, graphs = model_bench.run(run_shape, model_name, args.budgets, device, dtype, roofline_device, tokens,
                                   backend=args.backend, budget=budget, decode_steps=args.decode_steps,
                                   random_count=args.random_plans)
    print(f"\nAdaLLaVA end to end on {device} ({str(dtype).removeprefix('torch.')}), {model_name} with random "
          f"weights, prefill over {tokens} tokens, kernels {args.backend}: a decode step is one step of the "
          f"runtime (a CUDA graph replay on CUDA), transformers' (generate({args.decode_steps} + 1) - "
          f"generate(1)) / {args.decode_steps}; ratios to the full plan")
    print(model_bench.table(rows))
    if graphs.get("enabled"):
        print(f"CUDA graphs of the decode steps: {graphs['captures']} captured in {graphs['capture_seconds']:.3f} s "
              f"after {graphs['warmup_seconds']:.3f} s of warm-up steps, {graphs['replays']} replays, "
              f"{graphs['evictions']} evicted")
    return {"shape": run_shape.to_dict(), "tokens": tokens, "decode_steps": args.decode_steps,
            "backend": args.backend, "graphs": graphs, "rows": rows}


def run_latency(args, model_name, run_shape, on_gpu, device, dtype, budget) -> dict:
    default_prompt, default_new = latency.GPU_REQUEST if on_gpu else latency.CPU_REQUEST
    prompt, new_tokens = args.latency_prompt or default_prompt, args.latency_new_tokens or default_new
    rows = latency.run(run_shape, model_name, args.budgets, device, dtype, prompt, new_tokens, backend=args.backend,
                       budget=budget)
    print(f"\nrequest latency on {device} ({str(dtype).removeprefix('torch.')}), {model_name} with random weights, "
          f"{prompt} prompt tokens, {new_tokens} new tokens, kernels {args.backend}; TTFT: time to first token "
          f"(scheduler included), TPOT: time per output token, E2E: the whole request; / full, / dense: ratio to "
          f"the full plan and to transformers' generate; / ideal: ratio to the full plan's E2E x the request's "
          f"FLOPs ratio (E2E FLOPs ratio)")
    print(latency.table(rows))
    return {"shape": run_shape.to_dict(), "prompt_tokens": prompt, "new_tokens": new_tokens,
            "backend": args.backend, "rows": rows}


def run_serve(args, model_name, run_shape, device, dtype, roofline_device) -> dict:
    host_model = args.model or serve.HOST_MODEL
    result = serve.run(run_shape, model_name, device, dtype, backend=args.backend, host_shape=get_shape(host_model),
                       host_model=host_model, repeats=args.serve_repeats or (serve.QUICK_REPEATS if args.quick
                                                                              else serve.HOST_REPEATS),
                       key_events=args.serve_events or (serve.QUICK_KEY_EVENTS if args.quick else serve.KEY_EVENTS),
                       gpu_requests=args.serve_requests or (serve.QUICK_GPU_REQUESTS if args.quick
                                                            else serve.GPU_REQUESTS),
                       priced=serve.QUICK_PRICED_STEPS if args.quick else serve.PRICED_STEPS,
                       roofline_device=roofline_device)
    print(f"\nserving a trace of requests under their own plans through one running batch of "
          f"{result['capacity']} rows (host work on the meta device at {host_model} shapes, one thread"
          + (f"; the trace measured on {device} ({str(dtype).removeprefix('torch.')}), {model_name} with random "
             f"weights, kernels {result['backend']}" if "backend" in result else "; measured trace: pending, no GPU")
          + ")")
    print(serve.table(result))
    return result


def run_kernels(args, model_name, run_shape, on_gpu, device, dtype) -> dict:
    tokens, context = (args.tokens, args.context) if on_gpu else (kernels.CPU_TOKENS, kernels.CPU_CONTEXT)
    result = kernels.run(run_shape, model_name, device, dtype, args.backend, tokens, context)
    print(f"\nper kernel on {device} ({result['dtype']}), {model_name} with random weights, kernels "
          f"{result['backend']}: a full and a partial layer of the runtime, prefill over {tokens} tokens and one "
          f"decode step at context {context}, each layer call alone under torch.profiler (median of "
          f"{result['reps']} calls)")
    print(kernels.table(result))
    if not on_gpu and not args.no_static:
        result["static"] = kernels.static_report(args.out)
    return result


def run_compare(results: dict, old: dict) -> dict:
    result = compare.compare(results, old["results"])
    print(f"\nagainst {old['path']}")
    print(compare.render(results, old["results"], result))
    return {"old": old["path"], "old_meta": old["results"].get("meta")} | result


if __name__ == "__main__":
    sys.exit(exit_status(main(sys.argv[1:])))
