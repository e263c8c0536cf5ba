"""A llava-hf checkpoint (LlavaForConditionalGeneration) served by its Llama decoder: the vision tower and
projector are not loaded, the language model's weights are."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from _engine import CONFIG, engine, reference_tokens, shape

from adallava_kernels import ExecutionPlan
from adallava_kernels.vllm import PLAN_KEY

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402


def test_a_llava_hf_checkpoint_serves_its_language_model(tmp_path):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**CONFIG), image_token_id=511,
                         image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(tmp_path)
    llm = engine(tmp_path)
    plan = ExecutionPlan.from_layer_mask([1, 1, 0, 1], shape())
    prompt = [5, 9, 13, 200, 17, 3]
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2,
                        [SamplingParams(max_tokens=8, temperature=0.0, extra_args={PLAN_KEY: plan.to_json()}),
                         SamplingParams(max_tokens=8, temperature=0.0)], use_tqdm=False)
    for out, p in zip(outs, (plan, None)):
        assert list(out.outputs[0].token_ids) == reference_tokens(model, prompt, p, 8)
