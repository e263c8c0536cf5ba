"""Convert a checkpoint of the reference AdaLLaVA code (the LLaVA code base's layout) to a directory
``AdaLlavaForConditionalGeneration.from_pretrained`` loads.

    python -m model.convert --checkpoint ada-llava-L-v1.5-7b --vision-tower clip-vit-large-patch14-336 --out OUT

The reference saves ``model_type`` ``ada_llava_llama`` (``scheduler_type``, ``scheduler_rank``,
``num_prefix_layers``, ``token_selecting`` and LLaVA's ``mm_*`` keys in its config) and the keys
``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``model.mm_projector.{0,2}``, ``lm_head``,
``scheduler.mlp_head`` and ``scheduler.scheduler_up_proj.net.{0,1,3}``; it loads the vision tower
from its CLIP checkpoint (``mm_vision_tower``), so a copy of the tower in the checkpoint is ignored
here too. The output holds the tensors unchanged (or cast with ``--dtype``) in the layout llava-hf
publishes, plus ``latency_encoder.*`` and ``scheduler.*``; its config is an ``AdaLlavaConfig``; its
processor is the checkpoint's tokenizer with an ``<image>`` placeholder added (past the model's
vocabulary, whose tensors are not resized) and the CLIP image processor.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig

from adallava_kernels.checks import check_output_dir
from adallava_kernels.cli import ArgumentParser

from .checkpoint import (check_checkpoint_dir, check_tensor_files, checkpoint_files, checkpoint_keys, load_tensors,
                         read_config)
from .config import AdaLlavaConfig

__all__ = ["main", "convert", "check_sources", "reference_config", "rename_reference_key", "rename_clip_key",
           "LLAVA_V1_SYSTEM_PROMPT"]

# LLaVA-1.5's conversation template ("llava_v1"), which the reference evaluates with.
LLAVA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range",
)
# Reference key -> output key (llava-hf layout). Tensors the reference rebuilds at load time
# (rotary inv_freq) and its copy of the CLIP tower map to None: dropped.
_RENAMES = [
    (r"model\.embed_tokens\.(weight)", r"language_model.model.embed_tokens.\1"),
    (r"model\.norm\.(weight)", r"language_model.model.norm.\1"),
    (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),
    (r"model\.layers\.(\d+)\.((self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight)", r"language_model.model.layers.\1.\2"),
    (r"model\.layers\.(\d+)\.((input|post_attention)_layernorm\.weight)", r"language_model.model.layers.\1.\2"),
    (r"model\.mm_projector\.0\.(weight|bias)", r"multi_modal_projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"multi_modal_projector.linear_2.\1"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
    (r"scheduler\.mlp_head\.(weight|bias)", r"scheduler.proj.\1"),
    (r"scheduler\.scheduler_up_proj\.net\.([013])\.(weight|bias)", r"latency_encoder.net.\1.\2"),
    (r"model\.vision_tower\..*", None),
]
_CLIP_IGNORED = re.compile(r"(text_model\..*|text_projection\.weight|visual_projection\.weight|logit_scale"
                           r"|vision_model\.embeddings\.position_ids)")


def rename_reference_key(key: str) -> str | None:
    """The output name of a reference checkpoint key (``None``: dropped); ``KeyError`` if it has none."""
    for pattern, target in _RENAMES:
        if re.fullmatch(pattern, key):
            return None if target is None else re.sub(pattern, target, key)
    raise KeyError(key)


def rename_clip_key(key: str) -> str | None:
    """The output name of a CLIP checkpoint key (``None``: not part of LLaVA's tower); ``KeyError`` if unknown."""
    if _CLIP_IGNORED.fullmatch(key):
        return None
    if key.startswith("vision_model."):
        return "vision_tower." + key
    raise KeyError(key)


# The model types of the reference code's checkpoints, and of the CLIP checkpoints it loads its tower from.
REFERENCE_MODEL_TYPES = ("ada_llava_llama",)
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def _vision_config(clip_dir: Path) -> CLIPVisionConfig:
    config = json.loads((clip_dir / "config.json").read_text())
    return CLIPVisionConfig(**config.get("vision_config", config))


def _check_model_type(name: str, directory: Path, config: dict, expected: tuple[str, ...], what: str,
                      hint: str = "") -> None:
    if config.get("model_type") not in expected:
        raise ValueError(f"{name} {str(directory)!r} is not {what}: its config.json has model_type "
                         f"{config.get('model_type')!r}, expected {' or '.join(map(repr, expected))}{hint}")


def _check_reference(config: dict, source: Path) -> None:
    """Refuse what this converter does not reproduce, naming the config key."""
    rules = [
        ("mm_projector_type", config.get("mm_projector_type") == "mlp2x_gelu", "'mlp2x_gelu'"),
        ("mm_vision_select_feature", config.get("mm_vision_select_feature", "patch") in ("patch", "cls_patch"),
         "'patch' or 'cls_patch'"),
        ("mm_use_im_start_end", not config.get("mm_use_im_start_end", False), "false"),
        ("mm_patch_merge_type", config.get("mm_patch_merge_type", "flat") == "flat", "'flat'"),
        ("token_selecting", config.get("token_selecting", "none") in ("none", "prumerge"), "'none' or 'prumerge'"),
        ("scheduler_type", config.get("scheduler_type") in ("L", "H"), "'L' or 'H'"),
    ]
    # Left out, transformers would take LLaMA-7B's size for the language model.
    rules += [(key, _positive_int(config.get(key)), "a positive int")
              for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")]
    for key, ok, expected in rules:
        if not ok:
            raise ValueError(f"{source}/config.json: {key} must be {expected} to convert, got {config.get(key)!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def reference_config(reference_dir: Path, clip_dir: Path, image_token_id: int) -> AdaLlavaConfig:
    """The ``AdaLlavaConfig`` of a reference AdaLLaVA checkpoint and its CLIP tower."""
    config = json.loads((reference_dir / "config.json").read_text())
    _check_reference(config, reference_dir)
    vision = _vision_config(clip_dir)
    # None is transformers' default for every key listed (rope_scaling: deprecated if given).
    text = LlamaConfig(**{k: config[k] for k in _LLAMA_KEYS if config.get(k) is not None})
    return AdaLlavaConfig(
        switch_kind=config["scheduler_type"],
        prefix_layers=config.get("num_prefix_layers", text.num_hidden_layers // 2),
        head_rank=config.get("scheduler_rank", 8),
        gumbel_tau=5.0,  # SimpleScheduler_L/H's default
        latency_freqs=128,  # fixed in the reference's latency_encoding
        prumerge=config.get("token_selecting", "none") == "prumerge",
        prumerge_neighbors=32,
        image_aspect_ratio="pad" if config.get("image_aspect_ratio") == "pad" else None,
        system_prompt=LLAVA_V1_SYSTEM_PROMPT,
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if config.get("mm_vision_select_feature", "patch") == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )


def _renamed_keys(keys, rename, source) -> set[str]:
    """The output names of ``keys`` (those dropped left out); ``ValueError`` naming the keys ``rename`` does not
    know."""
    out, unknown = set(), []
    for key in keys:
        try:
            name = rename(key)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            out.add(name)
    if unknown:
        raise ValueError(f"{source}: keys this converter does not know: {', '.join(sorted(unknown)[:20])}"
                         + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
    return out


def _renamed(tensors: dict, rename, dtype) -> dict[str, torch.Tensor]:
    """The tensors under their output names (keys checked by :func:`_renamed_keys` first)."""
    return {name: (tensor if dtype is None else tensor.to(dtype)).contiguous().clone()
            for key, tensor in tensors.items() if (name := rename(key)) is not None}


def _expected_keys(num_layers: int) -> set[str]:
    """The non-vision keys the output must hold."""
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    keys = {f"language_model.model.layers.{i}.{name}.weight" for i in range(num_layers) for name in layer}
    keys |= {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
             "language_model.lm_head.weight", "scheduler.proj.weight", "scheduler.proj.bias"}
    keys |= {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    keys |= {f"latency_encoder.net.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    return keys


def _write_shards(shards: list[dict[str, torch.Tensor]], out: Path) -> None:
    total = len(shards)
    weight_map, size = {}, 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _tokenizer_with_image_token(reference_dir: Path):
    """The checkpoint's tokenizer with an ``<image>`` placeholder (the LLaVA code base splices images in
    by a negative id instead, so its tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def _save_processor(tokenizer, clip_dir: Path, config: AdaLlavaConfig, out: Path) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(clip_dir), tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size, vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def check_sources(reference_dir, clip_dir, out, *, names: Sequence[str] = ("checkpoint", "vision_tower", "out")
                  ) -> tuple[Path, Path, Path, dict]:
    """Everything :func:`convert` reads and writes, checked before a tensor is loaded: the reference checkpoint's
    config (its model type and the settings this converter reproduces), its tensor files (headers) and keys (every
    one known, none missing), the CLIP checkpoint's likewise, and ``out`` (a new or empty directory that can be
    written). ``ValueError`` naming the argument (``names``: the three names to use) otherwise. Returns the
    directories as paths and the reference config."""
    ref_name, clip_name, out_name = names
    reference_dir = check_checkpoint_dir(ref_name, reference_dir)
    reference = read_config(ref_name, reference_dir)
    _check_model_type(ref_name, reference_dir, reference, REFERENCE_MODEL_TYPES,
                      "a checkpoint of the reference AdaLLaVA code",
                      " (a llava-hf or AdaLLaVA checkpoint needs no conversion: python -m model.generate reads it)"
                      if reference.get("model_type") in ("llava", "adallava") else "")
    _check_reference(reference, reference_dir)
    check_tensor_files(ref_name, reference_dir)
    clip_dir = check_checkpoint_dir(clip_name, clip_dir)
    _check_model_type(clip_name, clip_dir, read_config(clip_name, clip_dir), CLIP_MODEL_TYPES, "a CLIP checkpoint")
    check_tensor_files(clip_name, clip_dir)
    out = check_output_dir(out_name, out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out_name} {str(out)!r} exists and is not empty")
    renamed = _renamed_keys(checkpoint_keys(reference_dir), rename_reference_key, reference_dir)
    missing = _expected_keys(reference.get("num_hidden_layers", 0)) - renamed
    if missing:
        raise ValueError(f"{reference_dir} lacks {', '.join(sorted(missing)[:20])}"
                         + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
    if not _renamed_keys(checkpoint_keys(clip_dir), rename_clip_key, clip_dir):
        raise ValueError(f"{clip_name} {str(clip_dir)!r} holds no vision_model.* tensors")
    return reference_dir, clip_dir, out, reference


def _write_whole(out: Path, write: Callable[[Path], None]) -> None:
    """``write(directory)`` into a new directory beside ``out``, renamed to ``out`` once it is complete: a
    conversion that fails midway (a full disk, an interrupt) leaves no half-written ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        write(staging)
        if out.exists():
            out.rmdir()  # empty: check_sources refused anything else
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert(reference_dir, clip_dir, out, *, dtype: torch.dtype | None = None) -> AdaLlavaConfig:
    """Write the converted checkpoint to ``out``; return its config. See the module docstring. Every input is
    checked first (:func:`check_sources`), and ``out`` appears only once it is complete."""
    reference_dir, clip_dir, out, reference = check_sources(reference_dir, clip_dir, out)
    tokenizer = _tokenizer_with_image_token(reference_dir) if _has_tokenizer(reference_dir) else None
    image_token = reference.get("vocab_size") if tokenizer is None else tokenizer.convert_tokens_to_ids("<image>")
    config = reference_config(reference_dir, clip_dir, image_token)
    shards = [_renamed(load_tensors(p), rename_reference_key, dtype) for p in checkpoint_files(reference_dir)]
    vision = {}
    for path in checkpoint_files(clip_dir):
        vision.update(_renamed(load_tensors(path), rename_clip_key, dtype))

    def write(directory: Path) -> None:
        _write_shards([s for s in shards if s] + [vision], directory)
        config.save_pretrained(directory)
        if tokenizer is not None:
            _save_processor(tokenizer, clip_dir, config, directory)

    _write_whole(out, write)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; a bad argument or checkpoint prints one line naming it (exit status 2), no traceback, and
    writes nothing."""
    parser = ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="reference AdaLLaVA checkpoint directory (e.g. zhuoyanxu/ada-llava-L-v1.5-7b)")
    parser.add_argument("--vision-tower", required=True, type=Path,
                        help="its CLIP checkpoint directory (mm_vision_tower: openai/clip-vit-large-patch14-336)")
    parser.add_argument("--out", required=True, type=Path, help="new directory for the converted checkpoint")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the tensors (default: as stored)")
    args = parser.parse_args(argv)
    try:
        check_sources(args.checkpoint, args.vision_tower, args.out, names=("--checkpoint", "--vision-tower", "--out"))
        config = convert(args.checkpoint, args.vision_tower, args.out, dtype=_DTYPES.get(args.dtype))
    except ValueError as error:
        line = " ".join(str(error).split())  # one line, whatever the message
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
        return 2
    print(f"wrote AdaLLaVA-{config.switch_kind} ({config.text_config.num_hidden_layers} layers, "
          f"{config.scheme.prefix_layers} prefix, PruMerge {'on' if config.prumerge else 'off'}) to {args.out}")
    if not _has_tokenizer(args.checkpoint):
        print(f"note: {args.checkpoint} has no tokenizer, so {args.out} has no processor; add one before "
              "python -m model.generate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
