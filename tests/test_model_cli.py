"""Loading a local LLaVA checkpoint, and the two scripts: ``python -m model.generate`` and ``python -m model.train``."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from adallava_kernels import ExecutionPlan
from model import AdaLlavaForConditionalGeneration
from model.config import quiet_model_type_warning
from model import generate as generate_cli
from model import train as train_cli
from model.train import encode_conversation

from _tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, tiny_config, tiny_llava_config


def tiny_processor() -> LlavaProcessor:
    words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(110)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = IMAGE_TOKEN
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", additional_special_tokens=["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A plain transformers Llava checkpoint directory (no AdaLLaVA weights), its processor and an image."""
    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    llava.save_pretrained(root / "ckpt")
    tiny_processor().save_pretrained(root / "ckpt")
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8")).save(root / "img.png")
    return root, llava


def _keys(directory):
    from model.checkpoint import checkpoint_keys

    return checkpoint_keys(directory)


def test_transformers_writes_the_llava_hf_layout(checkpoint):
    # The layout llava-hf publishes: what the strict loading below must map.
    keys = _keys(checkpoint[0] / "ckpt")
    assert "language_model.lm_head.weight" in keys and "lm_head.weight" not in keys


def test_from_pretrained_loads_every_llava_tensor_exactly(checkpoint):
    root, llava = checkpoint
    model, info = AdaLlavaForConditionalGeneration.from_pretrained(root / "ckpt", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(("latency_encoder.", "scheduler.")) for k in info["missing_keys"])
    assert model.has_trained_scheduler is False
    theirs = llava.state_dict()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(("latency_encoder.", "scheduler."))}
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name

    reference = LlavaForConditionalGeneration.from_pretrained(root / "ckpt").eval()
    ids = torch.tensor([[4] + [IMAGE_TOKEN] * IMAGE_TOKENS + [9, 10, 5]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        full = model.eval()(input_ids=ids, pixel_values=pixels, plan=ExecutionPlan.full(model.config.shape)).logits
    torch.testing.assert_close(full, expected, rtol=0, atol=0)


def test_from_pretrained_overrides_the_config(checkpoint):
    model = AdaLlavaForConditionalGeneration.from_pretrained(checkpoint[0] / "ckpt", switch_kind="H")
    assert model.config.switch_kind == "H" and model.scheme.kind == "H"


def _rewritten(src, dst, change):
    """A copy of checkpoint ``src`` whose tensors went through ``change(dict) -> dict``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = change(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_from_pretrained_loads_the_published_llava_hf_layout(checkpoint, tmp_path):
    # llava-hf's published checkpoints keep CLIP's vision_model prefix.
    root, llava = checkpoint
    prefixed = _rewritten(root / "ckpt", tmp_path / "published", lambda t: {
        ("vision_tower.vision_model." + k.removeprefix("vision_tower.")
         if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
        for k, v in t.items()})
    model = AdaLlavaForConditionalGeneration.from_pretrained(prefixed)
    theirs = llava.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith(("latency_encoder.", "scheduler.")):
            assert torch.equal(value, theirs[name]), name


def test_from_pretrained_rejects_keys_that_do_not_map(checkpoint, tmp_path):
    root, _ = checkpoint
    extra = _rewritten(root / "ckpt", tmp_path / "extra", lambda t: {**t, "language_model.head.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"map to no parameter: language_model\.head\.weight"):
        AdaLlavaForConditionalGeneration.from_pretrained(extra)
    renamed = _rewritten(root / "ckpt", tmp_path / "renamed", lambda t: {
        ("lm_head.weight_old" if k == "language_model.lm_head.weight" else k): v for k, v in t.items()})
    with pytest.raises(ValueError, match=r"does not hold: lm_head\.weight"):
        AdaLlavaForConditionalGeneration.from_pretrained(renamed)


def test_from_pretrained_rejects_a_partial_scheduler(tmp_path):
    torch.manual_seed(0)
    AdaLlavaForConditionalGeneration(tiny_config("L")).save_pretrained(tmp_path / "full")
    partial = _rewritten(tmp_path / "full", tmp_path / "partial",
                         lambda t: {k: v for k, v in t.items() if not k.startswith("scheduler.")})
    assert AdaLlavaForConditionalGeneration.from_pretrained(tmp_path / "full").has_trained_scheduler
    with pytest.raises(ValueError, match=r"partial scheduler; missing: scheduler\.proj\.bias, scheduler\.proj\.weight"):
        AdaLlavaForConditionalGeneration.from_pretrained(partial)


def test_generate_cli_prints_answer_plan_flops_and_latency(checkpoint, capsys):
    root, _ = checkpoint
    args = ["w3 w4", "--model", str(root / "ckpt"), "--image", str(root / "img.png"), "--budget", "0.75",
            "--max-new-tokens", "4", "--backend", "torch", "--allow-untrained-scheduler"]
    assert generate_cli.main(args) == 0
    text = capsys.readouterr().out
    assert "plan: AdaLLaVA-L at budget 0.75: 3/4 layers run" in text
    assert "FLOPs:" in text and "% of the dense model's" in text and "latency:" in text
    # A tiny model's FLOPs in a unit that shows them (a fixed TFLOP printed 0.0000).
    assert re.search(r"FLOPs: [\d.]+ MFLOP \(\d+\.\d% of the dense model's [\d.]+ MFLOP\)", text), text

    assert generate_cli.main(args + ["--json", "--switch-kind", "H", "--prumerge"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["switch_kind"] == "H" and report["plan"]["num_layers"] == 4
    assert 0 < report["flops"] < report["dense_flops"] and 0 < report["flops_share"] < 1
    assert report["seconds"] > 0 and 1 <= report["new_tokens"] <= 4
    # PruMerge leaves fewer visual tokens than the 16 patches: the prompt is shorter than 3 + 16 + 2 + latency.
    assert report["prompt_tokens"] < 3 + IMAGE_TOKENS + 2 + 1


def _cli(root, *extra, budget="0.75", model=None, image=None):
    return generate_cli.main(["q", "--model", str(model or root / "ckpt"), "--image", str(image or root / "img.png"),
                              "--budget", budget, "--max-new-tokens", "2", "--backend", "torch", *extra])


def _cli_error(capsys, root, *extra, **kwargs) -> str:
    """Run the CLI expecting a refusal: exit status 2 and one line on stderr, no traceback; returns it."""
    capsys.readouterr()
    assert _cli(root, *extra, **kwargs) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("python -m model.generate: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _no_loading(monkeypatch):
    """Make any model loading fail loudly: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before checking the arguments")

    monkeypatch.setattr(AdaLlavaForConditionalGeneration, "from_pretrained", refuse)


def test_loading_prints_no_model_type_warning(checkpoint, tmp_path):
    # transformers warns when a config of one model type is read as another: loading a llava-hf checkpoint
    # as AdaLLaVA, or an AdaLLaVA checkpoint's processor, does that by design and must not print it.
    root, _ = checkpoint
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.configuration_utils")
    logger.addHandler(handler)
    try:
        model = AdaLlavaForConditionalGeneration.from_pretrained(root / "ckpt")
        model.save_pretrained(tmp_path / "ada")
        tiny_processor().save_pretrained(tmp_path / "ada")
        AdaLlavaForConditionalGeneration.from_pretrained(tmp_path / "ada")
        with quiet_model_type_warning():
            LlavaProcessor.from_pretrained(tmp_path / "ada")
        with_warning = [r.getMessage() for r in records]
        LlavaProcessor.from_pretrained(tmp_path / "ada")  # unsilenced: the filter is scoped, and the test can fail
    finally:
        logger.removeHandler(handler)
    assert not [m for m in with_warning if "model of type" in m], with_warning
    assert any("model of type `adallava`" in r.getMessage() for r in records)


def test_generate_cli_checks_the_budget_first(checkpoint, monkeypatch, tmp_path, capsys):
    root, _ = checkpoint
    _no_loading(monkeypatch)
    line = _cli_error(capsys, root, budget="1.5", model=tmp_path / "missing", image=tmp_path / "missing.png")
    assert re.search(r"latency budget must be a number in \[0.5, 1.0\], got 1.5", line)


def test_generate_cli_names_a_missing_model_directory(checkpoint, monkeypatch, tmp_path, capsys):
    root, _ = checkpoint
    _no_loading(monkeypatch)
    line = _cli_error(capsys, root, model=tmp_path / "nowhere")
    assert re.search(r"--model must be a local checkpoint directory; '.*/nowhere' does not exist", line)
    assert re.search(r"--model '.*' has no config.json", _cli_error(capsys, root, model=tmp_path))


@pytest.mark.parametrize("extra, match", [
    (("--device", "gpu"), r"--device must be a device such as 'cpu' or 'cuda:0', got 'gpu'"),
    (("--max-new-tokens", "0"), r"--max-new-tokens must be an int >= 1, got 0"),
])
def test_generate_cli_rejects_bad_arguments_before_loading(checkpoint, monkeypatch, extra, match, capsys):
    root, _ = checkpoint
    _no_loading(monkeypatch)
    assert re.search(match, _cli_error(capsys, root, *extra))


def test_generate_cli_names_a_missing_image(checkpoint, monkeypatch, tmp_path, capsys):
    root, _ = checkpoint
    _no_loading(monkeypatch)
    line = _cli_error(capsys, root, image=tmp_path / "none.png")
    assert re.search(r"--image must be an image file; '.*/none.png' does not exist", line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_generate_cli_rejects_cuda_without_cuda(checkpoint, monkeypatch, capsys):
    root, _ = checkpoint
    _no_loading(monkeypatch)
    line = _cli_error(capsys, root, "--device", "cuda")
    assert re.search(r"--device is 'cuda', but CUDA is not available here", line)


def test_generate_cli_refuses_an_untrained_scheduler_below_budget_one(checkpoint, monkeypatch, capsys):
    root, _ = checkpoint
    with monkeypatch.context() as patch:
        _no_loading(patch)
        assert re.search(r"holds no trained AdaLLaVA latency encoder and scheduler .* --allow-untrained-scheduler",
                         _cli_error(capsys, root))
    assert _cli(root, budget="1.0") == 0  # a full budget needs no plan
    assert "warning:" in capsys.readouterr().err


def test_encode_conversation_labels_only_the_answers():
    processor = tiny_processor()
    image = Image.fromarray(np.zeros((32, 32, 3), dtype="uint8") + 7)
    sample = encode_conversation(processor, [
        {"from": "human", "value": "<image>\nw1 w2"}, {"from": "gpt", "value": "w5 w6"},
        {"from": "human", "value": "w3"}, {"from": "gpt", "value": "w7"},
    ], image)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    labelled = [t for t, l in zip(ids, labels) if l != -100]
    assert labelled == [11, 12, 2, 13, 2]  # w5 w6 </s> w7 </s>
    assert ids.count(IMAGE_TOKEN) == IMAGE_TOKENS and sample["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="'human' or 'gpt'"):
        encode_conversation(processor, [{"from": "system", "value": "x"}])


def test_train_script_runs_and_saves(checkpoint, tmp_path, capsys):
    root, _ = checkpoint
    records = [{"id": str(i), "image": "img.png", "conversations": [
        {"from": "human", "value": f"<image>\nw{i} w{i + 1}"}, {"from": "gpt", "value": f"w{i + 2} w{i + 3}"}]}
        for i in range(3)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "trained"
    assert train_cli.main(["--model", str(root / "ckpt"), "--data", str(data), "--images", str(root),
                           "--steps", "2", "--batch-size", "2", "--out", str(out)]) == 0
    assert "step 2/2  loss" in capsys.readouterr().out
    trained = AdaLlavaForConditionalGeneration.from_pretrained(out)
    assert trained.config.switch_kind == "L" and trained.scheduler.proj.weight.shape[0] == 2
    assert trained.has_trained_scheduler
