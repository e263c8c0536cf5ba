"""Loading a local LLaVA checkpoint, and the two scripts: ``python -m model.generate`` and ``python -m model.train``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from adallava_kernels import ExecutionPlan
from model import AdaLlavaForConditionalGeneration
from model import generate as generate_cli
from model import train as train_cli
from model.train import encode_conversation

from _tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, tiny_config


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
    config = tiny_config("L")
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(root / "ckpt")
    tiny_processor().save_pretrained(root / "ckpt")
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8")).save(root / "img.png")
    return root, llava


def test_from_pretrained_loads_llava_weights_and_overrides(checkpoint):
    root, llava = checkpoint
    model = AdaLlavaForConditionalGeneration.from_pretrained(root / "ckpt", switch_kind="H").eval()
    assert model.config.switch_kind == "H" and model.scheme.kind == "H"
    theirs = llava.state_dict()
    for name, value in model.state_dict().items():
        if name in theirs:
            assert torch.equal(value, theirs[name]), name
    ids = torch.tensor([[4] + [IMAGE_TOKEN] * IMAGE_TOKENS + [9, 10, 5]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels).logits
        full = model(input_ids=ids, pixel_values=pixels, plan=ExecutionPlan.full(model.config.shape)).logits
    torch.testing.assert_close(full, expected)


def test_generate_cli_prints_answer_plan_flops_and_latency(checkpoint, capsys):
    root, _ = checkpoint
    args = ["w3 w4", "--model", str(root / "ckpt"), "--image", str(root / "img.png"), "--budget", "0.75",
            "--max-new-tokens", "4", "--backend", "torch"]
    assert generate_cli.main(args) == 0
    text = capsys.readouterr().out
    assert "plan: AdaLLaVA-L at budget 0.75: 3/4 layers run" in text
    assert "FLOPs:" in text and "% of the dense model's" in text and "latency:" in text

    assert generate_cli.main(args + ["--json", "--switch-kind", "H", "--prumerge"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["switch_kind"] == "H" and report["plan"]["num_layers"] == 4
    assert 0 < report["flops"] < report["dense_flops"] and 0 < report["flops_share"] < 1
    assert report["seconds"] > 0 and 1 <= report["new_tokens"] <= 4
    # PruMerge leaves fewer visual tokens than the 16 patches: the prompt is shorter than 3 + 16 + 2 + latency.
    assert report["prompt_tokens"] < 3 + IMAGE_TOKENS + 2 + 1


def test_generate_cli_rejects_a_budget_out_of_range(checkpoint):
    root, _ = checkpoint
    with pytest.raises(ValueError, match="latency budget"):
        generate_cli.main(["q", "--model", str(root / "ckpt"), "--image", str(root / "img.png"), "--budget", "1.5"])


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
