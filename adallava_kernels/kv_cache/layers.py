"""Per-layer cache views for ``masked_attention``, and the transformers ``Cache`` adapter.

:class:`KVCacheLayer` is what ``masked_attention`` asks of a cache: one
layer's stored length and an ``update`` that appends the new tokens' keys and
values and returns everything stored, in transformers' ``[batch, kv_heads,
seq, head_dim]`` layout. ``kv_heads`` there is the number of KV heads the
layer's plan keeps, not the model's.

These adapters serve the op-level API. The plan runtime
(:mod:`adallava_kernels.runtime`) reads a :class:`LayerSkipKVCache`'s pages in
place instead; :class:`PagedCacheLayer` gathers them into contiguous tensors
on every call.
"""

from __future__ import annotations

import abc
import functools
from typing import Hashable, Sequence

import torch

from ..checks import check_device, check_int

__all__ = [
    "KVCacheLayer",
    "ContiguousKVCache",
    "TransformersCacheLayer",
    "PagedCacheLayer",
    "transformers_cache",
    "check_storable",
]


def check_storable(name: str, tensor: object, storage: torch.Tensor) -> torch.Tensor:
    """``tensor`` is a tensor of the dtype and on the device of ``storage``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != storage.dtype or tensor.device != storage.device:
        raise ValueError(f"{name} must be {storage.dtype} on {storage.device}, got {tensor.dtype} on {tensor.device}")
    return tensor


class KVCacheLayer(abc.ABC):
    """One decoder layer's KV cache, as ``masked_attention`` uses it."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Positions stored so far (the new tokens' positions start here)."""

    @abc.abstractmethod
    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kv_heads, new, head_dim]`` keys and values; return all stored, same layout."""


class ContiguousKVCache(KVCacheLayer):
    """A preallocated ``[batch, kv_heads, capacity, head_dim]`` cache of one layer's active KV heads.

    ``update`` checks its input before writing, so a rejected call leaves
    the cache as it was.
    """

    def __init__(
        self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        for name, value, minimum in (
            ("batch_size", batch_size, 1), ("num_kv_heads", num_kv_heads, 0),
            ("head_dim", head_dim, 1), ("capacity", capacity, 1),
        ):
            check_int(name, value, minimum)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = check_device("device", device)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (a rejected draft, a benchmark's repeated step)."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self._length:
            raise ValueError(f"length must be an int in [0, {self._length}], got {length!r}")
        self._length = length

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, head_dim = self.keys.shape
        for name, tensor in (("key", key), ("value", value)):
            check_storable(name, tensor, self.keys)
            if tensor.dim() != 4 or (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (batch, heads, head_dim):
                raise ValueError(
                    f"{name} must have shape [{batch}, {heads}, new_tokens, {head_dim}] "
                    f"([batch, kv_heads, seq, head_dim]), got {list(tensor.shape)}"
                )
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key has {key.shape[2]} new tokens but value has {value.shape[2]}")
        stop = self._length + key.shape[2]
        if stop > self.capacity:
            raise ValueError(
                f"cache capacity exceeded: {self._length} stored + {key.shape[2]} new > capacity {self.capacity}"
            )
        self.keys[:, :, self._length:stop] = key
        self.values[:, :, self._length:stop] = value
        self._length = stop
        return self.keys[:, :, :stop], self.values[:, :, :stop]


class TransformersCacheLayer(KVCacheLayer):
    """Layer ``layer_idx`` of a transformers ``Cache``; it stores the active KV heads it is given."""

    def __init__(self, cache, layer_idx: int) -> None:
        if not callable(getattr(cache, "update", None)) or not callable(getattr(cache, "get_seq_length", None)):
            raise TypeError(f"cache must be a transformers Cache (update, get_seq_length), got {type(cache).__name__}")
        self.cache = cache
        self.layer_idx = layer_idx

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length(self.layer_idx))

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key, value, self.layer_idx)


class PagedCacheLayer(KVCacheLayer):
    """One layer of several sequences of a :class:`LayerSkipKVCache`, in the layout ``masked_attention`` uses.

    Every sequence must keep the same KV heads in this layer (the batch runs
    one attention call) and hold the same number of positions. ``update``
    gathers the whole context into contiguous tensors: fine for the op-level
    API and for transformers, while the runtime reads the pages in place.
    """

    def __init__(self, cache, seq_ids: list, layer: int) -> None:
        heads = {cache.kv_heads(s, layer) for s in seq_ids}
        if len(heads) != 1:
            raise ValueError(f"sequences {seq_ids!r} keep different KV heads in layer {layer}: {sorted(heads)}")
        lengths = {cache.length(s, layer) for s in seq_ids}
        if len(lengths) != 1:
            raise ValueError(f"sequences {seq_ids!r} hold different lengths in layer {layer}: {sorted(lengths)}")
        self.cache, self.seq_ids, self.layer = cache, seq_ids, layer

    @property
    def length(self) -> int:
        return self.cache.length(self.seq_ids[0], self.layer)

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key.dim() != 4 or key.shape[0] != len(self.seq_ids):
            raise ValueError(
                f"key must be [batch = {len(self.seq_ids)}, kv_heads, new, head_dim], got {list(key.shape)}"
            )
        if value.shape != key.shape:
            raise ValueError(f"value must have the shape of key {list(key.shape)}, got {list(value.shape)}")
        self.cache.append_batch(self.seq_ids, self.layer, list(key.unbind(0)), list(value.unbind(0)))
        stored = [self.cache.gather(s, self.layer) for s in self.seq_ids]
        return torch.stack([k for k, _ in stored]), torch.stack([v for _, v in stored])


def transformers_cache(cache, seq_ids: Sequence[Hashable]):
    """A transformers ``Cache`` over ``seq_ids`` (batch row i = ``seq_ids[i]``) of a :class:`LayerSkipKVCache`.

    Pass it as ``past_key_values`` to a transformers Llama/Llava ``forward`` or
    ``generate()``: each layer's ``update`` appends to the pool and returns the
    stored K/V. With transformers' own attention every KV head is appended, so
    the sequences' plans must keep them (a full plan); with ``MaskedAttention``
    layers the plan's KV heads are.
    """
    from transformers.cache_utils import Cache

    if not seq_ids:
        raise ValueError("seq_ids must name at least one sequence")
    for s in seq_ids:
        cache.length(s)  # each must be in the cache
    layer_class = _transformers_layer_class()
    return Cache(layers=[layer_class(cache, list(seq_ids), i) for i in range(cache.shape.num_layers)])


@functools.lru_cache(maxsize=None)
def _transformers_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class PagedTransformersLayer(CacheLayerMixin):
        """One layer of a :class:`LayerSkipKVCache`, as a transformers cache layer."""

        is_sliding = False

        def __init__(self, cache, seq_ids: list, layer: int) -> None:
            super().__init__()
            self.cache, self.seq_ids, self.layer = cache, seq_ids, layer
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.cache.layer_view(self.seq_ids, self.layer).update(key_states, value_states)
            self.keys, self.values = keys, values  # the last read, as transformers' layers expose it
            return keys, values

        def get_seq_length(self) -> int:
            return self.cache.length(self.seq_ids[0], self.layer)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            for seq_id in self.seq_ids:
                self.cache.clear(seq_id, self.layer)

    return PagedTransformersLayer
