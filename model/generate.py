"""Answer a question about an image under a latency budget.

    python -m model.generate --model DIR --image IMG --budget 0.75 "What is in the image?"

Prints the answer, the plan the scheduler chose, its FLOPs (prefill and
decode, from ``adallava_kernels.cost``, against the dense model) and the
measured wall-clock of ``generate``. ``--json`` prints the same as JSON.
Every argument is checked before anything is loaded: the checkpoint's
``config.json`` (a LLaVA or AdaLLaVA over a Llama) and tensor files (headers
read, none loaded), its processor, the image (decoded), the device and the
backend on it, ``--switch-kind`` against a trained scheduler; a bad one is
one line on stderr naming it, exit status 2. A checkpoint without AdaLLaVA's
latency encoder and scheduler (a llava-hf LLaVA one) runs a budget below 1.0
only with ``--allow-untrained-scheduler``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from adallava_kernels import ExecutionPlan, ModelShape, check_budget, cost
from adallava_kernels.checks import check_backend, check_device, check_int
from adallava_kernels.cli import ArgumentParser

from .checkpoint import check_llava_checkpoint, check_scheduler_overrides, holds_scheduler
from .config import quiet_model_type_warning
from .modeling import AdaLlavaForConditionalGeneration
from .prumerge import fit_image_tokens

__all__ = ["main", "plan_summary", "generation_flops", "llava_prompt", "expand_to_square", "check_args"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def llava_prompt(question: str, system_prompt: str | None = None) -> str:
    """LLaVA-1.5's single-turn prompt with one image (after ``system_prompt``, as its ``llava_v1`` template)."""
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    return prompt if system_prompt is None else f"{system_prompt} {prompt}"


def expand_to_square(image, background: tuple[int, ...]):
    """``image`` centred on a square canvas of ``background`` (LLaVA-1.5's ``image_aspect_ratio="pad"``)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _check_processor(name: str, directory: Path) -> None:
    """The checkpoint has a tokenizer and an image processor to load with ``AutoProcessor``."""
    for files, what in ((_TOKENIZER_FILES, "tokenizer"), (_PROCESSOR_FILES, "image processor")):
        if not any((directory / f).is_file() for f in files):
            raise ValueError(f"{name} {str(directory)!r} has no {what} ({' or '.join(files)}): save the processor "
                             "with the checkpoint (a converted checkpoint has one where the original had a tokenizer)")


def _check_image(name: str, path: Path) -> None:
    """``path`` is a file PIL opens and decodes (not only its header: a truncated file fails here too)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{name} must be an image file; {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name} {str(path)!r} is not an image PIL can read ({error})") from None


def _untrained_scheduler(model: Path, config: dict, budget: float) -> ValueError:
    what = ("a LLaVA checkpoint (model_type 'llava')" if config.get("model_type") == "llava"
            else "an AdaLLaVA checkpoint without its latency encoder and scheduler weights")
    return ValueError(
        f"--model {str(model)!r} holds no trained AdaLLaVA latency encoder and scheduler ({what}), so the plan for "
        f"--budget {budget} would be arbitrary; convert a released AdaLLaVA checkpoint (python -m model.convert), "
        "train one (python -m model.train), or pass --allow-untrained-scheduler to run it anyway"
    )


def check_args(args: argparse.Namespace) -> bool:
    """Check every argument before anything is loaded (the budget first); return whether the
    checkpoint holds a trained latency encoder and scheduler."""
    check_budget(args.budget)
    model, config = check_llava_checkpoint("--model", args.model)
    _check_processor("--model", model)
    _check_image("--image", args.image)
    check_int("--max-new-tokens", args.max_new_tokens, 1)
    device = check_device("--device", args.device)
    check_backend("--backend", args.backend, device)
    if args.switch_kind:
        check_scheduler_overrides("--model", model, config, {"switch_kind": args.switch_kind},
                                  {"switch_kind": "--switch-kind"})
    trained = holds_scheduler(model)
    if not trained and args.budget < 1.0 and not args.allow_untrained_scheduler:
        raise _untrained_scheduler(model, config, args.budget)
    return trained


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


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--allow-untrained-scheduler", action="store_true",
                        help="run a budget below 1.0 on a checkpoint without AdaLLaVA's scheduler (arbitrary plans)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; a bad argument or checkpoint prints one line naming it (exit status 2), no traceback."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as error:
        line = " ".join(str(error).split())  # one line, whatever the message
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from PIL import Image
    from transformers import AutoProcessor

    trained = check_args(args)
    if not trained:
        print(f"warning: {args.model} holds no trained latency encoder and scheduler: the latency token and "
              "the plan come from untrained weights", file=sys.stderr)

    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    overrides = {"prumerge": True} if args.prumerge else {}
    if args.switch_kind:
        overrides["switch_kind"] = args.switch_kind
    model = AdaLlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, **overrides).to(device).eval()
    with quiet_model_type_warning():
        processor = AutoProcessor.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")
    if model.config.image_aspect_ratio == "pad":
        mean = processor.image_processor.image_mean
        image = expand_to_square(image, tuple(int(255 * m) for m in mean))
    prompt = llava_prompt(args.question, model.config.system_prompt)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    pixel_values = inputs["pixel_values"].to(dtype)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    if model.config.prumerge:  # set by --prumerge or by the checkpoint (a converted -prumerge one)
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
    print(f"FLOPs: {cost.format_flops(flops)} ({100 * report['flops_share']:.1f}% of the dense model's "
          f"{cost.format_flops(dense)}) for {prompt} prompt tokens and {produced} new tokens")
    print(f"latency: {seconds:.3f} s on {device} ({report['dtype']}, backend {args.backend})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
