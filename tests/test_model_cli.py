"""Loading a local LLaVA checkpoint, and the two scripts: ``python -m model.generate`` and ``python -m model.train``."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlavaForConditionalGeneration, LlavaProcessor

from adallava_kernels import ExecutionPlan
from model import AdaLlavaForConditionalGeneration
from model.config import quiet_model_type_warning
from model import generate as generate_cli
from model import train as train_cli
from model.train import encode_conversation

from _tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, tiny_config, tiny_llava_config, tiny_model, tiny_processor

ROOT = Path(__file__).resolve().parent.parent


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
    """Make any model loading, or building, fail loudly: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before checking the arguments")

    monkeypatch.setattr(AdaLlavaForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", refuse)


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


def _edited_config(src, dst, edit):
    """A copy of checkpoint ``src`` whose config.json went through ``edit(dict)``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _copied(change):
    """A maker of a copy of a checkpoint that ``change(directory)`` then edits in place."""
    def make(src, dst):
        shutil.copytree(src, dst)
        change(dst)
        return dst
    return make


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _plain_llama(src, dst):
    dst.mkdir()
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=64).save_pretrained(dst)
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


def _sharded_without_a_shard(src, dst):
    shutil.copytree(src, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00002.safetensors")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1]}}))
    return dst


# Checkpoints a user may point --model at, each with the line that refuses it.
BAD_CHECKPOINTS = {
    "plain-llama": (_plain_llama, r"--model '.*' is not a LLaVA or AdaLLaVA checkpoint: its config.json has model_type "
                                  r"'llama', expected one of 'llava', 'adallava'"),
    "reference-code": (lambda s, d: _edited_config(s, d, lambda c: c.update(model_type="ada_llava_llama")),
                       r"model_type 'ada_llava_llama'.*convert it first \(python -m model.convert\)"),
    "no-text-config": (lambda s, d: _edited_config(s, d, lambda c: c.pop("text_config")),
                       r"its config.json has no text_config, so transformers would build a default one"),
    "mistral": (lambda s, d: _edited_config(s, d, lambda c: c["text_config"].update(model_type="mistral")),
                r"its language model is a 'mistral', expected a Llama"),
    "config-not-json": (_copied(lambda d: (d / "config.json").write_text("{")), r"its config.json is not readable JSON"),
    "truncated-weights": (_copied(lambda d: _truncated(d / "model.safetensors")),
                          r"model.safetensors is not a readable tensor file \(.*\); a truncated download\?"),
    "missing-shard": (_sharded_without_a_shard,
                      r"its shard index names model-00002-of-00002.safetensors, which does not exist"),
    "no-weights": (_copied(lambda d: (d / "model.safetensors").unlink()),
                   r"holds no model.safetensors, pytorch_model.bin or shard index"),
    "no-processor": (_copied(lambda d: (d / "processor_config.json").unlink()), r"has no image processor"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_generate_cli_refuses_a_bad_checkpoint_before_building_a_model(checkpoint, monkeypatch, tmp_path, capsys,
                                                                        case):
    root, _ = checkpoint
    make, match = BAD_CHECKPOINTS[case]
    model = make(root / "ckpt", tmp_path / case)
    _no_loading(monkeypatch)
    line = _cli_error(capsys, root, model=model, budget="1.0")
    assert re.search(match, line), line


def test_from_pretrained_refuses_what_is_not_a_llava_before_allocating(checkpoint, monkeypatch, tmp_path):
    root, _ = checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("built a model before checking the checkpoint")

    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", refuse)
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path '.*' is not a LLaVA or AdaLLaVA checkpoint"):
        AdaLlavaForConditionalGeneration.from_pretrained(_plain_llama(root / "ckpt", tmp_path / "llama"))
    with pytest.raises(ValueError, match=r"must be a local checkpoint directory"):
        AdaLlavaForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_generate_cli_refuses_a_plain_llama_7b_in_little_memory(checkpoint, tmp_path):
    # A directory holding a plain Llama-7B's config: built as the default LLaVA-7B, it took about 23 GB in float32.
    LlamaConfig().save_pretrained(tmp_path / "llama-7b")
    peak = tmp_path / "peak"
    wrapper = ("import resource, runpy, sys\n"
               "sys.argv = ['model.generate'] + sys.argv[1:]\n"
               "try:\n    runpy.run_module('model.generate', run_name='__main__')\n"
               "finally:\n"
               f"    open({str(peak)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n")
    done = subprocess.run([sys.executable, "-c", wrapper, "q", "--model", str(tmp_path / "llama-7b"), "--image",
                           str(checkpoint[0] / "img.png"), "--budget", "1.0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.splitlines() == [f"python -m model.generate: error: --model '{tmp_path / 'llama-7b'}' is not a "
                                        "LLaVA or AdaLLaVA checkpoint: its config.json has model_type 'llama', "
                                        "expected one of 'llava', 'adallava'"]
    assert int(peak.read_text()) * 1024 < 1.5 * 2**30  # the interpreter, torch and transformers: about 0.5 GB


@pytest.mark.parametrize("content, match", [
    (b"not an image", r"cannot identify image file"),
    ("truncated", r"image file is truncated|broken data stream|truncated"),
], ids=["text", "truncated-png"])
def test_generate_cli_refuses_an_image_pil_cannot_read(checkpoint, monkeypatch, tmp_path, capsys, content, match):
    root, _ = checkpoint
    image = tmp_path / "img.png"
    if content == "truncated":
        data = (root / "img.png").read_bytes()
        image.write_bytes(data[: len(data) // 2])
    else:
        image.write_bytes(content)
    _no_loading(monkeypatch)
    line = _cli_error(capsys, root, image=image)
    assert re.search(rf"--image '.*img.png' is not an image PIL can read \(.*({match})", line), line


@pytest.fixture(scope="module")
def ada_checkpoint(tmp_path_factory):
    """An AdaLLaVA-L checkpoint with its (random) scheduler, and its processor."""
    root = tmp_path_factory.mktemp("ada") / "ckpt"
    tiny_model("L").save_pretrained(root)
    tiny_processor().save_pretrained(root)
    return root


def test_generate_cli_refuses_a_switch_kind_that_contradicts_a_trained_scheduler(checkpoint, ada_checkpoint,
                                                                                  monkeypatch, capsys):
    root, _ = checkpoint
    with monkeypatch.context() as patch:
        _no_loading(patch)
        line = _cli_error(capsys, root, "--switch-kind", "H", model=ada_checkpoint)
    assert re.search(r"--switch-kind 'H' contradicts --model '.*', whose scheduler was trained with switch_kind 'L'; "
                     r"leave --switch-kind out", line)
    with pytest.raises(ValueError, match=r"switch_kind 'H' contradicts pretrained_model_name_or_path"):
        AdaLlavaForConditionalGeneration.from_pretrained(ada_checkpoint, switch_kind="H")
    # A llava-hf checkpoint has no scheduler to contradict; the checkpoint's own kind is no contradiction.
    assert _cli(root, "--switch-kind", "H", "--allow-untrained-scheduler") == 0
    assert _cli(root, "--switch-kind", "L", model=ada_checkpoint) == 0


def test_generate_cli_refuses_triton_where_it_cannot_run(checkpoint, monkeypatch, capsys):
    import adallava_kernels.ops.common as ops_common

    root, _ = checkpoint
    _no_loading(monkeypatch)
    monkeypatch.setattr(ops_common, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _cli_error(capsys, root, "--device", "cpu", "--backend", "triton")
    assert "--backend is 'triton', but Triton kernels run on CUDA (none here) or on a CPU under TRITON_INTERPRET=1" \
        in line


def test_generate_cli_says_what_a_checkpoint_without_a_scheduler_is(checkpoint, monkeypatch, capsys):
    root, _ = checkpoint
    _no_loading(monkeypatch)
    assert "(a LLaVA checkpoint (model_type 'llava'))" in _cli_error(capsys, root)


def test_generate_cli_usage_errors_are_one_line(checkpoint, capsys):
    root, _ = checkpoint
    for argv, message in ((["q"], "the following arguments are required: --model, --image, --budget"),
                          (["q", "--model", "m", "--image", "i", "--budget", "x"], "argument --budget: invalid float")):
        with pytest.raises(SystemExit) as exit_info:
            generate_cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err


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
