"""The budget path: an AdaLLaVA model's latency encoder and scheduler beside its exported language model.
vLLM plans each budget request as model.generate does and generates its tokens."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig

from _engine import engine

from adallava_kernels.vllm import BUDGET_KEY
from adallava_kernels.vllm.scheduler import export_for_vllm, latency_prompt

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from model import AdaLlavaConfig, AdaLlavaForConditionalGeneration  # noqa: E402

VOCAB, IMAGE_TOKEN, LATENCY_TOKEN = 512, 511, 510
STEPS = 10


def tiny_adallava(kind, seed=0, **kwargs):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    # head_dim 32 (vLLM's CPU attention); 4 heads, rank 2: two -H units per layer.
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, pad_token_id=0, eos_token_id=2,
                       tie_word_embeddings=False)
    config = AdaLlavaConfig(switch_kind=kind, vision_config=vision, text_config=text, head_rank=2, latency_freqs=16,
                            image_token_id=IMAGE_TOKEN, image_seq_length=16, **kwargs)
    torch.manual_seed(seed)
    model = AdaLlavaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.normal_(0, 0.08)
        model.scheduler.proj.weight.normal_(0, 0.5)  # plans that differ between budgets and prompts
    return model


@pytest.mark.parametrize("kind,budget_cost", [("L", "units"), ("H", "units"), ("H", "flops")])
def test_budgets_plan_and_generate_as_model_generate(tmp_path, kind, budget_cost):
    model = tiny_adallava(kind, budget_cost=budget_cost)
    export_for_vllm(model, str(tmp_path), latency_token_id=LATENCY_TOKEN)
    llm = engine(tmp_path, enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 40, 17, 6, 23)]
    budgets = [0.5, 0.6, 0.75, 1.0, None]
    params = [SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True,
                             extra_args=None if b is None else {BUDGET_KEY: b}) for b in budgets]
    inputs = [{"prompt_token_ids": latency_prompt(p, LATENCY_TOKEN) if b is not None else p}
              for p, b in zip(prompts, budgets)]
    outs = llm.generate(inputs, params, use_tqdm=False)
    plans = []
    for prompt, budget, out in zip(prompts, budgets, outs):
        got = list(out.outputs[0].token_ids)
        if budget is None:
            continue
        expected = model.generate(torch.tensor([prompt]), latency_budget=budget, max_new_tokens=STEPS,
                                  backend="torch")
        plans.append(expected.plans[0])
        assert got == expected.sequences[0, len(prompt):].tolist(), (kind, budget, len(prompt))
    assert len({p.fingerprint for p in plans}) > 1  # the budgets chose different plans
