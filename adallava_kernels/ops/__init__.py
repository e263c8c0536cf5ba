"""The ops, one module each: launcher with input checks, kernels, and PyTorch reference
(``masked_attention``, ``masked_mlp``, ``paged_attention``, ``gathered_linear``, ``rms_norm``, ``silu_and_mul``, ``rope``); the attention's Triton
kernels one a module (``head_projection``, ``flash_attention``, ``split_combine``,
``paged_decode_kernel``); what the kernels share (``triton_utils``) and what the ops check
(``common``); the kernels as ``torch.ops.adallava`` operators (``library``, every one registered on
import; ``registry``, what an op module registers its own through)."""

from .common import BACKENDS, BackendUnavailableError
from .masked_attention import masked_attention, masked_attention_reference
from .masked_mlp import masked_mlp, masked_mlp_reference
from .rms_norm import fused_add_rms_norm, rms_norm

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "masked_attention",
    "masked_attention_reference",
    "masked_mlp",
    "masked_mlp_reference",
    "fused_add_rms_norm",
    "rms_norm",
]
