"""KV caches that hold only the KV heads a plan keeps.

- :mod:`.pool`: :class:`LayerSkipKVCache`, the paged pool shared by many
  sequences (host bookkeeping of pages, sequences and plans);
- :mod:`.ops`: the extension's ops that move its data (C++ on CPU, CUDA on GPU),
  with their argument checks in Python;
- :mod:`.layers`: what ``masked_attention`` asks of a cache
  (:class:`KVCacheLayer`), :class:`ContiguousKVCache`,
  :class:`TransformersCacheLayer`, the pool's :class:`PagedCacheLayer` view
  and :func:`transformers_cache`.
"""

from .layers import ContiguousKVCache, KVCacheLayer, PagedCacheLayer, TransformersCacheLayer, transformers_cache
from .ops import cache_ops
from .pool import LayerSkipKVCache


__all__ = [
    "KVCacheLayer",
    "ContiguousKVCache",
    "TransformersCacheLayer",
    "LayerSkipKVCache",
    "PagedCacheLayer",
    "cache_ops",
    "transformers_cache",
]
