"""Reading checkpoint directories tensor file by tensor file: safetensors or PyTorch ``.bin``, one file
or shards with an index, as transformers and the LLaVA code base write them; the names a LLaVA
checkpoint's tensors take in AdaLLaVA, and the check that a load filled every parameter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

__all__ = [
    "LLAVA_KEY_MAPPING",
    "SCHEDULER_PREFIXES",
    "check_checkpoint_dir",
    "check_loaded_keys",
    "checkpoint_files",
    "checkpoint_keys",
    "load_tensors",
]

# transformers' Llava checkpoint layout (as llava-hf publishes it, and as LlavaForConditionalGeneration.
# save_pretrained writes it) to AdaLLaVA's parameter names. transformers applies these renamings only to
# model_type "llava", so a subclass with its own model_type names them itself.
LLAVA_KEY_MAPPING = {
    r"^language_model\.lm_head": "lm_head",
    r"^language_model\.model": "model.language_model",
    r"^vision_tower": "model.vision_tower",
    r"^multi_modal_projector": "model.multi_modal_projector",
}
# Parameters a plain LLaVA checkpoint does not hold: they start untrained.
SCHEDULER_PREFIXES = ("latency_encoder.", "scheduler.")

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_checkpoint_dir(name: str, directory: object) -> Path:
    """``directory`` as a ``Path`` to an existing directory with a ``config.json``, else ``ValueError``
    naming ``name``."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{name} must be a local checkpoint directory; {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{name} {str(path)!r} has no config.json: it is not a checkpoint directory")
    return path


def checkpoint_files(directory: Path) -> list[Path]:
    """The tensor files of a checkpoint, safetensors first, shards in index order."""
    directory = Path(directory)
    for index_name in _INDEX:
        index = directory / index_name
        if index.is_file():
            shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            return [directory / shard for shard in shards]
    for name in _SINGLE:
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(f"{str(directory)!r} holds no model.safetensors, pytorch_model.bin or shard index")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one file, on the CPU."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_keys(directory: Path) -> list[str]:
    """The tensor names of a checkpoint, read from the index or the safetensors headers where there is one."""
    keys = []
    for path in checkpoint_files(directory):
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                keys.extend(f.keys())
        else:
            keys.extend(load_tensors(path))
    return keys


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
    return ", ".join(keys[:20]) + more


def check_loaded_keys(model: torch.nn.Module, info: dict, source) -> bool:
    """Raise unless every checkpoint tensor mapped onto a parameter and every parameter but the
    scheduler's was loaded (``info``: transformers' loading info); return whether the latency encoder
    and scheduler were loaded."""
    scheduler_keys = {k for k in model.state_dict() if k.startswith(SCHEDULER_PREFIXES)}
    missing = set(info.get("missing_keys", ()))
    problems = []
    if info.get("unexpected_keys"):
        problems.append(f"checkpoint keys that map to no parameter: {_listed(info['unexpected_keys'])}")
    if missing - scheduler_keys:
        problems.append(f"parameters the checkpoint does not hold: {_listed(missing - scheduler_keys)}")
    if info.get("mismatched_keys"):
        problems.append(f"keys of another shape: {_listed(str(k) for k in info['mismatched_keys'])}")
    if missing & scheduler_keys and not scheduler_keys <= missing:
        problems.append(f"a partial scheduler; missing: {_listed(missing & scheduler_keys)}")
    if problems:
        raise ValueError(f"{source} is not a LLaVA or AdaLLaVA checkpoint of this model: " + "; ".join(problems))
    return not missing & scheduler_keys
