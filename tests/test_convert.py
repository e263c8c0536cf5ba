"""``python -m model.convert`` on small synthetic checkpoints in the reference AdaLLaVA layout (the LLaVA
code base's key names, config keys and shapes), checked against the reference formulas re-implemented here."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn import functional as F
from transformers import (AutoProcessor, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          PreTrainedTokenizerFast)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from model import AdaLlavaForConditionalGeneration
from model import convert as convert_cli
from model import generate as generate_cli
from model.convert import LLAVA_V1_SYSTEM_PROMPT, convert

VOCAB, HIDDEN, LAYERS, HEADS, PREFIX, RANK = 128, 64, 4, 8, 2, 2
PATCHES = 16
IMAGE_INDEX = -200  # the LLaVA code base's image placeholder in input ids


def clip_tower() -> CLIPVisionModel:
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(3)
    return CLIPVisionModel(config).eval()


def write_clip_dir(path, tower: CLIPVisionModel) -> None:
    """A CLIPModel checkpoint as openai publishes it: vision_model.*, text_model.*, projections, logit_scale."""
    path.mkdir()
    tensors = {"vision_model." + k.removeprefix("vision_model."): v.clone() for k, v in tower.state_dict().items()}
    tensors |= {"text_model.embeddings.token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(2.6),
                "visual_projection.weight": torch.randn(8, 32), "text_projection.weight": torch.randn(8, 8)}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": tower.config.to_dict(),
              "text_config": {"hidden_size": 8}, "projection_dim": 8}
    (path / "config.json").write_text(json.dumps(config))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly VOCAB tokens and no <image>, as Vicuna's fills LLaVA's vocabulary."""
    words = ["<unk>", "<s>", "</s>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(VOCAB - 5)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def reference_tensors(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the reference's key names and shapes (MHA, as its inference requires)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    t = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN, scale=1.0), "model.norm.weight": 1 + rand(HIDDEN),
         "lm_head.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            t[p + f"self_attn.{name}_proj.weight"] = rand(HIDDEN, HIDDEN)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rand(100, HIDDEN), rand(100, HIDDEN)
        t[p + "mlp.down_proj.weight"] = rand(HIDDEN, 100)
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN), 1 + rand(HIDDEN)
        t[p + "self_attn.rotary_emb.inv_freq"] = torch.rand(4)  # older transformers saved it: rebuilt, not read
    t |= {"model.mm_projector.0.weight": rand(HIDDEN, 32), "model.mm_projector.0.bias": rand(HIDDEN),
          "model.mm_projector.2.weight": rand(HIDDEN, HIDDEN), "model.mm_projector.2.bias": rand(HIDDEN)}
    switches = (LAYERS - PREFIX) * (1 if kind == "L" else 2 * HEADS)
    t |= {"scheduler.mlp_head.weight": rand(switches, HIDDEN, scale=1.0), "scheduler.mlp_head.bias": rand(switches),
          "scheduler.scheduler_up_proj.net.0.weight": 1 + rand(256), "scheduler.scheduler_up_proj.net.0.bias": rand(256),
          "scheduler.scheduler_up_proj.net.1.weight": rand(HIDDEN, 256), "scheduler.scheduler_up_proj.net.1.bias": rand(HIDDEN),
          "scheduler.scheduler_up_proj.net.3.weight": rand(HIDDEN, HIDDEN), "scheduler.scheduler_up_proj.net.3.bias": rand(HIDDEN)}
    # The LLaVA trainer also saves its frozen copy of the CLIP tower; the reference loads CLIP's instead.
    t["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.zeros(32)
    return t


def reference_config(kind: str, token_selecting: str = "none") -> dict:
    return {
        "architectures": ["AdaLlavaLlamaForCausalLM"], "model_type": "ada_llava_llama",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 100, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1,
        "num_prefix_layers": PREFIX, "scheduler_type": kind, "scheduler_rank": RANK, "token_selecting": token_selecting,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
        "torch_dtype": "float32", "use_cache": True,
    }


def write_reference_dir(path, kind, tensors, config, *, shards=True):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    tokenizer().save_pretrained(path)
    if not shards:
        torch.save(tensors, path / "pytorch_model.bin")
        return path
    keys = sorted(tensors)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tower = clip_tower()
    path = tmp_path_factory.mktemp("clip") / "clip-vit"
    write_clip_dir(path, tower)
    return path, tower


@pytest.fixture(scope="module", params=["L", "H"])
def converted(request, clip, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"ref-{kind}")
    tensors = reference_tensors(kind, seed=5 if kind == "L" else 6)
    ref = write_reference_dir(root / "ada-llava", kind, tensors, reference_config(kind), shards=kind == "L")
    assert convert_cli.main(["--checkpoint", str(ref), "--vision-tower", str(clip[0]), "--out", str(root / "out")]) == 0
    return kind, root / "out", tensors


# ------------------------------------------------------------- the reference formulas, re-implemented


def reference_units(kind, budget):
    per_layer = 1 if kind == "L" else HEADS // RANK
    total, prefix = LAYERS * per_layer, PREFIX * per_layer
    return max(0, math.floor(total * budget) - prefix), total - prefix


def reference_latency_token(t, kind, budget):
    """SimpleScheduler_{L,H}.latency_encoding: 2 pi v, 128 frequencies, then scheduler_up_proj."""
    units, switchable = reference_units(kind, budget)
    scaled = torch.tensor(units / (switchable + 1), dtype=torch.float64) * 2 * math.pi
    freqs = 1 / (10000 ** (torch.arange(128, dtype=torch.float64) / 128))
    e = torch.cat([torch.sin(scaled * freqs), torch.cos(scaled * freqs)])
    p = "scheduler.scheduler_up_proj.net."
    e = F.layer_norm(e, (256,), t[p + "0.weight"].double(), t[p + "0.bias"].double())
    e = F.gelu(e @ t[p + "1.weight"].double().T + t[p + "1.bias"].double())
    return e @ t[p + "3.weight"].double().T + t[p + "3.bias"].double()


def reference_switch_logits(t, kind, ids, pixels, tower, budget):
    """LLaVA's multimodal embedding (the image index replaced by the projected CLIP patches of layer -2),
    the latency token appended, the prefix Llama layers, then scheduler.mlp_head on the latency token."""
    with torch.no_grad():
        patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0, 1:]
    image = F.gelu(patches @ t["model.mm_projector.0.weight"].T + t["model.mm_projector.0.bias"])
    image = image @ t["model.mm_projector.2.weight"].T + t["model.mm_projector.2.bias"]
    at = ids.index(IMAGE_INDEX)
    embed = t["model.embed_tokens.weight"]
    h = torch.cat([embed[ids[:at]], image, embed[ids[at + 1:]],
                   reference_latency_token(t, kind, budget).float()[None]])[None]
    config = LlamaConfig(**{k: v for k, v in reference_config(kind).items() if k not in ("model_type", "architectures")})
    positions = torch.arange(h.shape[1])[None]
    rotary = LlamaRotaryEmbedding(config)(h, positions)
    causal = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        for i in range(PREFIX):
            layer = LlamaDecoderLayer(config, i).eval()
            layer.load_state_dict({k.removeprefix(f"model.layers.{i}."): v for k, v in t.items()
                                   if k.startswith(f"model.layers.{i}.") and "rotary" not in k})
            h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
            h = h[0] if isinstance(h, tuple) else h
    logits = h[0, -1] @ t["scheduler.mlp_head.weight"].T + t["scheduler.mlp_head.bias"]
    return logits if kind == "L" else logits.view(LAYERS - PREFIX, 2, HEADS)


# ------------------------------------------------------------------------------------------ tests


def test_converted_checkpoint_loads_every_tensor(converted):
    kind, out, tensors = converted
    model, info = AdaLlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.has_trained_scheduler
    c = model.config
    assert (c.switch_kind, c.scheme.prefix_layers, c.head_rank, c.latency_freqs, c.prumerge) == (kind, PREFIX, RANK, 128, False)
    assert c.image_aspect_ratio == "pad" and c.system_prompt == LLAVA_V1_SYSTEM_PROMPT
    assert c.image_token_id == VOCAB  # past the vocabulary, whose tensors keep their shape
    ours = model.state_dict()
    assert torch.equal(ours["lm_head.weight"], tensors["lm_head.weight"])
    assert torch.equal(ours["model.language_model.layers.3.mlp.down_proj.weight"], tensors["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(ours["model.multi_modal_projector.linear_2.bias"], tensors["model.mm_projector.2.bias"])
    assert torch.equal(ours["scheduler.proj.weight"], tensors["scheduler.mlp_head.weight"])
    assert torch.equal(ours["latency_encoder.net.1.weight"], tensors["scheduler.scheduler_up_proj.net.1.weight"])
    tower, clip = model.model.vision_tower.state_dict(), clip_tower().state_dict()
    assert tower.keys() == clip.keys() and all(torch.equal(tower[k], clip[k]) for k in clip)


def test_latency_token_equals_the_reference_formula(converted):
    kind, out, tensors = converted
    model = AdaLlavaForConditionalGeneration.from_pretrained(out).eval()
    budgets = [0.5, 0.6, 0.7, 0.75, 0.8, 0.93, 1.0]
    with torch.no_grad():
        ours = model.latency_encoder(torch.tensor(budgets))
    for b, budget in enumerate(budgets):
        torch.testing.assert_close(ours[b].double(), reference_latency_token(tensors, kind, budget), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [0.5, 0.75, 0.9])
def test_switch_logits_equal_the_reference_formulas(converted, clip, budget):
    kind, out, tensors = converted
    model = AdaLlavaForConditionalGeneration.from_pretrained(out).eval()
    words = [5, 17, 40]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([words[:1] + [model.config.image_token_id] * PATCHES + words[1:]])
    captured = []
    handle = model.scheduler.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, latency_budget=budget)
    handle.remove()
    expected = reference_switch_logits(tensors, kind, words[:1] + [IMAGE_INDEX] + words[1:], pixels, clip[1], budget)
    torch.testing.assert_close(captured[0][0], expected, atol=1e-4, rtol=1e-4)


def test_converted_checkpoint_runs_the_cli_without_the_untrained_flag(converted, tmp_path, capsys):
    _, out, _ = converted
    Image.fromarray((np.random.default_rng(0).random((40, 24, 3)) * 255).astype("uint8")).save(tmp_path / "img.png")
    args = ["w3 w4", "--model", str(out), "--image", str(tmp_path / "img.png"), "--budget", "0.75",
            "--max-new-tokens", "3", "--backend", "torch", "--json"]
    assert generate_cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    # LLaVA-1.5's system prompt (the tokenizer's unknown words), USER:, 16 patches of the padded image, ...
    assert report["prompt_tokens"] > PATCHES + 5 and report["new_tokens"] >= 1


def test_prumerge_variant_converts_and_runs_with_prumerge_on(clip, tmp_path, capsys):
    ref = write_reference_dir(tmp_path / "ref", "H", reference_tensors("H", 8), reference_config("H", "prumerge"))
    config = convert(ref, clip[0], tmp_path / "out")
    assert config.prumerge and config.prumerge_neighbors == 32
    model = AdaLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert model.config.prumerge and model.has_trained_scheduler

    # The CLI fits the prompt to PruMerge's tokens (kept ones plus the extra one) without --prumerge.
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8")).save(tmp_path / "img.png")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    prompt = generate_cli.llava_prompt("w3 w4", model.config.system_prompt)
    inputs = processor(images=Image.open(tmp_path / "img.png").convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        (image_tokens,) = [f.shape[0] for f in model.image_features(inputs["pixel_values"])]
    text_tokens = inputs["input_ids"].shape[1] - PATCHES
    args = ["w3 w4", "--model", str(tmp_path / "out"), "--image", str(tmp_path / "img.png"), "--budget", "0.75",
            "--max-new-tokens", "2", "--backend", "torch", "--json"]
    assert generate_cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == text_tokens + image_tokens + 1  # + latency token


@pytest.mark.parametrize("edit, match", [
    (lambda c, t: c.update(token_selecting="prumerge+"), r"token_selecting must be 'none' or 'prumerge' to convert, got 'prumerge\+'"),
    (lambda c, t: c.update(mm_projector_type="linear"), r"mm_projector_type must be 'mlp2x_gelu' to convert, got 'linear'"),
    (lambda c, t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(1)}), r"keys this converter does not know: model\.layers\.0\.mlp\.extra\.weight"),
    (lambda c, t: t.pop("lm_head.weight"), r"lacks language_model\.lm_head\.weight"),
    (lambda c, t: t.pop("scheduler.mlp_head.bias"), r"lacks scheduler\.proj\.bias"),
], ids=["prumerge-plus", "linear-projector", "unknown-key", "no-lm-head", "no-scheduler-bias"])
def test_converter_names_what_it_cannot_convert(clip, tmp_path, edit, match):
    config, tensors = reference_config("L"), reference_tensors("L", 9)
    edit(config, tensors)
    ref = write_reference_dir(tmp_path / "ref", "L", tensors, config)
    with pytest.raises(ValueError, match=match):
        convert(ref, clip[0], tmp_path / "out")


def test_converter_names_missing_directories(clip, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint must be a local checkpoint directory; '.*/nope' does not exist"):
        convert(tmp_path / "nope", clip[0], tmp_path / "out")
    ref = write_reference_dir(tmp_path / "ref", "L", reference_tensors("L", 9), reference_config("L"))
    with pytest.raises(ValueError, match=r"vision_tower must be a local checkpoint directory; '.*/nope' does not"):
        convert(ref, tmp_path / "nope", tmp_path / "out")


# -- the command line: a bad argument is one line, exit status 2, and nothing written ------------------------

def convert_error(capsys, argv) -> str:
    """Run the CLI expecting a refusal: exit status 2 and one line on stderr, no traceback; returns it."""
    capsys.readouterr()
    assert convert_cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m model.convert: error: "), captured.err
    assert not captured.out
    return lines[0]


def _truncate_first_shard(ref):
    shard = ref / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])


# (what to break in the reference dir, its config or its tensors; the line that refuses it)
BAD_SOURCES = {
    "missing-checkpoint": (lambda ref, clip, out: ref.rename(ref.parent / "gone"),
                           r"--checkpoint must be a local checkpoint directory; '.*/ref' does not exist"),
    "llava-hf": (lambda ref, clip, out: _config_edit(ref, model_type="llava"),
                 r"--checkpoint '.*' is not a checkpoint of the reference AdaLLaVA code: its config.json has model_type "
                 r"'llava', expected 'ada_llava_llama' \(a llava-hf or AdaLLaVA checkpoint needs no conversion"),
    "no-layer-count": (lambda ref, clip, out: _config_edit(ref, num_hidden_layers=None),
                       r"config.json: num_hidden_layers must be a positive int to convert, got None"),
    "truncated-shard": (lambda ref, clip, out: _truncate_first_shard(ref),
                        r"--checkpoint '.*': model-00001-of-00002.safetensors is not a readable tensor file"),
    "not-clip": (lambda ref, clip, out: _config_edit(clip, model_type="siglip"),
                 r"--vision-tower '.*' is not a CLIP checkpoint: its config.json has model_type 'siglip'"),
    "out-not-empty": (lambda ref, clip, out: (out.mkdir(), (out / "keep.txt").write_text("mine")),
                      r"--out '.*/out' exists and is not empty"),
}


def _config_edit(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_convert_cli_refuses_bad_sources_in_one_line_and_writes_nothing(clip, tmp_path, capsys, case):
    import shutil

    clip_dir = tmp_path / "clip"
    shutil.copytree(clip[0], clip_dir)
    ref = write_reference_dir(tmp_path / "ref", "L", reference_tensors("L", 9), reference_config("L"))
    out = tmp_path / "out"
    before = None
    breaks, match = BAD_SOURCES[case]
    breaks(ref, clip_dir, out)
    if out.exists():
        before = sorted(out.iterdir())
    line = convert_error(capsys, ["--checkpoint", str(ref), "--vision-tower", str(clip_dir), "--out", str(out)])
    assert re.search(match, line), line
    assert (sorted(out.iterdir()) == before) if before is not None else not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_convert_cli_refuses_an_out_it_cannot_write(clip, tmp_path, capsys):
    ref = write_reference_dir(tmp_path / "ref", "L", reference_tensors("L", 9), reference_config("L"))
    (tmp_path / "file").write_text("x")
    line = convert_error(capsys, ["--checkpoint", str(ref), "--vision-tower", str(clip[0]), "--out",
                                  str(tmp_path / "file" / "out")])
    assert re.search(r"--out '.*/file/out' cannot be written: '.*/file' is a file, not a directory", line)


def test_a_conversion_that_fails_midway_leaves_no_half_written_out(clip, tmp_path, monkeypatch):
    ref = write_reference_dir(tmp_path / "ref", "L", reference_tensors("L", 9), reference_config("L"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_cli, "_save_processor", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert(ref, clip[0], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]  # no out, no staging directory
