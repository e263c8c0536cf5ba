"""Reading checkpoint directories tensor file by tensor file: safetensors or PyTorch ``.bin``, one file
or shards with an index, as transformers and the LLaVA code base write them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

__all__ = ["checkpoint_files", "checkpoint_keys", "load_tensors", "check_checkpoint_dir"]

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
