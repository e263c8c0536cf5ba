"""AdaLLaVA's training step, and a small script that fine-tunes on a local JSON of LLaVA conversations.

The loss is the paper's: the negative log-likelihood of the answer under a
plan sampled (Gumbel-softmax rounds, straight-through) for a budget drawn
uniformly from [0.5, 1.0] per sample. The LLM and the scheduler (with the
latency encoder) train at their own learning rates (1e-5 and 1e-4); the
vision tower is frozen.

    python -m model.train --model DIR --data conversations.json --images IMAGE_DIR \\
        --steps 100 --batch-size 4 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch

from adallava_kernels.budget import MAX_BUDGET, MIN_BUDGET

from .config import quiet_model_type_warning
from .modeling import AdaLlavaForConditionalGeneration
from .outputs import IGNORE_INDEX

__all__ = ["LLM_LR", "SCHEDULER_LR", "build_optimizer", "random_budgets", "training_step", "encode_conversation",
           "batches", "main"]

LLM_LR = 1e-5
SCHEDULER_LR = 1e-4


def build_optimizer(
    model: AdaLlavaForConditionalGeneration, llm_lr: float = LLM_LR, scheduler_lr: float = SCHEDULER_LR
) -> torch.optim.AdamW:
    """AdamW over the LLM (and projector) at ``llm_lr`` and the scheduler at ``scheduler_lr``; freezes the vision tower."""
    model.model.vision_tower.requires_grad_(False)
    scheduler = {id(p) for p in model.scheduler_parameters()}
    llm = [p for p in model.parameters() if p.requires_grad and id(p) not in scheduler]
    return torch.optim.AdamW([
        {"params": llm, "lr": llm_lr, "name": "llm"},
        {"params": model.scheduler_parameters(), "lr": scheduler_lr, "name": "scheduler"},
    ])


def random_budgets(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One budget per sample, uniform in [0.5, 1.0]."""
    return MIN_BUDGET + (MAX_BUDGET - MIN_BUDGET) * torch.rand(batch, generator=generator, dtype=torch.float64)


def training_step(
    model: AdaLlavaForConditionalGeneration,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator | None = None,
) -> float:
    """One optimiser step on ``batch`` (``input_ids``, ``attention_mask``, ``labels``, optional
    ``pixel_values``) under random budgets; returns the loss."""
    model.train()
    budgets = random_budgets(batch["input_ids"].shape[0], generator)
    out = model(**batch, latency_budget=budgets, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return float(out.loss.detach())


# -- data ------------------------------------------------------------------------

_ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def encode_conversation(processor, conversation: Sequence[dict], image=None) -> dict[str, torch.Tensor]:
    """Token ids and labels of one LLaVA-1.5 conversation (``USER: ... ASSISTANT: ...</s>``): labels
    are the assistant's tokens, ``IGNORE_INDEX`` elsewhere."""
    tokenizer = processor.tokenizer
    pieces: list[tuple[str, bool]] = []
    for turn in conversation:
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversation turns must come from 'human' or 'gpt', got {turn.get('from')!r}")
        if role == "USER":
            pieces.append((f"USER: {turn['value']} ASSISTANT:", False))
        else:
            pieces.append((f" {turn['value']}{tokenizer.eos_token or ''}", True))
    ids, labels = [], []
    pixel_values = None
    for i, (text, is_answer) in enumerate(pieces):
        if i == 0 and image is not None:
            encoded = processor(images=image, text=text, return_tensors="pt")
            pixel_values = encoded["pixel_values"]
            piece = encoded["input_ids"][0].tolist()
        else:
            piece = tokenizer(text, add_special_tokens=i == 0)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values[0]
    return out


def _collate(samples: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (the latency token goes before each sample's first answer token)."""
    width = max(s["input_ids"].numel() for s in samples)

    def pad(t, value):
        return torch.cat([t, t.new_full((width - t.numel(),), value)])

    batch = {
        "input_ids": torch.stack([pad(s["input_ids"], pad_token_id) for s in samples]),
        "labels": torch.stack([pad(s["labels"], IGNORE_INDEX) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
    }
    if all("pixel_values" in s for s in samples):
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    return batch


def batches(processor, records: list[dict], image_dir: Path | None, batch_size: int, seed: int = 0) -> Iterator[dict]:
    """Shuffled batches, forever, of LLaVA-format records (``conversations`` and an optional ``image``)."""
    from PIL import Image

    pad = processor.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    order = random.Random(seed)
    while True:
        chosen = order.sample(records, min(batch_size, len(records)))
        samples = []
        for record in chosen:
            image = None
            if record.get("image"):
                if image_dir is None:
                    raise ValueError(f"record {record.get('id')!r} names an image, but no --images directory was given")
                image = Image.open(image_dir / record["image"]).convert("RGB")
            samples.append(encode_conversation(processor, record["conversations"], image))
        yield _collate(samples, pad)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoProcessor

    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="local LLaVA or AdaLLaVA checkpoint directory")
    parser.add_argument("--data", required=True, type=Path, help="JSON list of LLaVA-format conversations")
    parser.add_argument("--images", type=Path, help="directory the records' image paths are relative to")
    parser.add_argument("--switch-kind", choices=["L", "H"], help="override the checkpoint's switch kind")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--llm-lr", type=float, default=LLM_LR)
    parser.add_argument("--scheduler-lr", type=float, default=SCHEDULER_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="save the trained model (and processor) here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    overrides = {} if args.switch_kind is None else {"switch_kind": args.switch_kind}
    model = AdaLlavaForConditionalGeneration.from_pretrained(args.model, **overrides)
    with quiet_model_type_warning():
        processor = AutoProcessor.from_pretrained(args.model)
    records = json.loads(args.data.read_text())
    if not isinstance(records, list) or not records:
        raise SystemExit(f"{args.data}: expected a non-empty JSON list of conversations")
    optimizer = build_optimizer(model, args.llm_lr, args.scheduler_lr)
    generator = torch.Generator().manual_seed(args.seed)
    data = batches(processor, records, args.images, args.batch_size, args.seed)
    for step in range(1, args.steps + 1):
        loss = training_step(model, optimizer, next(data), generator)
        print(f"step {step}/{args.steps}  loss {loss:.4f}", flush=True)
    if args.out is not None:
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
