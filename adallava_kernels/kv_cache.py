"""KV caches that hold only the KV heads a plan keeps.

:class:`KVCacheLayer` is what ``masked_attention`` asks of a cache: one
layer's stored length and an ``update`` that appends the new tokens' keys and
values and returns everything stored, in transformers' ``[batch, kv_heads,
seq, head_dim]`` layout. ``kv_heads`` there is the number of KV heads the
layer's plan keeps, not the model's.

- :class:`ContiguousKVCache`: one layer, preallocated to a capacity; returns
  views, so a decode step copies only the new token's K/V.
- :class:`TransformersCacheLayer`: one layer of a transformers ``Cache``
  (e.g. ``DynamicCache``), which stores whatever head count it is given.
"""

from __future__ import annotations

import abc

import torch

__all__ = ["KVCacheLayer", "ContiguousKVCache", "TransformersCacheLayer"]


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
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
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
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 4 or (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (batch, heads, head_dim):
                raise ValueError(
                    f"{name} must have shape [{batch}, {heads}, new_tokens, {head_dim}] "
                    f"([batch, kv_heads, seq, head_dim]), got {list(tensor.shape)}"
                )
            if tensor.dtype != self.keys.dtype or tensor.device != self.keys.device:
                raise ValueError(
                    f"{name} must be {self.keys.dtype} on {self.keys.device}, got {tensor.dtype} on {tensor.device}"
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
