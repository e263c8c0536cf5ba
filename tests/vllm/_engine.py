"""A tiny random Llama on disk, vLLM engines over it, and the plan runtime's tokens for reference."""

from __future__ import annotations

import os

# One process (no engine-core subprocess: the tests run in pytest's). The KV cache is sized per engine
# (kv_cache_memory_bytes, default 32 MiB), not 92% of the machine's memory; VLLM_CPU_KVCACHE_SPACE
# would override it on the CPU, so it must not be set.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from adallava_kernels import ExecutionPlan, ModelShape  # noqa: E402
from adallava_kernels.runtime import PlannedDecoder  # noqa: E402
from adallava_kernels.vllm import ARCHITECTURE, PLANS_PROCESSOR  # noqa: E402

VOCAB = 512
# head_dim 32: vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, ...
CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_tiny_llama(directory, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float().eval()
    with torch.no_grad():  # larger weights than the init's: logits far apart, so greedy tokens are stable
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(directory)
    return model


def shape() -> ModelShape:
    return ModelShape.from_hf_config(LlamaConfig(**CONFIG))


def engine(directory, **kwargs):
    from vllm import LLM

    args = dict(model=str(directory), tokenizer=None, skip_tokenizer_init=True, dtype="float32",
                enforce_eager=True, hf_overrides={"architectures": [ARCHITECTURE]},
                logits_processors=[PLANS_PROCESSOR], max_model_len=256, seed=0,
                kv_cache_memory_bytes=32 << 20, enable_prefix_caching=False)
    args.update(kwargs)
    return LLM(**args)


def reference_tokens(model: LlamaForCausalLM, prompt: list[int], plan: ExecutionPlan | None, steps: int) -> list[int]:
    """Greedy tokens of the plan runtime (torch backend, float32) for this request alone."""
    runner = PlannedDecoder.from_hf(model, num_pages=64, page_size=16, backend="torch")
    runner.admit("r", plan, len(prompt) + steps)
    ids = torch.tensor([prompt])
    logits = runner.prefill(["r"], runner.weights.embed[ids])[:, -1]
    token = logits.argmax(-1)
    out = [int(token)]
    batch = runner.decode(["r"])
    for _ in range(steps - 1):
        _, token = batch.step(token)
        out.append(int(token))
    batch.close()
    runner.free("r")
    return out
