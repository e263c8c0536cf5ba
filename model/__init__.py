"""AdaLLaVA on transformers, running its plans on adallava_kernels."""

from .config import AdaLlavaConfig
from .modeling import IGNORE_INDEX, AdaGeneration, AdaLlavaForConditionalGeneration, AdaLlavaOutput, fit_image_tokens

__all__ = [
    "AdaGeneration",
    "AdaLlavaConfig",
    "AdaLlavaForConditionalGeneration",
    "AdaLlavaOutput",
    "IGNORE_INDEX",
    "fit_image_tokens",
]
