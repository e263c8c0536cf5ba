"""The same requests through a vLLM engine, with mixed plans against every request at the full plan.

Run in the venv that has vLLM (``make test-vllm`` builds ``.venv-vllm``)::

    python -m bench.vllm_serve --out bench/out/vllm.json

A random Llama of ``--layers`` layers (hidden ``--hidden``, heads of 64, a quarter as many KV heads,
2.75 times as many MLP neurons) is
saved to a temporary directory and served by the AdaLLaVA plug-in (``adallava_kernels.vllm``).
``--requests`` requests of ``--prompt`` random tokens each generate ``--new-tokens`` tokens, greedy,
all submitted at once; three times: every request at the full plan (no ``extra_args``), then each with the
plan AdaLLaVA's scheduler would give it (:func:`request_plans`: the best -L or -H plan,
alternating, for budgets spread over [0.5, 1.0], over random switch logits), then every request
under the first of those plans (-L at budget 0.5). Reported per run: output
tokens per second, the mean time to the first token (TTFT) and the mean time per output token after
the first (TPOT: the decode steps alone), both from vLLM's request metrics (:func:`_run`), the process's CPU
seconds per wall second, and TPOT over the full plan's beside the FLOPs the batch's plans predict
for a decode step over the full plan's, as the plug-in runs it (each layer over the union of the rows'
units, vLLM's attention over every head; ``adallava_kernels.cost.batch_decode_cost``). Each kind's
whole batch runs once untimed first; ``--repeats`` goes round the kinds that many times and keeps
each kind's lowest TPOT.
``--saved`` prints, without vLLM, what one request's -L and -H plans save per token in vLLM and in the
plan runtime (README's table). On a GPU this needs an official vLLM wheel built for the installed torch;
that row is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (heads of 64; 2.75x as many neurons)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each kind, taken in turn (the lowest TPOT is kept)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--saved", action="store_true",
                        help="print what a plan saves per token in vLLM and in the plan runtime (LLaVA-7B, the cost "
                             "model; no vLLM needed) and exit")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 and not args.saved:
        parser.error(f"--new-tokens must be at least 2 (TPOT is over the tokens after the first), got {args.new_tokens}")
    return args


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _generate_s(llm, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def _run(llm, prompts, params) -> dict:
    """One batch through the engine. TTFT and TPOT come from vLLM's request metrics (the engine core's
    timestamps: TTFT from queued to first token, TPOT from first to last token over the tokens after the
    first, vLLM's own definitions; each the mean over the requests), so a run's prefill does not count in
    its time per output token. Where the metrics are missing, the batch is run to its first token first,
    and TPOT is what the whole run took beyond that, over its steps after the first."""
    cpu = _cpu_seconds()
    wall, outputs = _generate_s(llm, prompts, params)
    cpu_per_wall = (_cpu_seconds() - cpu) / wall
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = max(len(o.outputs[0].token_ids) for o in outputs)
    timed = _from_metrics(outputs)
    if timed is None:
        first_s, _ = _generate_s(llm, prompts, [_shortened(p, 1) for p in params])
        timed = {"ttft_ms": 1000 * first_s, "tpot_ms": 1000 * max(wall - first_s, 0.0) / (steps - 1),
                 "timed_by": "a run to the first token"}
    return {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall, **timed,
            "cpu_per_wall": cpu_per_wall}


def _from_metrics(outputs) -> dict | None:
    stats = [getattr(o, "metrics", None) for o in outputs]
    if not stats or any(s is None or not getattr(s, "first_token_ts", 0) for s in stats):
        return None
    ttft = [s.first_token_ts - s.queued_ts for s in stats]
    tpot = [(s.last_token_ts - s.first_token_ts) / (len(o.outputs[0].token_ids) - 1) for s, o in zip(stats, outputs)]
    return {"ttft_ms": 1000 * statistics.mean(ttft), "tpot_ms": 1000 * statistics.mean(tpot),
            "timed_by": "vLLM's request metrics"}


def _shortened(params, tokens: int):
    """The same request's params, to ``tokens`` new tokens."""
    out = params.clone()
    out.max_tokens, out.min_tokens = tokens, min(out.min_tokens, tokens)
    return out


def request_plans(shape, count: int, seed: int = 0) -> list:
    """``count`` (label, plan) pairs: -L and -H alternating, budgets evenly over [0.5, 1.0], each plan the best
    for its budget over random switch logits of its own (the scheduler's plan at inference)."""
    import torch

    from adallava_kernels import UnitScheme, best_plan

    from .plans import random_scores

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        kind = "LH"[i % 2]
        budget = 0.5 + 0.5 * i / max(count - 1, 1)
        scheme = UnitScheme.default(kind, shape)
        out.append((f"{kind} {budget:.3f}", best_plan(scheme, budget, random_scores(scheme, generator))))
    return out


def _predicted_flops(shape, context: int, batches: dict) -> dict:
    """Per run, a decode step's FLOPs over the full plan's for its batch of plans, as the plug-in runs it: each
    layer over the union of the rows' units, vLLM's attention over every head
    (``batch_decode_cost(union=True, every_head_attends=True)``), at ``context`` positions."""
    from adallava_kernels.cost import batch_decode_cost

    def flops(plans):
        return batch_decode_cost(shape, context, plans, union=True, every_head_attends=True).flops

    full = flops([None] * len(next(iter(batches.values()))))
    return {name: flops(plans) / full for name, plans in batches.items()}


def saved_in_vllm(model: str = "llava-7b", context: int = 1024, budget: float = 0.75, seed: int = 0) -> dict:
    """Per decoded token of one request, relative to the dense model: FLOPs, weight bytes read, KV bytes read
    and KV memory of the best -L and -H plans at ``budget`` (random switch logits of ``seed``), in the plan
    runtime (``decode_cost``) and in vLLM (one row over its own plan's units, vLLM's attention over every
    head, every layer's and head's KV pages reserved)."""
    import torch

    from adallava_kernels import UnitScheme, best_plan, get_shape
    from adallava_kernels.cost import batch_decode_cost, decode_cost, kv_cache_bytes

    from .plans import random_scores

    shape = get_shape(model)
    dense = decode_cost(shape, context)
    dense_kv_memory = kv_cache_bytes(shape, context)

    def ratios(cost, kv_memory):
        reads = {name: sum(getattr(op, name) for op in cost.ops()) for name in ("weight_bytes", "kv_load_bytes")}
        dense_reads = {name: sum(getattr(op, name) for op in dense.ops()) for name in reads}
        return {"flops": cost.flops / dense.flops, "weight_reads": reads["weight_bytes"] / dense_reads["weight_bytes"],
                "kv_reads": reads["kv_load_bytes"] / dense_reads["kv_load_bytes"], "kv_memory": kv_memory}

    rows = {}
    for kind in "LH":
        scheme = UnitScheme.default(kind, shape)
        plan = best_plan(scheme, budget, random_scores(scheme, torch.Generator().manual_seed(seed)))
        rows[f"-{kind}, plan runtime"] = ratios(decode_cost(shape, context, plan),
                                                kv_cache_bytes(shape, context, plan) / dense_kv_memory)
        rows[f"-{kind}, in vLLM"] = ratios(batch_decode_cost(shape, context, [plan], union=True, every_head_attends=True),
                                           1.0)
    return rows


def saved_table(rows: dict) -> str:
    """:func:`saved_in_vllm` as README's markdown table."""
    lines = ["| | FLOPs | weight reads | KV reads | KV memory |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['flops']:.2f} | {row['weight_reads']:.2f} | {row['kv_reads']:.2f} | "
                     f"{row['kv_memory']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.saved:
        rows = saved_in_vllm()
        print(saved_table(rows))
        return rows
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams

    from adallava_kernels import ModelShape
    from adallava_kernels.vllm import ARCHITECTURE, PLAN_KEY, PLANS_PROCESSOR

    heads = args.hidden // 64
    config = LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         head_dim=64, max_position_embeddings=2048)
    shape = ModelShape.from_hf_config(config)
    directory = tempfile.mkdtemp(prefix="adallava-vllm-bench-")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    llm = LLM(model=directory, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              hf_overrides={"architectures": [ARCHITECTURE]}, logits_processors=[PLANS_PROCESSOR],
              max_model_len=args.prompt + args.new_tokens + 8, kv_cache_memory_bytes=512 << 20, seed=0,
              enable_prefix_caching=False, disable_log_stats=False)  # the request metrics: TTFT, TPOT
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, config.vocab_size, (args.prompt,), generator=g).tolist()}
               for _ in range(args.requests)]
    plans = request_plans(shape, args.requests)
    greedy = dict(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    kinds = {
        "all full": [SamplingParams(**greedy) for _ in prompts],
        "mixed plans": [SamplingParams(**greedy, extra_args={PLAN_KEY: plan.to_json()}) for _, plan in plans],
        # Every request under the same plan (the lowest budget's -L plan): the savings a batch keeps when its
        # plans agree.
        "one -L plan": [SamplingParams(**greedy, extra_args={PLAN_KEY: plans[0][1].to_json()}) for _ in prompts],
    }
    # Every kind's whole batch once before any is timed: the first batch of 16 (a warm-up of 2 requests did
    # not do) ran about 10% slower than the same batch later, whichever kind it was. The repeats go round
    # the kinds, so a drifting machine touches each alike.
    for params in kinds.values():
        _generate_s(llm, prompts, [_shortened(p, 1) for p in params])
        _generate_s(llm, prompts, [_shortened(p, 4) for p in params])
    runs = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, params in kinds.items():
            runs[name].append(_run(llm, prompts, params))
    rows = {name: min(kind_runs, key=lambda r: r["tpot_ms"]) for name, kind_runs in runs.items()}
    import vllm

    predicted = _predicted_flops(shape, args.prompt + args.new_tokens // 2,
                                 {"all full": [None] * len(prompts), "mixed plans": [p for _, p in plans],
                                  "one -L plan": [plans[0][1]] * len(prompts)})
    for name, row in rows.items():
        row["flops_vs_full"] = predicted[name]
        row["tpot_vs_full"] = row["tpot_ms"] / rows["all full"]["tpot_ms"]
    results = {"vllm": vllm.__version__, "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
               "shape": shape.to_dict(), "requests": args.requests, "prompt": args.prompt,
               "new_tokens": args.new_tokens, "plans": [name for name, _ in plans], "rows": rows,
               "mean_budget": statistics.mean(float(name.split()[1]) for name, _ in plans)}
    print(f"vLLM {vllm.__version__} on the CPU ({torch.get_num_threads()} threads): {args.requests} requests, "
          f"{args.prompt} prompt tokens, {args.new_tokens} new tokens each, {args.layers} layers")
    print(f"{'run':<12} {'tokens/s':>9} {'TTFT ms':>8} {'TPOT ms':>8} {'CPU/wall':>8} {'TPOT/full':>9} "
          f"{'FLOPs/full':>10}")
    for name, row in rows.items():
        print(f"{name:<12} {row['tokens_per_s']:>9.1f} {row['ttft_ms']:>8.1f} {row['tpot_ms']:>8.2f} "
              f"{row['cpu_per_wall']:>8.2f} "
              f"{row['tpot_vs_full']:>9.3f} {row['flops_vs_full']:>10.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
