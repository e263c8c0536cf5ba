"""``python -m bench``: predicted FLOPs and roofline time of AdaLLaVA plans, and measured wall-clock of the masked ops.

Prints the tables and, with ``--out``, writes them as JSON with the device,
dtype, commit, date and command of the run.
"""

from __future__ import annotations

import argparse
import sys

import torch

from adallava_kernels import PRESETS, check_budget, get_device, get_shape

from . import attention, kv_cache, mlp, plans
from ._common import DTYPES, metadata, write_json

DEFAULT_BUDGETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)


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
    parser.add_argument("--model", default="llava-7b", choices=sorted(PRESETS), help="model shape (default llava-7b)")
    parser.add_argument("--roofline-device", default="H200",
                        help="device the roofline predicts for: H200, H100, A100, V100, or 'measure' (this CPU)")
    parser.add_argument("--budgets", type=budget_list, default=list(DEFAULT_BUDGETS),
                        help="comma-separated latency budgets in [0.5, 1.0]")
    parser.add_argument("--tokens", type=int, default=700, help="prefill length: 576 image tokens plus a prompt")
    parser.add_argument("--context", type=int, default=700, help="positions a decode step attends to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the ops are timed (default: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the timed ops (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide the op shapes by this (MLP: hidden and intermediate; attention: hidden "
                             "and heads) (default 4 on CPU, 1 on CUDA)")
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
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = get_shape(args.model)
    roofline_device = get_device(args.roofline_device)
    on_gpu = device.type == "cuda"
    scale = args.scale or (1 if on_gpu else 4)
    op_models = args.models or (["llava-7b", "llava-13b"] if on_gpu else [args.model])
    mlp_tokens = args.mlp_tokens or list(mlp.GPU_TOKENS if on_gpu else mlp.CPU_TOKENS)
    prefill = dict(attention.GPU_PREFILL if on_gpu else attention.CPU_PREFILL)
    decode = dict(attention.GPU_DECODE if on_gpu else attention.CPU_DECODE)
    if args.attention_seqs:
        prefill["seqs"] = args.attention_seqs
    if args.attention_contexts:
        decode["contexts"] = args.attention_contexts
    if args.attention_batches:
        prefill["batches"] = decode["batches"] = args.attention_batches
    min_run_time = 0.05 if args.quick else 0.2
    dtype_name = str(dtype).removeprefix("torch.")

    plan_rows = plans.run(shape, args.budgets, roofline_device, args.tokens, args.context)
    print(f"\n{args.model}: AdaLLaVA plans, prefill over {args.tokens} tokens, decode at context {args.context}, "
          f"roofline on {roofline_device.name} ({roofline_device.source})")
    print(plans.table(plan_rows))

    names, skipped = mlp.providers(device)
    mlp_shapes = {m: mlp.scaled(get_shape(m), scale) for m in op_models}
    mlp_rows = [
        row
        for m, mlp_shape in mlp_shapes.items()
        for tokens in mlp_tokens
        for row in mlp.run_shape(m, mlp_shape, tokens, device, dtype, names, min_run_time=min_run_time)
    ]
    print(f"\nmasked MLP on {device} ({dtype_name}), sizes divided by {scale}; "
          f"providers {', '.join(names)}" + "".join(f"; {k} not run: {why}" for k, why in skipped.items()))
    print(mlp.table(mlp_rows))

    attn_names, attn_skipped = attention.providers(device)
    attn_shapes = {m: attention.scaled(get_shape(m), scale) for m in op_models}
    attn_rows = attention.run(attn_shapes, device, dtype, attn_names, prefill, decode, min_run_time)
    print(f"\nmasked attention on {device} ({dtype_name}), hidden and heads divided by {scale}; "
          f"providers {', '.join(attn_names)}"
          + "".join(f"; {k} not run: {why}" for k, why in attn_skipped.items()))
    print(attention.table(attn_rows))

    kv_shape = attention.scaled(shape, scale)
    kv_rows = kv_cache.memory_rows(args.model, kv_shape, args.budgets, args.context, args.kv_pool_gib, device, dtype)
    print(f"\nlayer-skip KV cache on {device} ({dtype_name}), {args.model} with heads divided by {scale}, "
          f"{args.context} positions per sequence, pages of {kv_cache.PAGE_SIZE}, pool of {args.kv_pool_gib:g} GiB")
    print(kv_cache.memory_table(kv_rows))
    kv_bandwidth = [
        row
        for m, s in attn_shapes.items()
        for row in kv_cache.bandwidth_rows(m, s, max(decode["batches"]), max(decode["contexts"]),
                                           max(prefill["seqs"]), device, dtype, min_run_time)
    ]
    print(kv_cache.bandwidth_table(kv_bandwidth))

    results = {
        "meta": metadata(device, dtype),
        "model": args.model,
        "shape": shape.to_dict(),
        "roofline_device": vars(roofline_device) | {"ridge_point": roofline_device.ridge_point},
        "plans": {"num_tokens": args.tokens, "context_len": args.context, "rows": plan_rows},
        "mlp": {
            "scale": scale,
            "shapes": {m: s.to_dict() for m, s in mlp_shapes.items()},
            "providers": names,
            "skipped": skipped,
            "rows": mlp_rows,
        },
        "attention": {
            "scale": scale,
            "shapes": {m: s.to_dict() for m, s in attn_shapes.items()},
            "prefill": prefill,
            "decode": decode,
            "providers": attn_names,
            "skipped": attn_skipped,
            "rows": attn_rows,
        },
        "kv_cache": {
            "shape": kv_shape.to_dict(),
            "page_size": kv_cache.PAGE_SIZE,
            "pool_gib": args.kv_pool_gib,
            "memory": kv_rows,
            "bandwidth": kv_bandwidth,
        },
    }
    if args.out:
        print(f"\nwrote {write_json(args.out, results)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
