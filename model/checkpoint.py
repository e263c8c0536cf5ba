"""Reading checkpoint directories tensor file by tensor file: safetensors or PyTorch ``.bin``, one file
or shards with an index, as transformers and the LLaVA code base write them; the names a LLaVA
checkpoint's tensors take in AdaLLaVA, and the check that a load filled every parameter."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = [
    "LLAVA_KEY_MAPPING",
    "LLAVA_MODEL_TYPES",
    "SCHEDULER_PREFIXES",
    "check_checkpoint_dir",
    "check_llava_checkpoint",
    "check_loaded_keys",
    "check_scheduler_overrides",
    "check_tensor_files",
    "checkpoint_files",
    "checkpoint_keys",
    "holds_scheduler",
    "load_tensors",
    "read_config",
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
# The config model types AdaLlavaForConditionalGeneration loads: llava-hf's LLaVA and its own.
LLAVA_MODEL_TYPES = ("llava", "adallava")
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


def read_config(name: str, directory: Path) -> dict:
    """The checkpoint's ``config.json`` as a dict, else ``ValueError`` naming ``name``."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name} {str(directory)!r}: its config.json is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name} {str(directory)!r}: its config.json holds a {type(config).__name__}, not an object")
    return config


def _check_llava_config(name: str, directory: Path, config: dict) -> None:
    """A LLaVA or AdaLLaVA config with its text and vision configs, the text one a Llama's: anything else would
    have transformers build its default LLaVA-7B (about 7 billion parameters) in place of what was asked for."""
    where = f"{name} {str(directory)!r}"
    model_type = config.get("model_type")
    if model_type not in LLAVA_MODEL_TYPES:
        hint = (": a checkpoint of the reference AdaLLaVA code; convert it first (python -m model.convert)"
                if model_type == "ada_llava_llama" else "")
        raise ValueError(f"{where} is not a LLaVA or AdaLLaVA checkpoint: its config.json has model_type "
                         f"{model_type!r}, expected one of {', '.join(map(repr, LLAVA_MODEL_TYPES))}{hint}")
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{where}: its config.json has no {key}, so transformers would build a default one in "
                             f"its place")
    text_type = config["text_config"].get("model_type", "llama")
    if text_type != "llama":
        raise ValueError(f"{where}: its language model is a {text_type!r}, expected a Llama (text_config.model_type "
                         f"'llama')")


def check_tensor_files(name: str, directory: Path) -> list[Path]:
    """The checkpoint's tensor files (:func:`checkpoint_files`), each present and readable without loading a
    tensor: a safetensors header that parses and covers the file, the data of every tensor inside it (a
    truncated download fails here), a ``.bin`` archive whose index reads. ``ValueError`` naming ``name``."""
    try:
        files = checkpoint_files(directory)
    except (OSError, UnicodeDecodeError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name} {str(directory)!r}: its shard index is not readable ({type(error).__name__}: "
                         f"{error})") from None
    except ValueError as error:  # no tensor file at all
        raise ValueError(f"{name} {error}") from None
    for path in files:
        if not path.is_file():
            raise ValueError(f"{name} {str(directory)!r}: its shard index names {path.name}, which does not exist")
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            else:
                with zipfile.ZipFile(path):
                    pass
        except (SafetensorError, zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{name} {str(directory)!r}: {path.name} is not a readable tensor file ({error}); "
                             "a truncated download?") from None
    return files


def check_llava_checkpoint(name: str, directory: object) -> tuple[Path, dict]:
    """``directory`` and its config, checked as a LLaVA or AdaLLaVA checkpoint before any weight is allocated:
    a directory with a ``config.json`` of model type ``llava`` or ``adallava`` over a Llama, and tensor files
    that read (:func:`check_tensor_files`); else ``ValueError`` naming ``name``."""
    path = check_checkpoint_dir(name, directory)
    config = read_config(name, path)
    _check_llava_config(name, path, config)
    check_tensor_files(name, path)
    return path, config


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


def holds_scheduler(directory: Path) -> bool:
    """Whether the checkpoint holds AdaLLaVA's latency encoder and scheduler (read from its headers)."""
    keys = checkpoint_keys(directory)
    return all(any(k.startswith(prefix) for k in keys) for prefix in SCHEDULER_PREFIXES)


# AdaLlavaConfig settings that shape the latency encoder's and the scheduler's weights: a scheduler trained under
# one value does not load under another.
SCHEDULER_SETTINGS = ("switch_kind", "head_rank", "prefix_layers", "latency_freqs")


def check_scheduler_overrides(name: str, directory: Path, config: dict, overrides: dict,
                              options: dict[str, str] | None = None) -> None:
    """``ValueError`` where ``overrides`` (config keys given to ``from_pretrained``) change a setting of
    :data:`SCHEDULER_SETTINGS` that the checkpoint's trained scheduler was built under; ``options``: the
    command-line name of each key, for the message. transformers would fail on the weights' shapes instead."""
    if config.get("model_type") != "adallava" or not holds_scheduler(directory):
        return
    for key in SCHEDULER_SETTINGS:
        if key in overrides and key in config and overrides[key] != config[key]:
            option = (options or {}).get(key, key)
            raise ValueError(f"{option} {overrides[key]!r} contradicts {name} {str(directory)!r}, whose scheduler was "
                             f"trained with {key} {config[key]!r}; leave {option} out to use the checkpoint's")


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
