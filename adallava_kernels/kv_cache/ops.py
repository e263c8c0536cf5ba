"""The extension's cache ops, ``torch.ops.adallava.kv_append`` and ``kv_gather``, loaded on first use."""

from __future__ import annotations

import functools

import torch

__all__ = ["cache_ops"]


def cache_ops():
    """``torch.ops.adallava``, loading the extension (and its fake implementations) on first use."""
    try:
        from .. import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as e:
        raise ImportError(
            "adallava_kernels._C is not built; install the package with torch already installed: "
            "`pip install --no-build-isolation -e .`"
        ) from e
    _register_fakes()
    return torch.ops.adallava


@functools.lru_cache(maxsize=None)
def _register_fakes() -> None:
    """Shape-only implementations, so ``torch.compile`` can trace through the cache ops."""

    @torch.library.register_fake("adallava::kv_gather")
    def _(k_pages, v_pages, block_tables, length):
        shape = (block_tables.shape[0], length, k_pages.shape[2])
        return k_pages.new_empty(shape), v_pages.new_empty(shape)

    @torch.library.register_fake("adallava::kv_append")
    def _(k_pages, v_pages, key, value, block_tables, starts):
        return None
