"""The ops, one module each: launcher with input checks, kernels, and PyTorch reference."""

from .common import BACKENDS, BackendUnavailableError
from .masked_attention import masked_attention, masked_attention_reference
from .masked_mlp import masked_mlp, masked_mlp_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "masked_attention",
    "masked_attention_reference",
    "masked_mlp",
    "masked_mlp_reference",
]
