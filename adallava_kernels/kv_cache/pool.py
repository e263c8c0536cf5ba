"""The paged layer-skip KV pool: host bookkeeping of pages, sequences and plans.

Its data moves through the extension's ops (:mod:`.ops`: C++ on CPU, CUDA on
GPU); :mod:`.layers` adapts it to ``masked_attention`` and transformers; the
plan runtime (:mod:`adallava_kernels.runtime`) reads and writes its pages in
place through the page tables kept here.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Hashable, Sequence

import torch

from ..checks import check_device, check_int
from ..plan import ExecutionPlan
from ..shape import ModelShape
from .layers import PagedCacheLayer, check_storable
from .ops import cache_ops

__all__ = ["LayerSkipKVCache", "check_seq_id", "check_seq_ids"]


def check_seq_id(seq_id) -> None:
    """A sequence id keys dictionaries of the pool and of the runtime: it must be hashable."""
    try:
        hash(seq_id)
    except TypeError:
        raise ValueError(
            f"seq_id must be hashable (an int, a str or a tuple of them), got a {type(seq_id).__name__}: {seq_id!r}"
        ) from None


def check_seq_ids(seq_ids: Sequence[Hashable]) -> None:
    """A sequence of hashable ids, none repeated (a string is one id, not a sequence of them)."""
    if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Sequence):
        raise TypeError(f"seq_ids must be a sequence of sequence ids (a list), got {type(seq_ids).__name__}")
    for seq_id in seq_ids:
        check_seq_id(seq_id)
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"seq_ids must not repeat a sequence, got {list(seq_ids)!r}")


# Plan layouts the pool keeps (by plan object); model tables kept per sequence (by width).
_LAYOUTS_KEPT = 64
_MODEL_TABLES_KEPT = 4


@dataclasses.dataclass(eq=False)
class _Layout:
    """Where a plan's kept (layer, KV head) units sit in a reserved sequence's page tensor: one row per unit,
    layer by layer, KV heads ascending. Derived once per plan object, in a few tensor ops, so that admitting,
    replanning and freeing a sequence index tensors instead of walking the plan's layers."""

    num_kv_heads: int
    offsets: tuple[int, ...]  # per layer, and one past the last: the layer's first row
    kept_layers: tuple[int, ...]  # layers that keep a KV head
    units: torch.Tensor  # int64 [rows]: the unit of each row, layer * num_kv_heads + KV head
    rows: torch.Tensor  # int64 [layers * num_kv_heads]: the row of each unit, -1 where the plan does not keep it
    kept: torch.Tensor  # bool [layers * num_kv_heads]: rows >= 0
    _kv_heads: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, plan: ExecutionPlan, shape: ModelShape) -> "_Layout":
        """The units ``plan.kv_heads`` names (the KV heads its active query heads read), without calling it
        per layer: that walks every head in Python, a quarter of a millisecond at LLaVA-7B."""
        layers, kv_heads = shape.num_layers, shape.num_kv_heads
        heads = torch.tensor(list(itertools.chain.from_iterable(plan.heads)), dtype=torch.int64)
        layer_of = torch.repeat_interleave(torch.arange(layers), torch.tensor([len(h) for h in plan.heads]))
        kept = torch.zeros(layers * kv_heads, dtype=torch.bool)
        kept[layer_of * kv_heads + heads // shape.heads_per_kv_head] = True
        units = kept.nonzero().flatten()
        rows = torch.full((layers * kv_heads,), -1, dtype=torch.int64)
        rows[units] = torch.arange(units.numel())
        per_layer = kept.view(layers, kv_heads).sum(1).tolist()
        offsets = tuple(itertools.accumulate(per_layer, initial=0))
        return cls(kv_heads, offsets, tuple(i for i, n in enumerate(per_layer) if n), units, rows, kept)

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]

    def heads_in(self, layer: int) -> int:
        return self.offsets[layer + 1] - self.offsets[layer]

    def kv_heads(self, layer: int) -> tuple[int, ...]:
        """The KV heads kept in ``layer``, ascending (as ``ExecutionPlan.kv_heads``)."""
        if layer not in self._kv_heads:
            units = self.units[self.offsets[layer]:self.offsets[layer + 1]]
            self._kv_heads[layer] = tuple((units - layer * self.num_kv_heads).tolist())
        return self._kv_heads[layer]

    def changed_layers(self, other: "_Layout") -> list[int]:
        """Layers where ``other`` keeps other KV heads than this layout."""
        if other is self:
            return []
        layers = self.kept.numel() // self.num_kv_heads
        return (self.kept ^ other.kept).view(layers, self.num_kv_heads).any(1).nonzero().flatten().tolist()


@dataclasses.dataclass(eq=False)
class _Sequence:
    plan: ExecutionPlan
    layout: _Layout
    max_tokens: int
    reserved: bool  # every page for max_tokens taken at admission
    # Positions stored: ``length`` in every layer that keeps a KV head and none elsewhere while ``layer_lengths``
    # is None (as the runtime advances them: O(1) per step); per layer once single-layer appends or clears make
    # the layers differ.
    length: int = 0
    layer_lengths: list[int] | None = None
    # Reserved: int32 [layout rows, pages per KV head] on the host, and its copy on the pool's device; a layer's
    # table is its rows of them (never written in place: a new plan builds new ones).
    host: torch.Tensor | None = None
    device: torch.Tensor | None = None
    # Not reserved: per layer, int32 [kept KV heads, pages so far] on the host and the device (None: no page).
    layer_host: list[torch.Tensor | None] | None = None
    layer_device: list[torch.Tensor | None] | None = None
    model_tables: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # by width


class LayerSkipKVCache:
    """A paged KV pool that stores only the (layer, KV head) pairs each sequence's plan keeps.

    Page ``p`` holds ``page_size`` positions of one (layer, KV head) slice:
    K in ``k_pages[p]`` and V in ``v_pages[p]`` (two views of one ``pages``
    tensor ``[2, num_pages, page_size, head_dim]``). Pages are taken only for
    the layers a sequence's plan runs and the KV heads their active query
    heads read, so a lower budget holds more sequences. A sequence takes its
    pages either as its tokens arrive, or all at once when it is added with
    ``reserve=True``, as the plan runtime admits requests (then no page is
    taken mid-decode, and a request that cannot be served is refused at
    admission). Every call checks its input before it changes anything: a
    rejected call leaves every sequence as it was.

    The bookkeeping is host tensors, so that what a request costs the host does
    not grow with its pages, layers or heads: the free pages are a stack
    (an int32 tensor and its top), a reserved sequence's pages one int32
    tensor with a row per kept (layer, KV head), sent to the device in one copy
    at admission and at each new plan.

    Args:
        shape: the model.
        num_pages: pages in the pool (each K plus V of ``page_size`` positions of one head).
        page_size: positions per page.
        dtype, device: of the stored K/V. ``"meta"`` holds no K/V, only the bookkeeping (to measure or
            plan admission at full size); ``append`` and ``gather``, which run kernels, refuse it.
        scratch_page: also hold one page that no sequence owns (``self.scratch_page``, after the
            ``num_pages``): where a batch's bound plans send the K/V a row does not keep (a unit of the
            batch's union that its own plan lacks), so they land nowhere that is read as data.
    """

    def __init__(
        self, shape: ModelShape, *, num_pages: int, page_size: int = 16,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", scratch_page: bool = False,
    ) -> None:
        if not isinstance(shape, ModelShape):
            raise ValueError(f"shape must be a ModelShape, got {type(shape).__name__}")
        check_int("num_pages", num_pages, 1)
        if num_pages + 1 > torch.iinfo(torch.int32).max:
            raise ValueError(f"num_pages must fit the int32 page tables (< {torch.iinfo(torch.int32).max}), "
                             f"got {num_pages}")
        check_int("page_size", page_size, 1)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        device = check_device("device", device)
        self.shape = shape
        self.page_size = page_size
        self.ops = cache_ops()
        # K and V in one tensor, so a reader can fetch both pages of a table entry in one indexing op.
        self.pages = torch.zeros(2, num_pages + scratch_page, page_size, shape.head_dim, dtype=dtype, device=device)
        self._num_pages = num_pages
        self.scratch_page: int | None = num_pages if scratch_page else None
        # The free pages are _stack[:_top]; pages are taken from the top, so a fresh pool hands out the low ids.
        self._stack = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32)
        self._top = num_pages
        self._sequences: dict[Hashable, _Sequence] = {}
        self._layouts: dict[int, tuple[weakref.ref, _Layout]] = {}

    # -- accounting ------------------------------------------------------------

    @property
    def k_pages(self) -> torch.Tensor:
        return self.pages[0]

    @property
    def v_pages(self) -> torch.Tensor:
        return self.pages[1]

    @property
    def num_pages(self) -> int:
        """Pages sequences can take (the scratch page is not one of them)."""
        return self._num_pages

    @property
    def pages_free(self) -> int:
        return self._top

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - self._top

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: K and V of ``page_size`` positions of one head."""
        return 2 * self.page_size * self.shape.head_dim * self.pages.element_size()

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.page_bytes

    def sequence_bytes(self, seq_id: Hashable) -> int:
        return self._owned(self._sequence(seq_id)).numel() * self.page_bytes

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        return tuple(self._sequences)

    def pages_for(self, plan: ExecutionPlan, max_tokens: int) -> int:
        """Pages a sequence under ``plan`` takes for ``max_tokens`` positions (for admission control)."""
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        check_int("max_tokens", max_tokens, 1)
        return self._pages_per_head(max_tokens) * self._layout(plan).num_rows

    # -- sequences -------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, plan: ExecutionPlan, max_tokens: int, *, reserve: bool = False) -> None:
        """Admit ``seq_id`` with its plan, for at most ``max_tokens`` positions.

        With ``reserve`` it takes every page those positions need now (a
        ``ValueError`` says how many it needs and how many are free when they
        are not); otherwise pages are taken as positions are appended.
        """
        check_seq_id(seq_id)
        if seq_id in self._sequences:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        needed = self.pages_for(plan, max_tokens)
        if reserve and needed > self._top:
            raise ValueError(
                f"KV pool exhausted: sequence {seq_id!r} needs {needed} pages for {max_tokens} positions under "
                f"its plan, {self._top} of {self.num_pages} are free"
            )
        seq = _Sequence(plan, self._layout(plan), max_tokens, bool(reserve))
        if reserve:
            self._reserve(seq, needed)
        else:
            seq.layer_host, seq.layer_device = [None] * self.shape.num_layers, [None] * self.shape.num_layers
        self._sequences[seq_id] = seq

    def free(self, seq_id: Hashable) -> None:
        """Return every page of ``seq_id`` to the pool and forget it."""
        seq = self._sequence(seq_id)
        self._give_back(self._owned(seq))
        del self._sequences[seq_id]

    def clear(self, seq_id: Hashable, layer: int | None = None) -> None:
        """Drop the stored positions of ``seq_id`` (of one ``layer``, or all); the sequence stays, with
        its plan. A sequence added with ``reserve`` keeps its pages; otherwise they return to the pool."""
        seq = self._sequence(seq_id)
        layers = range(self.shape.num_layers) if layer is None else [self._layer(layer)]
        if not seq.reserved:
            self._give_back(self._layer_pages(seq, layers))
            for i in layers:
                seq.layer_host[i] = seq.layer_device[i] = None
        if layer is None:
            seq.length, seq.layer_lengths = 0, None
        else:
            self._add_length(seq, layer, -self._layer_length(seq, layer))

    def plan(self, seq_id: Hashable) -> ExecutionPlan:
        return self._sequence(seq_id).plan

    def max_tokens(self, seq_id: Hashable) -> int:
        return self._sequence(seq_id).max_tokens

    def set_plan(self, seq_id: Hashable, plan: ExecutionPlan) -> None:
        """Replace the plan of ``seq_id``; a layer that already holds positions must keep its KV heads.

        For a scheduler that plans mid-prefill (AdaLLaVA plans after the prefix
        layers): admit the sequence with a plan covering the prefix, or every
        layer, fill those layers, then set the whole plan before the remaining
        layers run. A reserved sequence then gives back the pages of the KV
        heads the new plan drops and takes those of the ones it adds (a
        ``ValueError`` when they are not free).
        """
        seq = self._sequence(seq_id)
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        old, new = seq.layout, self._layout(plan)
        changed = old.changed_layers(new)
        stored_any = seq.layer_lengths is not None or seq.length > 0
        for layer in changed if stored_any else ():
            stored = self._layer_length(seq, layer)
            if stored:
                raise ValueError(
                    f"sequence {seq_id!r} holds {stored} positions of KV heads "
                    f"{list(old.kv_heads(layer))} in layer {layer}; the new plan keeps "
                    f"{list(new.kv_heads(layer))} there (clear the layer first)"
                )
        if changed and seq.reserved:
            self._move_reserved(seq_id, seq, new)
        elif changed:
            self._give_back(self._layer_pages(seq, changed))
            for layer in changed:
                seq.layer_host[layer] = seq.layer_device[layer] = None
        # Layers the new plan starts keeping hold no position yet, whatever the others hold.
        lengths = self._lengths(seq) if changed and stored_any else None
        seq.plan, seq.layout, seq.model_tables = plan, new, {}
        if lengths is not None:
            seq.layer_lengths = lengths
            self._settle_lengths(seq)

    def pages_needed(self, seq_id: Hashable, tokens: int) -> int:
        """Pages ``tokens`` more positions in every layer of ``seq_id`` would take (0 once reserved)."""
        seq = self._sequence(seq_id)
        check_int("tokens", tokens, 0)
        if seq.reserved:
            return 0
        return sum(self._pages_needed(seq, layer, tokens) for layer in range(self.shape.num_layers))

    def kv_heads(self, seq_id: Hashable, layer: int) -> tuple[int, ...]:
        """The KV heads ``seq_id`` stores in ``layer`` (empty for a skipped layer)."""
        return self._sequence(seq_id).layout.kv_heads(self._layer(layer))

    def length(self, seq_id: Hashable, layer: int = 0) -> int:
        """Positions of ``seq_id`` appended to ``layer``."""
        return self._layer_length(self._sequence(seq_id), self._layer(layer))

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
        self._check_runs_kernels("append_batch")
        layer = self._layer(layer)
        if not (len(seq_ids) == len(keys) == len(values)) or not seq_ids:
            raise ValueError(
                f"seq_ids, keys and values must be non-empty and of one length, got {len(seq_ids)}, "
                f"{len(keys)} and {len(values)}"
            )
        sequences = self._distinct(seq_ids)
        tokens = None
        for seq_id, seq, key, value in zip(seq_ids, sequences, keys, values):
            tokens = self._check_new(seq_id, seq, layer, key, value, tokens)
        needed = sum(self._pages_needed(seq, layer, tokens) for seq in sequences)
        if needed > self._top:
            raise ValueError(
                f"KV pool exhausted: appending {tokens} tokens to layer {layer} needs {needed} more pages, "
                f"{self._top} of {self.num_pages} are free"
            )
        rows = [seq.layout.heads_in(layer) for seq in sequences]
        if sum(rows):  # else a skipped layer, or no kept KV head: nothing is stored
            self._store(sequences, layer, keys, values, rows, tokens)
        for seq in sequences:
            self._add_length(seq, layer, tokens)

    def advance(self, seq_ids: Sequence[Hashable], tokens: int) -> None:
        """Record that ``tokens`` positions of each of ``seq_ids`` were written to every layer that keeps a
        KV head, by kernels that write the pages in place (the runtime). Host bookkeeping only.

        The sequences must have been added with ``reserve`` (their pages exist) and have room left.
        """
        check_int("tokens", tokens, 0)
        sequences = self._distinct(seq_ids)
        for seq_id, seq in zip(seq_ids, sequences):
            if not seq.reserved:
                raise ValueError(f"sequence {seq_id!r} was not added with reserve=True: its pages are not all taken")
            stored = seq.length if seq.layer_lengths is None else max(seq.layer_lengths)
            if stored + tokens > seq.max_tokens:
                raise ValueError(
                    f"sequence {seq_id!r}: {stored} stored + {tokens} new tokens exceed the {seq.max_tokens} "
                    "reserved by add_sequence"
                )
        for seq in sequences:
            if seq.layer_lengths is not None:
                for layer in seq.layout.kept_layers:
                    seq.layer_lengths[layer] += tokens
            elif seq.layout.kept_layers:
                seq.length += tokens

    def gather(self, seq_id: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_id``'s stored K and V of ``layer`` as contiguous ``[kept KV heads, length, head_dim]``."""
        self._check_runs_kernels("gather")
        seq = self._sequence(seq_id)
        layer = self._layer(layer)
        length, heads = self._layer_length(seq, layer), seq.layout.heads_in(layer)
        if heads == 0 or length == 0:
            empty = self.pages.new_empty(heads, length, self.shape.head_dim)
            return empty, empty.clone()
        return self.ops.kv_gather(self.k_pages, self.v_pages, self.page_table(seq_id, layer), length)

    def page_table(self, seq_id: Hashable, layer: int) -> torch.Tensor:
        """int32 ``[kept KV heads, pages]``: the pages of each kept KV head of ``layer``, in position order
        (for kernels that read ``k_pages``/``v_pages`` directly). Do not modify."""
        return self._layer_table(self._sequence(seq_id), self._layer(layer), on_device=True)

    def page_lists(self, seq_id: Hashable, layer: int) -> tuple[tuple[int, ...], ...]:
        """The host's copy of :meth:`page_table`: per kept KV head of ``layer``, its pages (reads no device value)."""
        host = self._layer_table(self._sequence(seq_id), self._layer(layer), on_device=False)
        return tuple(map(tuple, host.tolist()))

    def model_tables(self, seq_id: Hashable, width: int) -> torch.Tensor:
        """int32 ``[num_layers, num_kv_heads, width]`` on the pool's device: row ``[layer, k]`` lists the pages of
        KV head ``k`` of ``layer`` in position order, in the model's KV-head order; KV heads the plan does not
        keep, and the columns past the sequence's pages, hold the scratch page.

        For kernels that index every layer's K/V by the model's KV heads whatever the plan (what they write
        for a unit the plan lacks lands on the scratch page). Needs a pool made with ``scratch_page=True``
        and a sequence added with ``reserve=True``; ``width`` >= its pages per KV head. Built with one
        device copy and kept until :meth:`set_plan` or :meth:`free`. Do not modify.
        """
        seq = self._sequence(seq_id)
        check_int("width", width, 0)
        if self.scratch_page is None:
            raise ValueError("model_tables needs a scratch page for the KV heads a plan drops: make the pool "
                             "with scratch_page=True")
        if not seq.reserved:
            raise ValueError(f"model_tables needs a sequence added with reserve=True; {seq_id!r} takes its pages "
                             "as positions are appended")
        per_head = seq.host.shape[1]
        if width < per_head:
            raise ValueError(f"width must be >= the {per_head} pages per KV head of sequence {seq_id!r} "
                             f"(max_tokens {seq.max_tokens} in pages of {self.page_size}), got {width}")
        tables = seq.model_tables.get(width)
        if tables is None:
            tables = self._build_model_tables(seq, width)
            if len(seq.model_tables) >= _MODEL_TABLES_KEPT:
                del seq.model_tables[next(iter(seq.model_tables))]
            seq.model_tables[width] = tables
        return tables

    def layer_view(self, seq_ids: Sequence[Hashable], layer: int) -> PagedCacheLayer:
        """``layer`` of ``seq_ids`` as a ``KVCacheLayer`` for ``masked_attention`` (batch row i = seq_ids[i])."""
        check_seq_ids(seq_ids)
        return PagedCacheLayer(self, list(seq_ids), self._layer(layer))

    # -- internals: arguments ----------------------------------------------------

    def _sequence(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"sequence {seq_id!r} is not in the cache (never added, or freed)") from None

    def _distinct(self, seq_ids: Sequence[Hashable]) -> list[_Sequence]:
        check_seq_ids(seq_ids)
        return [self._sequence(s) for s in seq_ids]

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.shape.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.shape.num_layers}), got {layer!r}")
        return layer

    def _check_runs_kernels(self, method: str) -> None:
        if self.pages.device.type == "meta":
            raise ValueError(f"{method} runs the cache kernels, which a pool on the meta device cannot: it holds "
                             "the bookkeeping only (make the pool on 'cpu' or 'cuda' to store K/V)")

    def _check_new(self, seq_id, seq: _Sequence, layer: int, key, value, tokens: int | None) -> int:
        heads = seq.layout.heads_in(layer)
        expected = [heads, "new", self.shape.head_dim]
        for name, t in (("key", key), ("value", value)):
            check_storable(name, t, self.k_pages)
            if t.dim() != 3 or t.shape[0] != heads or t.shape[2] != self.shape.head_dim:
                raise ValueError(
                    f"{name} for sequence {seq_id!r}, layer {layer} must be {expected} ([kept KV heads, new "
                    f"tokens, head_dim]; its plan keeps KV heads {list(seq.layout.kv_heads(layer))}), got "
                    f"{list(t.shape)}"
                )
        if value.shape != key.shape:
            raise ValueError(f"value must have the shape of key {list(key.shape)}, got {list(value.shape)}")
        new = key.shape[1]
        if tokens is not None and new != tokens:
            raise ValueError(f"every sequence must append the same number of tokens: {tokens} and {new}")
        stored = self._layer_length(seq, layer)
        if stored + new > seq.max_tokens:
            raise ValueError(
                f"sequence {seq_id!r}, layer {layer}: {stored} stored + {new} new tokens exceed "
                f"the {seq.max_tokens} reserved by add_sequence"
            )
        return new

    # -- internals: the free stack and the device copies --------------------------

    def _layout(self, plan: ExecutionPlan) -> _Layout:
        """The plan's layout, derived once per plan object (keyed by identity: hashing a plan reads every index)."""
        entry = self._layouts.get(id(plan))
        if entry is not None and entry[0]() is plan:
            return entry[1]
        layout = _Layout.of(plan, self.shape)
        if len(self._layouts) >= _LAYOUTS_KEPT:
            self._layouts = {key: e for key, e in self._layouts.items() if e[0]() is not None}
            while len(self._layouts) >= _LAYOUTS_KEPT:
                del self._layouts[next(iter(self._layouts))]
        self._layouts[id(plan)] = (weakref.ref(plan), layout)
        return layout

    def _pages_per_head(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def _take(self, count: int) -> torch.Tensor:
        """int32 ``[count]``: pages off the top of the free stack (the caller checked that they are free). They
        stay in the stack's storage above the top, so a caller undoes the take by restoring ``_top``."""
        if not 0 <= count <= self._top:
            raise RuntimeError(f"internal error: taking {count} pages, {self._top} are free")
        pages = self._stack[self._top - count:self._top].clone()  # a copy: the slots get reused
        self._top -= count
        return pages

    def _give_back(self, pages: torch.Tensor) -> None:
        """Push ``pages`` (any shape) on the free stack, so that a take of as many returns them in their order."""
        count = pages.numel()
        if count:
            self._stack[self._top:self._top + count] = pages.reshape(-1)
            self._top += count

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` on the pool's device in one copy. On a CPU pool it is ``host`` itself: the pool never writes
        a table it has handed out (a new plan or more pages make new tensors), so no copy is needed."""
        device = self.pages.device
        if device.type == "cpu":
            return host
        if device.type == "cuda":
            # Pinned, so the copy is asynchronous; the caching host allocator keeps the staging buffer until
            # the copy has run.
            staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            staging.copy_(host)
            return staging.to(device, non_blocking=True)
        return host.to(device)

    # -- internals: a sequence's pages ------------------------------------------------

    def _reserve(self, seq: _Sequence, needed: int) -> None:
        """Take the pages of ``max_tokens`` positions for every kept (layer, KV head) of ``seq``'s plan, in
        one slice of the free stack; their tables go to the device in one copy."""
        top = self._top
        try:
            seq.host = self._take(needed).view(seq.layout.num_rows, self._pages_per_head(seq.max_tokens))
            seq.device = self._to_device(seq.host)
        except BaseException:
            self._top = top
            raise

    def _move_reserved(self, seq_id: Hashable, seq: _Sequence, new: _Layout) -> None:
        """Move a reserved sequence to the layout ``new``: the (layer, KV head) rows both keep keep their pages,
        the dropped rows' pages go back, the added rows take pages (a ``ValueError`` when they are not free;
        then nothing changes)."""
        old, per_head = seq.layout, seq.host.shape[1]
        stay = old.kept & new.kept
        dropped = old.rows.masked_select(old.kept & ~new.kept)
        added = new.rows.masked_select(new.kept & ~old.kept)
        more = (added.numel() - dropped.numel()) * per_head
        if more > self._top:
            raise ValueError(
                f"KV pool exhausted: the new plan of sequence {seq_id!r} needs {more} more pages, "
                f"{self._top} of {self.num_pages} are free"
            )
        host = torch.empty(new.num_rows, per_head, dtype=torch.int32)
        host.index_copy_(0, new.rows.masked_select(stay), seq.host.index_select(0, old.rows.masked_select(stay)))
        top = self._top
        try:
            # Given back first, so that a plan that trades pages needs only the difference free. The pages
            # go above the old top, so restoring the top undoes both.
            self._give_back(seq.host.index_select(0, dropped))
            host.index_copy_(0, added, self._take(added.numel() * per_head).view(-1, per_head))
            device = self._to_device(host)
        except BaseException:
            self._top = top
            raise
        seq.host, seq.device = host, device

    def _owned(self, seq: _Sequence) -> torch.Tensor:
        """Every page ``seq`` holds, in one tensor."""
        if seq.reserved:
            return seq.host
        return self._layer_pages(seq, range(self.shape.num_layers))

    def _layer_pages(self, seq: _Sequence, layers) -> torch.Tensor:
        """The pages a sequence that is not reserved holds in ``layers``, flat."""
        held = [seq.layer_host[layer].reshape(-1) for layer in layers if seq.layer_host[layer] is not None]
        return torch.cat(held) if held else self._stack.new_empty(0)

    def _layer_table(self, seq: _Sequence, layer: int, *, on_device: bool) -> torch.Tensor:
        """``[kept KV heads, pages]`` of ``layer`` on the device or the host (``[kept, 0]`` before any page)."""
        heads = seq.layout.heads_in(layer)
        if seq.reserved and heads:
            start = seq.layout.offsets[layer]
            return (seq.device if on_device else seq.host)[start:start + heads]
        table = None if seq.reserved else (seq.layer_device if on_device else seq.layer_host)[layer]
        if table is None:
            return torch.empty(heads, 0, dtype=torch.int32, device=self.pages.device if on_device else "cpu")
        return table

    def _build_model_tables(self, seq: _Sequence, width: int) -> torch.Tensor:
        shape = self.shape
        tables = torch.full((shape.num_layers * shape.num_kv_heads, width), self.scratch_page, dtype=torch.int32)
        tables[seq.layout.units, :seq.host.shape[1]] = seq.host
        return self._to_device(tables).view(shape.num_layers, shape.num_kv_heads, width)

    def _pages_needed(self, seq: _Sequence, layer: int, tokens: int) -> int:
        heads = seq.layout.heads_in(layer)
        have = self._layer_table(seq, layer, on_device=False).shape[1]  # every kept head of a layer holds as many
        need = self._pages_per_head(self._layer_length(seq, layer) + tokens)
        return max(0, need - have) * heads

    def _store(self, sequences, layer, keys, values, rows, tokens) -> None:
        """Take the pages the new tokens need and write them, in one launch; on failure the pages go back."""
        top = self._top
        tables = [(seq.layer_host[layer], seq.layer_device[layer]) if not seq.reserved else None for seq in sequences]
        try:
            for seq in sequences:
                self._grow(seq, layer, tokens)
            self._launch_append(sequences, layer, keys, values, rows)
        except BaseException:
            for seq, before in zip(sequences, tables):
                if before is not None:
                    seq.layer_host[layer], seq.layer_device[layer] = before
            self._top = top
            raise

    def _grow(self, seq: _Sequence, layer: int, tokens: int) -> None:
        """Take the pages ``tokens`` more positions need (a sequence that is not reserved); the layer's tables
        become new tensors, so that a rollback can restore the old ones."""
        more = self._pages_needed(seq, layer, tokens)
        if more == 0:
            return
        heads = seq.layout.heads_in(layer)
        new = self._take(more).view(heads, more // heads)
        old = seq.layer_host[layer]
        seq.layer_host[layer] = new if old is None else torch.cat([old, new], 1)
        seq.layer_device[layer] = self._to_device(seq.layer_host[layer])

    def _launch_append(self, sequences, layer, keys, values, rows) -> None:
        kept = [i for i, r in enumerate(rows) if r]
        key = keys[kept[0]] if len(kept) == 1 else torch.cat([keys[i] for i in kept])
        value = values[kept[0]] if len(kept) == 1 else torch.cat([values[i] for i in kept])
        tables = [self._layer_table(sequences[i], layer, on_device=True) for i in kept]
        width = max(t.shape[1] for t in tables)
        table = tables[0] if len(tables) == 1 else torch.cat(
            [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables]
        )
        # Through pinned memory (_to_device): torch.tensor(..., device=cuda) copies from pageable memory and waits
        # for the stream, which would stall the host on every layer of every step.
        starts = self._to_device(torch.tensor(
            [self._layer_length(sequences[i], layer) for i in kept for _ in range(rows[i])], dtype=torch.int32,
        ))
        self.ops.kv_append(self.k_pages, self.v_pages, key, value, table, starts)

    # -- internals: positions stored ------------------------------------------------------

    def _layer_length(self, seq: _Sequence, layer: int) -> int:
        if seq.layer_lengths is not None:
            return seq.layer_lengths[layer]
        return seq.length if seq.layout.heads_in(layer) else 0

    def _lengths(self, seq: _Sequence) -> list[int]:
        return [self._layer_length(seq, layer) for layer in range(self.shape.num_layers)]

    def _add_length(self, seq: _Sequence, layer: int, tokens: int) -> None:
        if tokens:
            seq.layer_lengths = self._lengths(seq)
            seq.layer_lengths[layer] += tokens
            self._settle_lengths(seq)

    def _settle_lengths(self, seq: _Sequence) -> None:
        """Back to one length when every layer that keeps a KV head holds as many positions and the others none."""
        lengths, kept = seq.layer_lengths, seq.layout.kept_layers
        stored = lengths[kept[0]] if kept else 0
        if all(n == (stored if seq.layout.heads_in(layer) else 0) for layer, n in enumerate(lengths)):
            seq.length, seq.layer_lengths = stored, None
