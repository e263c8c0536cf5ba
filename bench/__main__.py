"""``python -m bench``: does the wall-clock follow the FLOPs an AdaLLaVA plan predicts, op by op and end to end?

Prints the predicted cost of the plans, the measured tables of the masked
MLP, the masked attention, the layer-skip KV cache and the whole model under
many plans, then the validation table: per op, the Pearson correlation of
measured time with predicted FLOPs, the fitted line, the worst deviation
from proportionality and a verdict. With ``--out DIR`` it writes
``results.json`` (every row, with the device, dtype, commit, date and
command), ``report.md`` and ``plot.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from adallava_kernels import PRESETS, check_budget, get_device, get_shape

from pathlib import Path

from . import attention, kv_cache, mlp, plans, report
from . import model as model_bench
from ._common import DTYPES, metadata, progress, write_json

DEFAULT_BUDGETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)
SECTIONS = ("mlp", "attention", "kv", "model")


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


def int_list(text: str) -> list[int]:
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="model shape (default llava-7b on CUDA, tiny on CPU)")
    parser.add_argument("--only", type=section_list, default=list(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                        help="kernels the model section runs (default auto: Triton on CUDA)")
    parser.add_argument("--decode-steps", type=int, default=model_bench.DECODE_STEPS,
                        help="decode steps the model section times per plan")
    parser.add_argument("--random-plans", type=int, default=model_bench.RANDOM_PLANS,
                        help="random plans the model section adds to the budgets' plans")
    parser.add_argument("--roofline-device", default="H200",
                        help="device the roofline predicts for: H200, H100, A100, V100, or 'measure' (this CPU)")
    parser.add_argument("--budgets", type=budget_list, default=list(DEFAULT_BUDGETS),
                        help="comma-separated latency budgets in [0.5, 1.0]")
    parser.add_argument("--tokens", type=int, default=700,
                        help="prefill length of the plans table and, on CUDA, of the model section "
                             f"(on CPU the model section uses {model_bench.CPU_TOKENS})")
    parser.add_argument("--context", type=int, default=700, help="positions a decode step attends to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the ops are timed (default: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the timed ops (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide the op shapes by this (MLP: hidden and intermediate; attention: hidden "
                             "and heads) (default 4 on CPU, 1 on CUDA and for tiny)")
    parser.add_argument("--models", type=lambda t: t.split(","), default=None,
                        help="models whose ops are timed (default: --model on CPU; llava-7b,llava-13b on CUDA)")
    parser.add_argument("--mlp-tokens", type=int_list, default=None,
                        help="tokens per MLP call (default 1,8,64 on CPU; 1,8,64,700,4096 on CUDA)")
    parser.add_argument("--attention-seqs", type=int_list, default=None,
                        help="attention prefill lengths (default 64 on CPU; 700,2048,8192 on CUDA)")
    parser.add_argument("--attention-contexts", type=int_list, default=None,
                        help="attention decode contexts (default 128 on CPU; 700,4096 on CUDA)")
    parser.add_argument("--attention-batches", type=int_list, default=None,
                        help="attention batch sizes (default 1 on CPU; 1,8 on CUDA)")
    parser.add_argument("--kv-pool-gib", type=float, default=40.0,
                        help="pool size for the sequences-per-pool column of the KV-cache table (default 40 GiB)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--out", default=None, type=Path,
                        help="directory for results.json, report.md and plot.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    model_name = args.model or ("llava-7b" if on_gpu else "tiny")
    shape = get_shape(model_name)
    roofline_device = get_device(args.roofline_device)
    scale = args.scale or (1 if on_gpu or model_name == "tiny" else 4)
    op_models = args.models or (["llava-7b", "llava-13b"] if on_gpu else [model_name])
    min_run_time = 0.05 if args.quick else 0.2
    dtype_name = str(dtype).removeprefix("torch.")
    results = {
        "meta": metadata(device, dtype),
        "model": model_name,
        "shape": shape.to_dict(),
        "sections": args.only,
        "roofline_device": vars(roofline_device) | {"ridge_point": roofline_device.ridge_point},
    }
    report_rows: list[dict] = []

    plan_rows = plans.run(shape, args.budgets, roofline_device, args.tokens, args.context)
    print(f"\n{model_name}: AdaLLaVA plans, prefill over {args.tokens} tokens, decode at context {args.context}, "
          f"roofline on {roofline_device.name} ({roofline_device.source})")
    print(plans.table(plan_rows))
    results["plans"] = {"num_tokens": args.tokens, "context_len": args.context, "rows": plan_rows}

    if "mlp" in args.only:
        results["mlp"] = run_mlp(args, op_models, scale, device, dtype, min_run_time)
        report_rows += mlp.report_rows(results["mlp"]["rows"])
    prefill, decode = attention_cases(args, on_gpu)
    if "attention" in args.only:
        results["attention"] = run_attention(op_models, scale, device, dtype, prefill, decode, min_run_time)
        report_rows += attention.report_rows(results["attention"]["rows"])
    if "kv" in args.only:
        results["kv_cache"] = run_kv(args, model_name, shape, op_models, scale, device, dtype, prefill, decode,
                                     min_run_time)
    if "model" in args.only:
        results["model_runs"] = run_model(args, model_name, shape, on_gpu, scale, device, dtype, roofline_device,
                                          min_run_time)
        report_rows += model_bench.report_rows(results["model_runs"]["rows"])

    reports = report.summarize(report_rows) if report_rows else []
    results["report"] = {"min_pearson": report.MIN_PEARSON, "max_deviation": report.MAX_DEVIATION,
                         "rows": report_rows, "series": report.report_json(reports)}
    if reports:
        print(f"\nvalidation on {results['meta']['device']} ({dtype_name}): measured time against predicted FLOPs")
        print(report.table(reports))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", results)
        (args.out / "report.md").write_text(report.markdown(reports, results["meta"]))
        if report_rows:
            report.plot(report_rows, args.out / "plot.png")
        print(f"\nwrote {args.out}/results.json, report.md" + (", plot.png" if report_rows else ""))
    return results


def run_mlp(args, op_models, scale, device, dtype, min_run_time) -> dict:
    names, skipped = mlp.providers(device)
    tokens = args.mlp_tokens or list(mlp.GPU_TOKENS if device.type == "cuda" else mlp.CPU_TOKENS)
    shapes = {m: mlp.scaled(get_shape(m), scale) for m in op_models}
    cases = [(m, s, t) for m, s in shapes.items() for t in tokens]
    rows = [
        row
        for m, s, t in progress(cases, "mlp")
        for row in mlp.run_shape(m, s, t, device, dtype, names, min_run_time=min_run_time)
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


def run_attention(op_models, scale, device, dtype, prefill, decode, min_run_time) -> dict:
    names, skipped = attention.providers(device)
    shapes = {m: attention.scaled(get_shape(m), scale) for m in op_models}
    rows = []
    for m in progress(shapes, "attention"):
        rows += attention.run({m: shapes[m]}, device, dtype, names, prefill, decode, min_run_time)
    print(f"\nmasked attention on {device} ({str(dtype).removeprefix('torch.')}), hidden and heads divided by "
          f"{scale}; providers {', '.join(names)}" + "".join(f"; {k} not run: {why}" for k, why in skipped.items()))
    print(attention.table(rows))
    return {"scale": scale, "shapes": {m: s.to_dict() for m, s in shapes.items()}, "prefill": prefill,
            "decode": decode, "providers": names, "skipped": skipped, "rows": rows}


def run_kv(args, model_name, shape, op_models, scale, device, dtype, prefill, decode, min_run_time) -> dict:
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
                                           max(prefill["seqs"]), device, dtype, min_run_time)
    ]
    print(kv_cache.bandwidth_table(bandwidth))
    return {"shape": kv_shape.to_dict(), "page_size": kv_cache.PAGE_SIZE, "pool_gib": args.kv_pool_gib,
            "memory": memory, "bandwidth": bandwidth}


def run_model(args, model_name, shape, on_gpu, scale, device, dtype, roofline_device, min_run_time) -> dict:
    # On a CPU the full-size stacks take too long; tiny runs as it is.
    run_shape = shape
    if not (on_gpu or model_name == "tiny"):
        run_shape = dataclasses.replace(attention.scaled(shape, scale), intermediate_size=shape.intermediate_size // scale)
    tokens = args.tokens if on_gpu else model_bench.CPU_TOKENS
    rows = model_bench.run(run_shape, model_name, args.budgets, device, dtype, roofline_device, tokens,
                           backend=args.backend, min_run_time=min_run_time, decode_steps=args.decode_steps,
                           random_count=args.random_plans)
    print(f"\nAdaLLaVA end to end on {device} ({str(dtype).removeprefix('torch.')}), {model_name} with random "
          f"weights, prefill over {tokens} tokens, {args.decode_steps} decode steps, kernels {args.backend}")
    print(model_bench.table(rows))
    return {"shape": run_shape.to_dict(), "tokens": tokens, "decode_steps": args.decode_steps,
            "backend": args.backend, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
