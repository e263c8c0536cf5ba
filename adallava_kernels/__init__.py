"""adallava-kernels: wall-clock savings for AdaLLaVA's execution plans.

Importing the package queries no GPU and compiles nothing.
"""

from . import budget, cost, devices, kv_cache
from .checks import check_token_ids
from .budget import UnitScheme, best_plan, check_budget
from .devices import DeviceSpec, get_device
from .kv_cache import ContiguousKVCache, KVCacheLayer, LayerSkipKVCache, TransformersCacheLayer
from .modules import MaskedAttention, MaskedMLP
from .ops import BackendUnavailableError, masked_attention, masked_mlp
from .patch import apply_masked_kernels
from .plan import ExecutionPlan, LayerPlan, neuron_groups
from .runtime import DecodeBatch, PlannedDecoder
from .shape import PRESETS, ModelShape, get_shape

__version__ = "0.1.0"

__all__ = [
    "DecodeBatch",
    "PlannedDecoder",
    "BackendUnavailableError",
    "ContiguousKVCache",
    "DeviceSpec",
    "ExecutionPlan",
    "KVCacheLayer",
    "LayerPlan",
    "LayerSkipKVCache",
    "MaskedAttention",
    "MaskedMLP",
    "ModelShape",
    "PRESETS",
    "UnitScheme",
    "apply_masked_kernels",
    "best_plan",
    "budget",
    "check_budget",
    "check_token_ids",
    "cost",
    "devices",
    "get_device",
    "get_shape",
    "kv_cache",
    "masked_attention",
    "masked_mlp",
    "neuron_groups",
    "TransformersCacheLayer",
]
