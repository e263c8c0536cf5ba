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
- :class:`LayerSkipKVCache`: a paged pool shared by many sequences, with
  pages only for the (layer, KV head) pairs each sequence's plan keeps; its
  data moves through the ``adallava_kernels._C`` extension (C++ on CPU, CUDA
  on GPU). :meth:`LayerSkipKVCache.layer_view` is its :class:`KVCacheLayer`,
  :func:`transformers_cache` its transformers ``Cache``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Hashable, Sequence

import torch

from .plan import ExecutionPlan
from .shape import ModelShape

__all__ = [
    "KVCacheLayer",
    "ContiguousKVCache",
    "TransformersCacheLayer",
    "LayerSkipKVCache",
    "PagedCacheLayer",
    "transformers_cache",
]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_storable(name: str, tensor: object, storage: torch.Tensor) -> torch.Tensor:
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
            _check_int(name, value, minimum)
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
            _check_storable(name, tensor, self.keys)
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


# -- the paged layer-skip cache ----------------------------------------------------


def _ops():
    """``torch.ops.adallava``, loading the extension (and its fake implementations) on first use."""
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
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


@dataclasses.dataclass
class _Sequence:
    plan: ExecutionPlan
    max_tokens: int
    lengths: list[int]  # per layer: positions stored
    pages: list[list[list[int]]]  # per layer, per kept KV head: page ids in position order
    tables: list[torch.Tensor | None]  # per layer: int32 [kept KV heads, pages], on the pool's device


class LayerSkipKVCache:
    """A paged KV pool that stores only the (layer, KV head) pairs each sequence's plan keeps.

    Page ``p`` holds ``page_size`` positions of one (layer, KV head) slice:
    K in ``k_pages[p]`` and V in ``v_pages[p]``. A sequence takes pages only
    as its tokens arrive, only for the layers its plan runs and the KV heads
    their active query heads read, so a lower budget holds more sequences.
    Every call checks its input before it changes anything: a rejected call
    leaves every sequence as it was.

    Args:
        shape: the model.
        num_pages: pages in the pool (each K plus V of ``page_size`` positions of one head).
        page_size: positions per page.
        dtype, device: of the stored K/V.
    """

    def __init__(
        self, shape: ModelShape, *, num_pages: int, page_size: int = 16,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(shape, ModelShape):
            raise ValueError(f"shape must be a ModelShape, got {type(shape).__name__}")
        _check_int("num_pages", num_pages, 1)
        _check_int("page_size", page_size, 1)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.shape = shape
        self.page_size = page_size
        self.ops = _ops()
        pool = (num_pages, page_size, shape.head_dim)
        self.k_pages = torch.zeros(pool, dtype=dtype, device=device)
        self.v_pages = torch.zeros(pool, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pages are taken from the end
        self._sequences: dict[Hashable, _Sequence] = {}

    # -- accounting ------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def pages_free(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: K and V of ``page_size`` positions of one head."""
        return 2 * self.page_size * self.shape.head_dim * self.k_pages.element_size()

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.page_bytes

    def sequence_bytes(self, seq_id: Hashable) -> int:
        seq = self._sequence(seq_id)
        return sum(len(head) for layer in seq.pages for head in layer) * self.page_bytes

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        return tuple(self._sequences)

    # -- sequences -------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, plan: ExecutionPlan, max_tokens: int) -> None:
        """Admit ``seq_id`` with its plan, for at most ``max_tokens`` positions. Takes no page yet."""
        if seq_id in self._sequences:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        _check_int("max_tokens", max_tokens, 1)
        layers = self.shape.num_layers
        self._sequences[seq_id] = _Sequence(
            plan, max_tokens, [0] * layers,
            [[[] for _ in plan.kv_heads(layer)] for layer in range(layers)], [None] * layers,
        )

    def free(self, seq_id: Hashable) -> None:
        """Return every page of ``seq_id`` to the pool and forget it."""
        seq = self._sequence(seq_id)
        self.clear(seq_id)
        del self._sequences[seq_id]

    def clear(self, seq_id: Hashable, layer: int | None = None) -> None:
        """Drop the stored positions of ``seq_id`` (of one ``layer``, or all) and return their pages;
        the sequence stays, with its plan and reservation."""
        seq = self._sequence(seq_id)
        for i in range(self.shape.num_layers) if layer is None else [self._layer(layer)]:
            for head in seq.pages[i]:
                self._free.extend(reversed(head))
            seq.pages[i] = [[] for _ in seq.pages[i]]
            seq.tables[i] = None
            seq.lengths[i] = 0

    def plan(self, seq_id: Hashable) -> ExecutionPlan:
        return self._sequence(seq_id).plan

    def set_plan(self, seq_id: Hashable, plan: ExecutionPlan) -> None:
        """Replace the plan of ``seq_id``; a layer that already holds positions must keep its KV heads.

        For a scheduler that plans mid-prefill (AdaLLaVA plans after the prefix
        layers): admit the sequence with a plan covering the prefix, fill those
        layers, then set the whole plan before the remaining layers run.
        """
        seq = self._sequence(seq_id)
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        for layer in range(self.shape.num_layers):
            if seq.lengths[layer] and plan.kv_heads(layer) != seq.plan.kv_heads(layer):
                raise ValueError(
                    f"sequence {seq_id!r} holds {seq.lengths[layer]} positions of KV heads "
                    f"{list(seq.plan.kv_heads(layer))} in layer {layer}; the new plan keeps "
                    f"{list(plan.kv_heads(layer))} there (clear the layer first)"
                )
        for layer in range(self.shape.num_layers):
            if not seq.lengths[layer]:
                seq.pages[layer] = [[] for _ in plan.kv_heads(layer)]
                seq.tables[layer] = None
        seq.plan = plan

    def pages_needed(self, seq_id: Hashable, tokens: int) -> int:
        """Pages ``tokens`` more positions in every layer of ``seq_id`` would take (for admission control)."""
        seq = self._sequence(seq_id)
        _check_int("tokens", tokens, 0)
        return sum(self._pages_needed(seq, layer, tokens) for layer in range(self.shape.num_layers))

    def kv_heads(self, seq_id: Hashable, layer: int) -> tuple[int, ...]:
        """The KV heads ``seq_id`` stores in ``layer`` (empty for a skipped layer)."""
        return self._sequence(seq_id).plan.kv_heads(self._layer(layer))

    def length(self, seq_id: Hashable, layer: int = 0) -> int:
        """Positions of ``seq_id`` appended to ``layer``."""
        return self._sequence(seq_id).lengths[self._layer(layer)]

    # -- data ------------------------------------------------------------------

    def append(self, seq_id: Hashable, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append ``[kept KV heads, new, head_dim]`` K/V of ``seq_id`` to ``layer``, in one launch."""
        self.append_batch([seq_id], layer, [key], [value])

    def append_batch(
        self, seq_ids: Sequence[Hashable], layer: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
    ) -> None:
        """Append the new tokens of several sequences to ``layer`` in one launch.

        ``keys[i]``/``values[i]``: ``[KV heads kept by seq_ids[i], new, head_dim]``;
        every sequence appends the same number of new tokens.
        """
        layer = self._layer(layer)
        if not (len(seq_ids) == len(keys) == len(values)) or not seq_ids:
            raise ValueError(
                f"seq_ids, keys and values must be non-empty and of one length, got {len(seq_ids)}, "
                f"{len(keys)} and {len(values)}"
            )
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {list(seq_ids)!r}")
        sequences = [self._sequence(s) for s in seq_ids]
        tokens = None
        for seq_id, seq, key, value in zip(seq_ids, sequences, keys, values):
            tokens = self._check_new(seq_id, seq, layer, key, value, tokens)
        needed = sum(self._pages_needed(seq, layer, tokens) for seq in sequences)
        if needed > len(self._free):
            raise ValueError(
                f"KV pool exhausted: appending {tokens} tokens to layer {layer} needs {needed} more pages, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        rows = [len(seq.pages[layer]) for seq in sequences]
        if sum(rows) == 0:  # a skipped layer, or no kept KV head: nothing is stored
            for seq in sequences:
                seq.lengths[layer] += tokens
            return
        snapshot = [(seq.pages[layer], seq.tables[layer]) for seq in sequences]
        free_before = list(self._free)
        try:
            for seq in sequences:
                self._grow(seq, layer, tokens)
            self._launch_append(sequences, layer, keys, values, rows)
        except Exception:
            for seq, (pages, table) in zip(sequences, snapshot):
                seq.pages[layer], seq.tables[layer] = pages, table
            self._free = free_before
            raise
        for seq in sequences:
            seq.lengths[layer] += tokens

    def gather(self, seq_id: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_id``'s stored K and V of ``layer`` as contiguous ``[kept KV heads, length, head_dim]``."""
        seq = self._sequence(seq_id)
        layer = self._layer(layer)
        length, heads = seq.lengths[layer], len(seq.pages[layer])
        if heads == 0 or length == 0:
            empty = self.k_pages.new_empty(heads, length, self.shape.head_dim)
            return empty, empty.clone()
        return self.ops.kv_gather(self.k_pages, self.v_pages, seq.tables[layer], length)

    def page_table(self, seq_id: Hashable, layer: int) -> torch.Tensor:
        """int32 ``[kept KV heads, pages]``: the pages of each kept KV head of ``layer``, in position order
        (for kernels that read ``k_pages``/``v_pages`` directly). Do not modify."""
        seq = self._sequence(seq_id)
        layer = self._layer(layer)
        table = seq.tables[layer]
        if table is None:
            return torch.empty(len(seq.pages[layer]), 0, dtype=torch.int32, device=self.k_pages.device)
        return table

    def layer_view(self, seq_ids: Sequence[Hashable], layer: int) -> "PagedCacheLayer":
        """``layer`` of ``seq_ids`` as a :class:`KVCacheLayer` for ``masked_attention`` (batch row i = seq_ids[i])."""
        return PagedCacheLayer(self, list(seq_ids), self._layer(layer))

    # -- internals -------------------------------------------------------------

    def _sequence(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"sequence {seq_id!r} is not in the cache (never added, or freed)") from None

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.shape.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.shape.num_layers}), got {layer!r}")
        return layer

    def _check_new(self, seq_id, seq: _Sequence, layer: int, key, value, tokens: int | None) -> int:
        heads = len(seq.pages[layer])
        expected = [heads, "new", self.shape.head_dim]
        for name, t in (("key", key), ("value", value)):
            _check_storable(name, t, self.k_pages)
            if t.dim() != 3 or t.shape[0] != heads or t.shape[2] != self.shape.head_dim:
                raise ValueError(
                    f"{name} for sequence {seq_id!r}, layer {layer} must be {expected} ([kept KV heads, new "
                    f"tokens, head_dim]; its plan keeps KV heads {list(seq.plan.kv_heads(layer))}), got {list(t.shape)}"
                )
        if value.shape != key.shape:
            raise ValueError(f"value must have the shape of key {list(key.shape)}, got {list(value.shape)}")
        new = key.shape[1]
        if tokens is not None and new != tokens:
            raise ValueError(f"every sequence must append the same number of tokens: {tokens} and {new}")
        if seq.lengths[layer] + new > seq.max_tokens:
            raise ValueError(
                f"sequence {seq_id!r}, layer {layer}: {seq.lengths[layer]} stored + {new} new tokens exceed "
                f"the {seq.max_tokens} reserved by add_sequence"
            )
        return new

    def _pages_needed(self, seq: _Sequence, layer: int, tokens: int) -> int:
        have = -(-seq.lengths[layer] // self.page_size)
        need = -(-(seq.lengths[layer] + tokens) // self.page_size)
        return (need - have) * len(seq.pages[layer])

    def _grow(self, seq: _Sequence, layer: int, tokens: int) -> None:
        """Take the pages ``tokens`` more positions need; rebuild the layer's table if any were taken."""
        if self._pages_needed(seq, layer, tokens) == 0:
            return
        need = -(-(seq.lengths[layer] + tokens) // self.page_size)
        # New lists, so a rollback can restore the old ones.
        seq.pages[layer] = [head + [self._free.pop() for _ in range(need - len(head))] for head in seq.pages[layer]]
        seq.tables[layer] = torch.tensor(seq.pages[layer], dtype=torch.int32, device=self.k_pages.device)

    def _launch_append(self, sequences, layer, keys, values, rows) -> None:
        kept = [i for i, r in enumerate(rows) if r]
        key = keys[kept[0]] if len(kept) == 1 else torch.cat([keys[i] for i in kept])
        value = values[kept[0]] if len(kept) == 1 else torch.cat([values[i] for i in kept])
        width = max(sequences[i].tables[layer].shape[1] for i in kept)
        tables = [sequences[i].tables[layer] for i in kept]
        table = tables[0] if len(tables) == 1 else torch.cat(
            [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables]
        )
        starts = torch.tensor(
            [sequences[i].lengths[layer] for i in kept for _ in range(rows[i])],
            dtype=torch.int32, device=self.k_pages.device,
        )
        self.ops.kv_append(self.k_pages, self.v_pages, key, value, table, starts)


class PagedCacheLayer(KVCacheLayer):
    """One layer of several sequences of a :class:`LayerSkipKVCache`, in the layout ``masked_attention`` uses.

    Every sequence must keep the same KV heads in this layer (the batch runs
    one attention call) and hold the same number of positions.
    """

    def __init__(self, cache: LayerSkipKVCache, seq_ids: list, layer: int) -> None:
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


def transformers_cache(cache: LayerSkipKVCache, seq_ids: Sequence[Hashable]):
    """A transformers ``Cache`` over ``seq_ids`` (batch row i = ``seq_ids[i]``) of ``cache``.

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

        def __init__(self, cache: LayerSkipKVCache, seq_ids: list, layer: int) -> None:
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
