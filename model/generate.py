"""Answer a question about an image under a latency budget.

    python -m model.generate --model DIR --image IMG --budget 0.75 "What is in the image?"

Prints the answer, the plan the scheduler chose, its FLOPs (prefill and
decode, from ``adallava_kernels.cost``, against the dense model) and the
measured wall-clock of ``generate``. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from adallava_kernels import ExecutionPlan, ModelShape, cost

from .modeling import AdaLlavaForConditionalGeneration, fit_image_tokens

__all__ = ["main", "plan_summary", "generation_flops", "llava_prompt"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def llava_prompt(question: str) -> str:
    """LLaVA-1.5's single-turn prompt with one image."""
    return f"USER: <image>\n{question} ASSISTANT:"


def generation_flops(shape: ModelShape, prompt_tokens: int, new_tokens: int, plan: ExecutionPlan | None) -> float:
    """FLOPs of a prefill over ``prompt_tokens`` and ``new_tokens - 1`` decode steps (the first new token
    comes from the prefill)."""
    total = cost.prefill_flops(shape, prompt_tokens, plan)
    for step in range(1, new_tokens):
        total += cost.decode_flops(shape, prompt_tokens + step, plan)
    return total


def plan_summary(plan: ExecutionPlan) -> dict:
    """Per layer: ``"skip"``, ``"full"``, or the active heads and neurons."""
    s = plan.shape
    layers = []
    for heads, neurons in zip(plan.heads, plan.neurons):
        if not heads and not neurons:
            layers.append("skip")
        elif len(heads) == s.num_heads and len(neurons) == s.intermediate_size:
            layers.append("full")
        else:
            layers.append(f"{len(heads)}/{s.num_heads} heads, {len(neurons)}/{s.intermediate_size} neurons")
    return {"layers_run": sum(plan.layer_mask), "num_layers": s.num_layers, "layers": layers}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Sequence[str] | None = None) -> int:
    from PIL import Image
    from transformers import AutoProcessor

    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--model", required=True, type=Path, help="local LLaVA or AdaLLaVA checkpoint directory")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--budget", required=True, type=float, help="latency budget in [0.5, 1.0]")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--switch-kind", choices=["L", "H"], help="override the checkpoint's switch kind")
    parser.add_argument("--prumerge", action="store_true", help="reduce the visual tokens with PruMerge")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    overrides = {"prumerge": args.prumerge}
    if args.switch_kind:
        overrides["switch_kind"] = args.switch_kind
    model = AdaLlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, **overrides).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")
    inputs = processor(images=image, text=llava_prompt(args.question), return_tensors="pt").to(device)
    pixel_values = inputs["pixel_values"].to(dtype)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    if args.prumerge:
        counts = [f.shape[0] for f in model.image_features(pixel_values)]
        pad = processor.tokenizer.pad_token_id or 0
        input_ids, attention_mask = fit_image_tokens(input_ids, attention_mask, counts, model.config.image_token_id, pad)

    eos = processor.tokenizer.eos_token_id
    _sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids, pixel_values, attention_mask, latency_budget=args.budget,
                         max_new_tokens=args.max_new_tokens, eos_token_id=eos, backend=args.backend)
    _sync(device)
    seconds = time.perf_counter() - start

    new = out.sequences[0, input_ids.shape[1]:]
    stop = (new == eos).nonzero()
    produced = int(stop[0]) + 1 if eos is not None and stop.numel() else new.numel()
    shape, plan, prompt = model.config.shape, out.plans[0], out.prompt_tokens[0]
    flops = generation_flops(shape, prompt, produced, plan)
    dense = generation_flops(shape, prompt, produced, None)
    report = {
        "answer": processor.tokenizer.decode(new[:produced], skip_special_tokens=True).strip(),
        "budget": args.budget,
        "switch_kind": model.config.switch_kind,
        "plan": plan_summary(plan),
        "prompt_tokens": prompt,
        "new_tokens": produced,
        "flops": flops,
        "dense_flops": dense,
        "flops_share": flops / dense,
        "seconds": seconds,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": args.backend,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(report["answer"])
    print(f"plan: AdaLLaVA-{report['switch_kind']} at budget {args.budget}: "
          f"{report['plan']['layers_run']}/{report['plan']['num_layers']} layers run")
    for i, layer in enumerate(report["plan"]["layers"]):
        print(f"  layer {i:3d}: {layer}")
    print(f"FLOPs: {flops / 1e12:.4f} TFLOP ({100 * report['flops_share']:.1f}% of the dense model's "
          f"{dense / 1e12:.4f}) for {prompt} prompt tokens and {produced} new tokens")
    print(f"latency: {seconds:.3f} s on {device} ({report['dtype']}, backend {args.backend})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
