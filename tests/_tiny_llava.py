"""A random-weight LLaVA small enough for CPU tests: CLIP 32x32 images in 16 patches, a 4-layer Llama with GQA."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor, \
    PreTrainedTokenizerFast

from model import AdaLlavaConfig, AdaLlavaForConditionalGeneration

IMAGE_TOKEN = 127
IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches


def tiny_config(switch_kind="L", **kwargs) -> AdaLlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    # 100 neurons in 8 groups: 13, 13, 13, 13, 12, 12, 12, 12 (group sizes differ).
    text = LlamaConfig(hidden_size=64, intermediate_size=100, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8, vocab_size=128, pad_token_id=0, eos_token_id=2)
    defaults = dict(head_rank=2, latency_freqs=16, image_token_id=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS)
    defaults.update(kwargs)
    return AdaLlavaConfig(switch_kind=switch_kind, vision_config=vision, text_config=text, **defaults)


def tiny_llava_config() -> LlavaConfig:
    """The same LLaVA as a plain transformers ``LlavaConfig`` (model_type "llava", as llava-hf checkpoints)."""
    config = tiny_config()
    return LlavaConfig(vision_config=config.vision_config, text_config=config.text_config,
                       image_token_id=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS)


def tiny_model(switch_kind="L", seed=0, **kwargs) -> AdaLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = AdaLlavaForConditionalGeneration(tiny_config(switch_kind, **kwargs)).eval()
    # Larger scheduler weights than the init's, so plans differ between samples and budgets.
    with torch.no_grad():
        model.scheduler.proj.weight.normal_(0, 0.5)
    return model


def tiny_inputs(batch=2, text=7, seed=1):
    """Prompt ids ``[batch, 3 + 16 + text]`` with one image each, and the images."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 120, (batch, 3 + text), generator=g)
    image = torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN)
    ids = torch.cat([words[:, :3], image, words[:, 3:]], dim=1)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return ids, pixels


def tiny_processor() -> LlavaProcessor:
    """A word-level tokenizer over the tiny vocabulary (with `<image>`) and a CLIP image processor of 32x32 images."""
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
