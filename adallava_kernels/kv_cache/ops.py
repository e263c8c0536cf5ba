"""The extension's cache ops, ``torch.ops.adallava.kv_append`` and ``kv_gather``, with their argument checks.

:func:`kv_append` and :func:`kv_gather` check every argument's type, shape,
dtype, device and layout in Python, with the messages of the extension's own
checks (``csrc/kv_cache.cpp``), before they dispatch the op: a bad call
raises here and never reaches native code. The checks read only metadata,
never a value on the device: they cost no sync, so a decode step (or the
capture of its CUDA graph) can run them at every layer. What the CPU op checks
on top, the page indices and positions in the tables, stays in C++.

:func:`cache_ops` returns these two functions as the pool calls them;
``torch.ops.adallava.*`` are the raw ops.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NoReturn

import torch

__all__ = ["CacheOpInputError", "CacheOps", "cache_ops", "check_append", "check_gather", "kv_append", "kv_gather"]


class CacheOpInputError(ValueError, RuntimeError):
    """A bad argument to a cache op.

    A ``ValueError``, as every input error of the pool, and a ``RuntimeError``,
    as the extension raises for the same argument: code that catches either
    catches it.
    """


@dataclasses.dataclass(frozen=True)
class CacheOps:
    """The checked cache ops (the pool's ``ops``)."""

    kv_append: Callable[..., None]
    kv_gather: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def kv_append(k_pages: torch.Tensor, v_pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              block_tables: torch.Tensor, starts: torch.Tensor) -> None:
    """Write ``key``/``value`` into the pages, after :func:`check_append`.

    Rows: ``key`` ``[rows, tokens, head_dim]``, ``block_tables`` ``[rows, pages]``,
    ``starts`` ``[rows]``. Batched: ``key`` ``[batch, heads, tokens, head_dim]``,
    ``block_tables`` ``[batch, heads, pages]``, ``starts`` ``[batch]``
    (see ``csrc/README.md``).
    """
    check_append(k_pages, v_pages, key, value, block_tables, starts)
    _extension().kv_append(k_pages, v_pages, key, value, block_tables, starts)


def kv_gather(k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``0 .. length - 1`` of each row's pages as contiguous ``[rows, length, head_dim]`` K and V,
    after :func:`check_gather`."""
    check_gather(k_pages, v_pages, block_tables, length)
    return _extension().kv_gather(k_pages, v_pages, block_tables, length)


_CHECKED = CacheOps(kv_append=kv_append, kv_gather=kv_gather)


def cache_ops() -> CacheOps:
    """The checked ops, loading the extension (and its fake implementations) on first use."""
    _extension()
    return _CHECKED


# --- the checks: csrc/kv_cache.cpp's, in its order and with its messages -----------


def check_append(k_pages, v_pages, key, value, block_tables, starts) -> None:
    """Raise :class:`CacheOpInputError` where ``kv_append``'s C++ checks would raise, with their message."""
    _check_tensors(("k_pages", k_pages), ("v_pages", v_pages), ("key", key), ("value", value),
                   ("block_tables", block_tables), ("starts", starts))
    _check_pools(k_pages, v_pages)
    head_dim, dtype, device = k_pages.shape[2], k_pages.dtype, k_pages.device
    shape = key.shape
    batched = len(shape) == 4
    if batched:
        if shape[3] != head_dim:
            _fail(f"key must be [batch, heads, tokens, {head_dim}] ([batch, heads, tokens, head_dim]), "
                  f"got {list(shape)}")
    elif len(shape) != 3 or shape[2] != head_dim:
        _fail(f"key must be [rows, tokens, {head_dim}] ([rows, tokens, head_dim]), got {list(shape)}")
    if value.shape != shape:
        _fail(f"value must have the shape of key {list(shape)}, got {list(value.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != dtype:
            _fail(f"{name} must have the dtype of the pools ({_dtype(dtype)}), got {_dtype(t.dtype)}")
        if t.device != device:
            _fail(f"{name} must be on the device of the pools ({device}), got {t.device}")
    tables = block_tables.shape
    _check_index_tensor("block_tables", block_tables, 3 if batched else 2, device)
    _check_index_tensor("starts", starts, 1, device)
    rows = shape[0]
    if batched:
        if tables[:2] != shape[:2]:
            _fail(f"block_tables must be [batch, heads, pages] = [{rows}, {shape[1]}, pages] like key, "
                  f"got {list(tables)}")
        if starts.shape[0] != rows:
            _fail(f"starts must have one entry per batch row ({rows}), got {starts.shape[0]}")
        return
    if tables[0] != rows:
        _fail(f"block_tables must have one row per key row ({rows}), got {tables[0]}")
    if starts.shape[0] != rows:
        _fail(f"starts must have one entry per key row ({rows}), got {starts.shape[0]}")


def check_gather(k_pages, v_pages, block_tables, length) -> None:
    """Raise :class:`CacheOpInputError` where ``kv_gather``'s C++ checks would raise, with their message."""
    _check_tensors(("k_pages", k_pages), ("v_pages", v_pages), ("block_tables", block_tables))
    if isinstance(length, bool) or not isinstance(length, (int, torch.SymInt)):
        _fail(f"length must be an int, got {type(length).__name__}")
    _check_pools(k_pages, v_pages)
    _check_index_tensor("block_tables", block_tables, 2, k_pages.device)
    positions = block_tables.shape[1] * k_pages.shape[1]
    if not 0 <= length <= positions:
        _fail(f"length {length} must be in [0, {positions}]: the positions the pages of a block_tables row hold")


def _check_tensors(*named: tuple[str, object]) -> None:
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_pools(k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
    shape, dtype, device = k_pages.shape, k_pages.dtype, k_pages.device
    if len(shape) != 3:
        _fail(f"k_pages must be 3-D [num_pages, page_size, head_dim], got {list(shape)}")
    if v_pages.shape != shape:
        _fail(f"v_pages must have the shape of k_pages {list(shape)}, got {list(v_pages.shape)}")
    if v_pages.dtype != dtype:
        _fail(f"v_pages must have the dtype of k_pages ({_dtype(dtype)}), got {_dtype(v_pages.dtype)}")
    if v_pages.device != device:
        _fail(f"v_pages must be on the device of k_pages ({device}), got {v_pages.device}")
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        _fail("k_pages and v_pages must be contiguous")
    if dtype.itemsize not in (2, 4):
        _fail(f"k_pages must hold 2- or 4-byte elements (fp16, bf16, fp32), got {_dtype(dtype)}")


def _check_index_tensor(name: str, t: torch.Tensor, dim: int, device: torch.device) -> None:
    if t.dtype != torch.int32:
        _fail(f"{name} must be int32, got {_dtype(t.dtype)}")
    if t.dim() != dim:
        _fail(f"{name} must be {dim}-D, got shape {list(t.shape)}")
    if t.device != device:
        _fail(f"{name} must be on the device of the pools ({device}), got {t.device}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def _fail(message: str) -> NoReturn:
    raise CacheOpInputError(message)


# The names C++ prints for a dtype (c10::toString of its ScalarType).
_C10_DTYPE_NAMES = {
    torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
    torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _dtype(dtype: torch.dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype))


# --- loading --------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _extension():
    """``torch.ops.adallava`` once the extension is loaded and its fake implementations registered."""
    try:
        from .. import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as e:
        raise ImportError(
            "adallava_kernels._C is not built; install the package with torch already installed: "
            "`pip install --no-build-isolation -e .`"
        ) from e
    _register_fakes()
    return torch.ops.adallava


def _register_fakes() -> None:
    """Shape-only implementations, so ``torch.compile`` can trace through the cache ops."""

    @torch.library.register_fake("adallava::kv_gather")
    def _(k_pages, v_pages, block_tables, length):
        shape = (block_tables.shape[0], length, k_pages.shape[2])
        return k_pages.new_empty(shape), v_pages.new_empty(shape)

    @torch.library.register_fake("adallava::kv_append")
    def _(k_pages, v_pages, key, value, block_tables, starts):
        return None
