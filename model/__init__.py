"""AdaLLaVA on transformers, running its plans on adallava_kernels."""

from .config import AdaLlavaConfig
from .inference import AdaGeneration, AdaRequest
from .modeling import AdaLlavaForConditionalGeneration
from .outputs import IGNORE_INDEX, AdaLlavaOutput
from .prumerge import fit_image_tokens

__all__ = [
    "AdaGeneration",
    "AdaLlavaConfig",
    "AdaLlavaForConditionalGeneration",
    "AdaLlavaOutput",
    "AdaRequest",
    "IGNORE_INDEX",
    "fit_image_tokens",
]
